"""DALI's residual prefetch: calibration and its prediction quality report. Lossless reads ahead under every budget
and policy: test_lossless_matrix.py."""

import random
import shutil

import pytest

from tiermoe import LLM
from tiermoe.errors import ConfigError
from tiermoe.offload.prefetch import CALIBRATION_FILE
from tiermoe.offload.tools.calibrate import calibrate


@pytest.fixture(scope="module")
def calibrated(tiny_models, tmp_path_factory):
    folder = shutil.copytree(tiny_models("qwen3_moe", "fused"), tmp_path_factory.mktemp("cal") / "m")
    rng = random.Random(0)
    report = calibrate(LLM(folder), [rng.randrange(128) for _ in range(640)], chunk_tokens=64)
    return folder, report


def test_calibration_writes_residuals_and_reports_quality(calibrated):
    folder, report = calibrated
    assert (folder / CALIBRATION_FILE).exists()
    assert report["fit_tokens"] == 512 and report["held_out_tokens"] == 128
    for variant in ("residual", "plain"):
        for layers in report[variant].values():
            assert set(layers) == {0, 1}  # every MoE layer that has a successor
            for q in layers.values():
                assert 0 <= q["precision"] <= 1 and 0 <= q["recall"] <= 1
    top1 = report["residual"]["top1"][0]
    assert top1["recall"] == pytest.approx(top1["precision"] / 3)  # 1 prediction vs 3 actual experts per token


def test_residual_prefetch_needs_calibration(tiny_models):
    with pytest.raises(ConfigError, match="run `tiermoe calibrate"):
        LLM(tiny_models("mixtral"), expert_cache="50%", prefetch="residual")
