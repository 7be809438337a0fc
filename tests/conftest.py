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


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny test matrices run several times faster on one intra-op thread than split over two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """Tiny random diffusion checkpoints (llada2_moe, llada), written under their real tensor names."""
    from tests.tiny_diffusion_models import build_tiny_diffusion

    root = tmp_path_factory.mktemp("tiny-diffusion")
    return {f: build_tiny_diffusion(f, root / f) for f in ("llada2_moe", "llada")}


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """tiermoe's cache dir (cost profile, usage calibrations) in a temporary folder, never the user's."""
    from tiermoe.kernels.build import build_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIERMOE_KERNELS_DIR", str(build_dir()))  # compiled kernels: built once per machine, not per run
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


__all__ = ["FAMILIES"]
