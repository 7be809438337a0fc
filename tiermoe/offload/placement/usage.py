"""Which experts a workload uses most: counted over a calibration run, kept in the user's cache, read back by the
static placement (`cache_policy="static"`, tiermoe.offload.placement.static_store).

A calibration run generates from prompts the user supplies (`tiermoe calibrate`: slices of a text file) with the
engine's own decoder, so a diffusion model is counted on its denoising steps, where a block of mostly mask tokens
routes, not on clean text. Per MoE layer and expert it counts the forwards that routed at least one token to the
expert (`requests`: each one is a fetch the expert must be present for) and the tokens routed to it.

The counts describe a workload on one checkpoint, so they live under ~/.cache/tiermoe/usage/ (like the cost
profile), keyed by the model folder and its checkpoint files' sizes and times: a changed checkpoint needs a new
calibration, and a read-only model folder (or the package's own assets) is never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from tiermoe import progress
from tiermoe.checkpoint import CheckpointIndex
from tiermoe.errors import ConfigError
from tiermoe.offload.placement.costs import cache_dir, write_json

Key = tuple[int, int]  # (layer, expert)


@dataclass(slots=True)
class ExpertUsage:
    """Per (layer, expert): forwards that routed to it and tokens routed to it, over a calibration run."""

    requests: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    info: dict = field(default_factory=dict)  # how the run was made (prompts, sampling), for the record

    def ranking(self, keys: list[Key]) -> list[Key]:
        """`keys` most used first: by forwards that needed the expert (what a resident copy saves: one read each),
        then by tokens, then by (layer, expert); experts never routed come last."""
        return sorted(keys, key=lambda k: (-self.requests[k], -self.tokens[k], k))

    def to_dict(self) -> dict:
        rows = [[*k, self.requests[k], self.tokens[k]] for k in self.ranking(list(self.requests))]
        return {"info": self.info, "experts": rows}  # rows: [layer, expert, requests, tokens]

    @classmethod
    def from_dict(cls, d: dict) -> ExpertUsage:
        usage = cls(info=d.get("info", {}))
        for layer, expert, requests, tokens in d["experts"]:
            usage.requests[(layer, expert)] = requests
            usage.tokens[(layer, expert)] = tokens
        return usage


def count_usage(llm, prompts: list, params) -> ExpertUsage:
    """Generate from `prompts` with `params` on `llm` and count every MoE layer's routing (router hooks, so the
    counts are the same whatever store serves the experts)."""
    usage = ExpertUsage()

    def hook(module, args, out, layer: int) -> None:
        experts, tokens = torch.unique(out[1], return_counts=True)  # routed ids [T, A] -> distinct [n], [n]
        for e, n in zip(experts.tolist(), tokens.tolist(), strict=True):
            usage.requests[(layer, e)] += 1
            usage.tokens[(layer, e)] += n

    hooks = [b.gate.register_forward_hook(partial(hook, layer=b.layer)) for b in llm.model.moe_blocks]
    try:
        outputs = llm.generate(prompts, params, use_tqdm=progress.shown())
    finally:
        for h in hooks:
            h.remove()
    usage.info = {"prompts": len(outputs), "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
                  "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                  "sampling": {k: getattr(params, k) for k in ("temperature", "max_tokens", "block_length", "steps",
                                                               "threshold")}}
    return usage


def usage_path(index: CheckpointIndex) -> Path:
    """The calibration file of this checkpoint: its folder and the size and time of every file holding experts."""
    files = sorted({p.file for spec in index.experts().values() for p in spec.parts})
    state = [[os.fspath(f.resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    digest = hashlib.sha256(json.dumps([os.fspath(index.folder.resolve()), state]).encode()).hexdigest()[:16]
    return cache_dir() / "usage" / f"{index.folder.resolve().name}-{digest}.json"


def save_usage(index: CheckpointIndex, usage: ExpertUsage) -> Path:
    path = usage_path(index)
    write_json(path, {"model": os.fspath(index.folder.resolve()), **usage.to_dict()})
    return path


def load_usage(index: CheckpointIndex, moe_layers: list[int]) -> ExpertUsage:
    """The saved calibration of this checkpoint; a clear error when there is none or it names unknown experts."""
    path = usage_path(index)
    try:
        usage = ExpertUsage.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"cache_policy 'static' needs the experts' usage on calibration text, and {index.folder} "
                          f"(as it is now) has none: run `tiermoe calibrate --model {index.folder}` first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a readable expert-usage calibration ({e}); run `tiermoe calibrate "
                          f"--model {index.folder}` again") from None
    known = {k for k in index.experts() if k[0] in moe_layers}
    unknown = sorted(set(usage.requests) - known)
    if unknown:
        raise ConfigError(f"{path} counts experts this model does not have (first: layer {unknown[0][0]}, expert "
                          f"{unknown[0][1]}); run `tiermoe calibrate --model {index.folder}` again")
    return usage


def calibrate_usage(llm, ids: list[int], prompt_tokens: int, prompts: int, params) -> dict:
    """Count expert usage generating from the first `prompts` slices of `prompt_tokens` tokens of `ids` with
    `params`, and save it for this checkpoint; returns what was saved where."""
    if prompts < 1 or prompt_tokens < 1:
        raise ConfigError(f"usage calibration needs at least one prompt of at least one token, got {prompts} "
                          f"prompts of {prompt_tokens} tokens")
    slices = [ids[i:i + prompt_tokens] for i in range(0, len(ids) - prompt_tokens + 1, prompt_tokens)][:prompts]
    if not slices:
        raise ConfigError(f"calibration text has {len(ids)} tokens, fewer than one prompt of {prompt_tokens}")
    usage = count_usage(llm, slices, params)
    return {"file": os.fspath(save_usage(llm.index, usage)), **usage.info}
