"""The shipped default model (tiermoe/assets/shakespeare-moe) continues "ROMEO:" greedily as pinned.

The expected tokens in tests/data/default_model_expected.json come from transformers' reference implementation
(``generate(do_sample=False)`` in fp32). One test checks that our engine reproduces them, the other that the
reference still does. Regenerate the file after retraining with::

    python tests/test_default_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import tiermoe

MODEL_DIR = Path(tiermoe.__file__).resolve().parent / "assets" / "shakespeare-moe"
EXPECTED_PATH = Path(__file__).resolve().parent / "data" / "default_model_expected.json"
PROMPT = "ROMEO:"
MAX_NEW_TOKENS = 24


def load_expected() -> dict:
    """The pinned reference continuation."""
    return json.loads(EXPECTED_PATH.read_text())


def reference_generate(max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Greedy continuation of PROMPT with transformers in fp32, plus the top-1/top-2 logit gap at each step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # [1, P]
    with torch.no_grad():
        out = model.generate(
            prompt_ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new_ids = out.sequences[0, prompt_ids.shape[1] :].tolist()
    gaps = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    return {
        "prompt_token_ids": prompt_ids[0].tolist(),
        "token_ids": new_ids,
        "text": tokenizer.decode(new_ids),
        "min_top2_logit_gap": round(min(gaps), 4),
    }


def test_engine_matches_reference_tokens():
    """Our engine's greedy decode of the default model gives the reference's tokens."""
    from tiermoe import LLM, SamplingParams
    from tiermoe.models.registry import DEFAULT_MODEL

    expected = load_expected()
    assert Path(DEFAULT_MODEL).resolve() == MODEL_DIR
    llm = LLM(DEFAULT_MODEL)
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS))[0]
    assert list(out.outputs[0].token_ids) == expected["token_ids"]


def test_transformers_reproduces_expected_tokens():
    """The stored sequence is what transformers' reference implementation generates."""
    expected = load_expected()
    got = reference_generate()
    assert got["prompt_token_ids"] == expected["prompt_token_ids"]
    assert got["token_ids"] == expected["token_ids"]


def write_expected() -> None:
    """Recompute tests/data/default_model_expected.json from the shipped folder."""
    import transformers

    ref = reference_generate()
    record = {
        "model": "tiermoe/assets/shakespeare-moe",
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "computed_with": f"transformers {transformers.__version__} generate(do_sample=False), float32",
        **ref,
    }
    EXPECTED_PATH.parent.mkdir(parents=True, exist_ok=True)
    EXPECTED_PATH.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    write_expected()
