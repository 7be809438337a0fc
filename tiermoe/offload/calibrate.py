"""`tiermoe calibrate`: the per-layer residuals of DALI's prefetch, and how well the prediction works.

Runs calibration text through the model, records every MoE layer's router input, and stores, per MoE layer, the
mean difference between the next MoE layer's router input and this one's. Then measures on held-out text the
precision and recall@k of the next-layer prediction, with and without the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermoe.decode.kv_cache import KVCache
from tiermoe.engine.model_runner import forward_new_tokens
from tiermoe.engine.request import Request
from tiermoe.models.transformer import CausalLM
from tiermoe.offload.prefetch import ResidualPrefetcher
from tiermoe.sampling_params import SamplingParams


@dataclass
class RouterInputs:
    """Router inputs [T, H] and chosen experts [T, A] per MoE layer, over a run of text."""

    inputs: dict[int, torch.Tensor]
    chosen: dict[int, torch.Tensor]


def capture(model: CausalLM, chunks: list[list[int]]) -> RouterInputs:
    """Run each chunk of token ids as one prompt and keep every MoE layer's router input and top-k."""
    inputs: dict[int, list[torch.Tensor]] = {}
    chosen: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for block in model.moe_blocks:
        def hook(module, args, out, layer=block.layer):
            inputs.setdefault(layer, []).append(args[0].float())
            chosen.setdefault(layer, []).append(out[1])
        hooks.append(block.gate.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for ids in chunks:
                seq = Request("calib", None, ids, SamplingParams(max_tokens=1), KVCache(len(ids)), len(ids) + 1,
                               frozenset())
                forward_new_tokens(model, [seq])
    finally:
        for h in hooks:
            h.remove()
    return RouterInputs({k: torch.cat(v) for k, v in inputs.items()}, {k: torch.cat(v) for k, v in chosen.items()})


def residuals(model: CausalLM, run: RouterInputs) -> dict[int, torch.Tensor]:
    """Per MoE layer with a successor: mean(next router input - this router input)  # [H]."""
    blocks = model.moe_blocks
    return {a.layer: (run.inputs[b.layer] - run.inputs[a.layer]).mean(0) for a, b in zip(blocks, blocks[1:],
                                                                                           strict=False)}


def prediction_quality(model: CausalLM, run: RouterInputs, prefetcher: ResidualPrefetcher,
                       k: int) -> dict[int, dict[str, float]]:
    """Per layer: precision and recall@k of the top-k predicted next-layer experts against the actual top-k."""
    out = {}
    for layer, nxt in prefetcher.next.items():
        x = run.inputs[layer]
        delta = prefetcher.residuals.get(layer)
        with torch.inference_mode():
            _, pred = nxt.gate(x if delta is None else x + delta)  # [T, A], best first
        pred, actual = pred[:, :k], run.chosen[nxt.layer]
        hits = (pred[:, :, None] == actual[:, None, :]).any(-1).sum().item()  # predicted experts that were used
        out[layer] = {"precision": hits / pred.numel(), "recall": hits / actual.numel()}
    return out


def calibrate(llm, ids: list[int], chunk_tokens: int = 256, held_out: float = 0.2) -> dict:
    """Fit the residuals on the first part of the token ids, save them with the model, report quality on the rest."""
    from tiermoe.offload.prefetch import CALIBRATION_FILE, save_residuals

    chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids) - chunk_tokens + 1, chunk_tokens)]
    cut = max(1, int(len(chunks) * (1 - held_out)))
    fit, test = capture(llm.model, chunks[:cut]), capture(llm.model, chunks[cut:] or chunks[:1])
    deltas = residuals(llm.model, fit)
    save_residuals(llm.config.model / CALIBRATION_FILE, deltas)
    k = llm.model.shape.top_k
    report = {"fit_tokens": sum(map(len, chunks[:cut])), "held_out_tokens": sum(map(len, chunks[cut:]))}
    for name, res in (("residual", deltas), ("plain", None)):
        pf = ResidualPrefetcher(llm.model, res)
        report[name] = {f"top{j}": prediction_quality(llm.model, test, pf, j) for j in sorted({1, k})}
    return report
