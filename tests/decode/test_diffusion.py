"""Block diffusion (LLaDA2) and full-sequence remasking (LLaDA) on tiny random checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch

from tests.tiny_diffusion_models import MASK_ID
from tiermoe import LLM, SamplingParams, kernels
from tiermoe.decode import diffusion
from tiermoe.decode.diffusion import Canvas, DiffusionOptions
from tiermoe.decode.remasking import commit_confident, logit_rows, predict, probability, transfer_schedule
from tiermoe.errors import ConfigError, RequestError

SHORT = [3, 17, 42, 9, 77]  # shorter than a block
LONG = [12, 99, 31, 7, 54, 23, 70, 2, 45, 16, 61, 88, 1, 64, 20, 5, 90, 33, 40]  # spans blocks, not aligned


def run(llm, prompt, params, options=None):
    """(token ids, diffusion stats) of one request, decoded with `options`."""
    seq = llm._make_sequence(prompt, params)
    stats = diffusion.generate(llm.model, [seq], llm.tokenizer, llm.diffusion, options or DiffusionOptions())
    return seq.output_ids, stats[seq.request_id]


@pytest.mark.parametrize("block_length, steps, threshold", [(8, 8, 0.95), (4, 2, 0.3), (16, 4, 0.05), (8, 3, 0.5)])
@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_kv_cached_blocks_are_token_identical_to_full_recomputation(llada2, prompt, block_length, steps, threshold):
    params = SamplingParams(temperature=0, max_tokens=24, block_length=block_length, steps=steps, threshold=threshold)
    cached, cached_stats = run(llada2, prompt, params)
    full, full_stats = run(llada2, prompt, params, DiffusionOptions(kv_cache=False))
    assert cached == full and len(cached) == 24
    assert cached_stats["nfe"] == full_stats["nfe"]  # same steps, each over far fewer rows
    assert cached_stats["forward_rows"] <= full_stats["forward_rows"]


def test_seeded_sampling_with_the_cache_equals_recomputation(llada2):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=16, block_length=8, steps=4, threshold=0.5)
    assert run(llada2, LONG, params)[0] == run(llada2, LONG, params, DiffusionOptions(kv_cache=False))[0]


def test_threshold_commits_several_tokens_per_forward(llada2):
    strict = run(llada2, SHORT, SamplingParams(temperature=0, max_tokens=32, block_length=8, steps=8))[1]
    loose = run(llada2, SHORT, SamplingParams(temperature=0, max_tokens=32, block_length=8, steps=8,
                                              threshold=0.05))[1]
    assert loose["nfe"] < strict["nfe"] and loose["tokens_per_forward"] > strict["tokens_per_forward"]


@pytest.mark.parametrize("which", ["llada2", "llada"])
def test_greedy_is_deterministic_and_ignores_the_seed(which, request):
    llm = request.getfixturevalue(which)
    greedy = SamplingParams(temperature=0, max_tokens=16, block_length=8, steps=8)
    first = run(llm, LONG, greedy)[0]
    assert first == run(llm, LONG, greedy)[0]
    assert first == run(llm, LONG, SamplingParams(temperature=0, seed=5, max_tokens=16, block_length=8, steps=8))[0]


@pytest.mark.parametrize("which", ["llada2", "llada"])
def test_seeded_sampling_is_reproducible(which, request):
    llm = request.getfixturevalue(which)

    def sampled(seed):
        return run(llm, SHORT, SamplingParams(temperature=1.5, seed=seed, max_tokens=16, block_length=8, steps=8))[0]

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    assert sampled(7) != run(llm, SHORT, SamplingParams(temperature=0, max_tokens=16, block_length=8, steps=8))[0]


@pytest.mark.parametrize("which, folder", [("llada2", "llada2_moe"), ("llada", "llada")])
def test_eos_ends_generation_after_its_block_and_cuts_the_text(which, folder, request, folders, tmp_path):
    params = SamplingParams(temperature=0, max_tokens=32, block_length=8, steps=8, threshold=0.3)
    full, full_stats = run(request.getfixturevalue(which), LONG, params)
    first = next(j for j in range(8, len(full) - 8) if full[j] not in full[:j])  # a token new in a middle block
    eos = full[first]
    shutil.copytree(folders[folder], tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    llm = LLM(tmp_path / "m")
    out = llm.generate([LONG], params)[0]
    assert out.outputs[0].token_ids == full[: first + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", eos)
    stats = out.stats["diffusion"]
    if which == "llada2":  # blocks are aligned to position 0, the first one holds the prompt's tail
        assert stats["blocks"] == (len(LONG) + first) // 8 - len(LONG) // 8 + 1
    else:
        assert stats["blocks"] == first // 8 + 1
    assert stats["nfe"] < full_stats["nfe"]
    params.ignore_eos = True
    assert run(llm, LONG, params)[0] == full


def test_logits_are_computed_in_chunks_of_at_most_the_given_rows(llada2):
    calls = []
    hook = llada2.model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        params = SamplingParams(temperature=0, max_tokens=24, block_length=16, steps=2, threshold=0.05)
        chunked, stats = run(llada2, LONG, params, DiffusionOptions(logit_rows=3))
        assert max(calls) == 3 and stats["max_logit_rows"] == 3 and sum(calls) == stats["logit_rows"]
        calls.clear()
        whole, _ = run(llada2, LONG, params)
        assert chunked == whole and max(calls) == 16  # masked rows of the current block only
    finally:
        hook.remove()


def test_predict_applies_the_head_chunk_by_chunk(llada2):
    calls = []
    hook = llada2.model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        hidden = torch.randn(23, 64)
        with torch.inference_mode():
            tokens, confidence = predict(llada2.model, hidden, SamplingParams(temperature=0), None, 5, MASK_ID, True)
            logits = llada2.model.logits(hidden)
    finally:
        hook.remove()
    logits = logits.clone()  # an inference tensor cannot be written to outside inference mode
    assert calls[:-1] == [5, 5, 5, 5, 3]
    logits[:, MASK_ID] = float("-inf")
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(confidence, logits.softmax(-1).max(-1).values)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("vocab", [126464, 157184])  # LLaDA-8B's, LLaDA2's
def test_a_positions_confidence_is_the_one_it_gets_alone_among_any_odd_number_of_positions(monkeypatch, threads,
                                                                                           vocab):
    """The softmax probability of a position's chosen token is the one it gets in an lm_head call of its own, however
    many masked positions share the call (the engine's batch-invariant mode). torch's logsumexp is not: for few rows
    it splits each row's sum between threads, for many it gives each row to one thread."""
    monkeypatch.setattr(kernels, "_invariant", True)
    rows = logit_rows(vocab) | 1  # as many as one lm_head call takes, odd
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 4  # [rows, V]
    chosen = logits.max(-1).values
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = [probability(logits[i:i + 1], chosen[i:i + 1])[0] for i in range(rows)]
        for n in (3, 7, 47, rows):
            many = probability(logits[:n], chosen[:n])
            assert all(torch.equal(many[i], alone[i]) for i in range(n)), n
    finally:
        torch.set_num_threads(before)
    exact = (chosen.double() - logits.double().logsumexp(-1)).exp()
    torch.testing.assert_close(torch.stack(alone).double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("which", ["llada2", "llada"])
def test_no_position_is_committed_before_its_block(which, request, monkeypatch):
    llm = request.getfixturevalue(which)
    committed = []
    original = Canvas.commit
    monkeypatch.setattr(Canvas, "commit", lambda self, pos, tok: (committed.append(pos.tolist()),
                                                                  original(self, pos, tok)))
    run(llm, LONG, SamplingParams(temperature=0, max_tokens=24, block_length=8, steps=6, threshold=0.2))
    offset = 0 if which == "llada2" else len(LONG)  # LLaDA2's blocks start at position 0, LLaDA's at the prompt
    blocks = [{(p - offset) // 8 for p in step} for step in committed]
    assert all(len(b) == 1 for b in blocks)
    order = [b.pop() for b in blocks]
    assert order == sorted(order)
    assert sum(len(step) for step in committed) == 24 + (8 - (len(LONG) + 24) % 8) % 8 * (which == "llada2")


def test_llada_splits_steps_evenly_across_blocks(llada):
    _, stats = run(llada, SHORT, SamplingParams(temperature=0, max_tokens=32, block_length=8, steps=16))
    assert stats["nfe"] == 16 and stats["committed"] == 32  # 4 blocks x 4 steps x 2 positions
    _, stats = run(llada, SHORT, SamplingParams(temperature=0, max_tokens=32, block_length=32, steps=32))
    assert stats["nfe"] == 32 and stats["tokens_per_forward"] == 1.0


def test_llada_random_remasking_is_seeded(llada):
    def random_order(seed):
        return run(llada, SHORT, SamplingParams(temperature=0, seed=seed, max_tokens=16, block_length=16, steps=8,
                                                remasking="random"))[0]

    assert random_order(1) == random_order(1)
    assert len({tuple(random_order(s)) for s in range(4)}) > 1


def test_outputs_report_nfe_and_tokens_per_forward(llada2):
    out = llada2.generate([SHORT], SamplingParams(temperature=0, max_tokens=16, block_length=8, steps=8))[0]
    stats = out.stats["diffusion"]
    assert stats["output_tokens"] == 16 and stats["tokens_per_forward"] == 16 / stats["nfe"]
    assert out.metrics.total_time > 0 and "total" in out.stats  # expert-store statistics are still there
    *running, last = llada2.stream(SHORT, SamplingParams(temperature=0, max_tokens=16, block_length=8, steps=8))
    assert last.stats["diffusion"] == {**stats, "decode_time": last.stats["diffusion"]["decode_time"]}
    assert last.finished and last.outputs[0].token_ids == out.outputs[0].token_ids
    # one output per committed block: the tokens grow a block at a time
    assert running and not any(o.finished for o in running)
    assert all(len(o.outputs[0].token_ids) < 16 for o in running)


def test_commit_rules():
    assert transfer_schedule(32, 32) == [1] * 32 and transfer_schedule(10, 4) == [3, 3, 2, 2]
    confidence = torch.tensor([0.2, 0.97, 0.5, 0.99, 0.1])
    assert sorted(commit_confident(confidence, 0.95, 1).tolist()) == [1, 3]  # all above the threshold
    assert sorted(commit_confident(confidence, 0.95, 3).tolist()) == [1, 2, 3]  # too few: the top 3
    assert sorted(commit_confident(confidence[[0, 4]], 0.95, 3).tolist()) == [0, 1]  # fewer left than k


@pytest.mark.parametrize("bad", [dict(block_length=0), dict(steps=0), dict(min_commit=0), dict(threshold=1.5),
                                 dict(remasking="lowest")])
def test_bad_diffusion_params_are_refused(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_a_diffusion_routing_trace_holds_every_forwards_rows_and_is_not_replayed(llada2, llada, tmp_path):
    from tiermoe.sim.trace import Trace

    llm = llada2
    params = SamplingParams(temperature=0, max_tokens=12, block_length=4, steps=4, ignore_eos=True)
    outs = llm.generate([LONG, SHORT], params, record_trace=tmp_path / "t")
    trace = Trace.load(tmp_path / "t")
    work = [o.stats["diffusion"] for o in outs]
    forward, block, step = (trace.extras[k] for k in ("forward", "denoise_block", "denoise_step"))
    assert trace.num_tokens == sum(w["forward_rows"] for w in work)  # every row of every forward
    assert [len(np.unique(forward[a:b])) for a, b in trace.sequence_bounds()] == [w["nfe"] for w in work]
    assert trace.extras["seq_output_tokens"].tolist() == [12, 12]
    first = trace.seq_starts[1] - 1  # the last row of the first request: its last block's last step
    assert block[first] == work[0]["blocks"] - 1 and step[first] >= 0
    assert (trace.token_ids == trace.meta["mask_token_id"]).any()  # rows still masked when routed
    with pytest.raises(ConfigError, match="cannot be replayed"):
        llm.replay(tmp_path / "t")
    with pytest.raises(RequestError, match="no MoE layers"):  # LLaDA is dense
        llada.generate([SHORT], params, record_trace=tmp_path / "dense")


@pytest.mark.parametrize("family", ["llada2_moe", "llada"])
def test_max_tokens_beyond_the_context_denoises_only_the_room_left(folders, family):
    llm = LLM(folders[family], max_model_len=40)
    room = 40 - len(LONG)
    params = dict(temperature=0, block_length=8, steps=8, ignore_eos=True)
    huge = llm.generate([LONG], SamplingParams(max_tokens=10**9, **params))[0]  # no canvas of 10**9 positions
    fits = llm.generate([LONG], SamplingParams(max_tokens=room, **params))[0]
    assert huge.outputs[0].token_ids == fits.outputs[0].token_ids and len(fits.outputs[0].token_ids) == room
    assert huge.stats["diffusion"]["nfe"] == fits.stats["diffusion"]["nfe"]
