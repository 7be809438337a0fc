"""RoPE tables of every type against transformers' ROPE_INIT_FUNCTIONS (bit for bit), incl. the run-time length."""

import pytest
import torch

from tiermoe.errors import ConfigError
from tiermoe.models.layers import ForwardBatch
from tiermoe.models.rope import RopeSpec, make_rope

HEAD_DIM, MAX_POS = 32, 64
LONG = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
SHORT = [1.0 + 0.01 * i for i in range(HEAD_DIM // 2)]
ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-deepseek": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "yarn-v3": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 16, "mscale": 1.0,
                "mscale_all_dim": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT,
                 "original_max_position_embeddings": 16},
}


def hf_config(rope: dict):
    import transformers

    return transformers.MixtralConfig(hidden_size=128, num_attention_heads=4, head_dim=HEAD_DIM,
                                      max_position_embeddings=MAX_POS, rope_theta=10000.0, rope_scaling=dict(rope))


def ours(rope: dict) -> RopeSpec:
    return RopeSpec.from_config({"rope_theta": 10000.0, "rope_scaling": dict(rope), "max_position_embeddings": MAX_POS},
                                HEAD_DIM, MAX_POS)


@pytest.mark.parametrize("name", ROPES)
def test_tables_equal_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = ROPES[name]
    config, spec = hf_config(rope), ours(rope)
    init = ROPE_INIT_FUNCTIONS[spec.rope_type]
    # seq_len as transformers' dynamic_rope_update passes it: None at init, max(position) + 1 (a tensor) after
    for seq_len in (None, torch.tensor(MAX_POS + 37), 17):
        theirs, their_scale = init(config, "cpu", seq_len=seq_len)
        mine, my_scale = spec.inv_freq(seq_len)
        assert torch.equal(mine, theirs), (name, seq_len)
        assert my_scale == their_scale


def test_scaled_types_actually_change_the_tables():
    default = RopeSpec.from_config({"rope_theta": 10000.0}, HEAD_DIM, MAX_POS).inv_freq()[0]
    for name, rope in ROPES.items():
        assert not torch.equal(ours(rope).inv_freq(torch.tensor(MAX_POS + 37))[0], default), name


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "extrapolation": 2}, "extrapolation"),
    ({"rope_type": "ntk-by-parts", "factor": 4.0}, "ntk-by-parts"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "high_freq_factor"),
])
def test_unknown_rope_fields_are_refused_by_name(rope, field):
    with pytest.raises(ConfigError, match=field):
        ours(rope)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("dim", "theta"), [(128, 500000.0), (64, 600000.0), (16, 500000.0), (8, 600000.0)])
def test_a_rows_tables_are_the_ones_it_gets_alone_among_any_odd_number_of_rows(threads, dim, theta):
    """Guard of batch invariance (tiermoe.kernels): a row's cos/sin do not depend on the rows beside it, also when
    the tables are split between threads. Rotated widths of LLaDA-8B (128), LLaDA2 (half of 128) and the tiny test
    models; torch's cos/sin (vml, remainders through the same vector code) need no batch-invariant form."""
    rope = make_rope({"rope_theta": theta}, dim, 4096)
    rows = 2 * (32768 // dim) + 1  # past torch's parallel grain
    positions = torch.randint(0, 4096, (rows,), generator=torch.Generator().manual_seed(dim))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            alone = [torch.cat(rope.cos_sin(ForwardBatch(positions[i:i + 1], []), dtype), -1)[0] for i in range(rows)]
            for n in (3, 47, rows):
                many = torch.cat(rope.cos_sin(ForwardBatch(positions[:n], []), dtype), -1)  # [n, 2 * dim]
                assert all(torch.equal(many[i], alone[i]) for i in range(n)), (dtype, n)
    finally:
        torch.set_num_threads(before)
