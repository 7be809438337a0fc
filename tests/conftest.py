import pytest
import torch

from tests.tiny_models import FAMILIES, build_tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Lazily built tiny random checkpoints, keyed by (family, layout)."""
    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(family: str, layout: str = "per_expert"):
        if (family, layout) not in built:
            built[(family, layout)] = build_tiny(family, root / f"{family}-{layout}", layout)
        return built[(family, layout)]

    return get


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


__all__ = ["FAMILIES"]
