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
from tiermoe.progress import progress
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
            for ids in progress(chunks, desc="capturing router inputs", unit="chunk"):
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
    """Fit the residuals on the first part of the token ids, save them (prefetch.residuals_path: beside the model, or
    in the user's cache), report quality on the rest and where the residuals went (`file`)."""
    from tiermoe.offload.prefetch import residuals_path, save_residuals

    chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids) - chunk_tokens + 1, chunk_tokens)]
    cut = max(1, int(len(chunks) * (1 - held_out)))
    fit, test = capture(llm.model, chunks[:cut]), capture(llm.model, chunks[cut:] or chunks[:1])
    deltas = residuals(llm.model, fit)
    path = residuals_path(llm.config.model, writing=True)
    save_residuals(path, deltas)
    k = llm.model.shape.top_k
    report = {"file": str(path), "fit_tokens": sum(map(len, chunks[:cut])),
              "held_out_tokens": sum(map(len, chunks[cut:]))}
    for name, res in (("residual", deltas), ("plain", None)):
        pf = ResidualPrefetcher(llm.model, res)
        report[name] = {f"top{j}": prediction_quality(llm.model, test, pf, j) for j in sorted({1, k})}
    return report


def format_report(report: dict) -> str:
    """`tiermoe calibrate`'s tables: per layer, the next-layer prediction's precision and recall with and without the
    residual; then what the expert-usage count covered."""
    lines = []
    if "residual" in report:
        tops = list(report["residual"])  # "top1", "top<k>"
        heads = [f"{m}@{t[3:]} {v}" for t in tops for m in ("P", "R") for v in ("resid", "plain")]
        lines += [f"next-layer expert prediction on {report['held_out_tokens']} held-out tokens (fit on "
                  f"{report['fit_tokens']}): precision P and recall R of the top-k predicted, with the residual "
                  "(resid) and without (plain)",
                  f"{'layer':>5} " + " ".join(f"{h:>11}" for h in heads)]
        for layer in report["residual"][tops[0]]:
            cells = [report[v][t][layer][m] for t in tops for m in ("precision", "recall") for v in ("residual",
                                                                                                     "plain")]
            lines.append(f"{layer:>5} " + " ".join(f"{c:>11.3f}" for c in cells))
    if "expert_usage" in report:
        u = report["expert_usage"]
        lines.append(f"expert usage: {u['prompts']} prompts, {u['prompt_tokens']} prompt tokens, "
                     f"{u['generated_tokens']} generated tokens")
    return "\n".join(lines)
