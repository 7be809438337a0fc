"""Masked-diffusion decoding: the generated region starts as mask tokens and is unmasked over denoising steps,
left to right one block at a time.

LLaDA2 ("blocks" schedule): blocks are aligned to position 0 (the prompt's last, partial block is denoised with the
first generated positions) and attention is block-causal, so once a block is finished its K/V never change: each
step runs only the current block over the cached K/V of the prompt and the finished blocks, exactly as the
reference's full recomputation would. A block's final K/V are written by the next block's first step, which runs
both (no extra forward). Per step: commit every masked position of the block whose confidence exceeds `threshold`,
else the k most confident, k from `block_length` spread over `steps` (remainder first; a step with k = 0 commits
only what crosses the threshold). `min_commit` (the reference's `minimal_topk`) only caps `steps` at
`max_tokens // min_commit`. A `max_tokens` beyond the context (max_model_len) counts as the room left there. The
last block is denoised whole even past `max_tokens`, as the reference does: the
order in which its positions are committed depends on all of them. A request whose output reaches EOS stops after
that block; the text is cut at EOS.

LLaDA ("full" schedule): bidirectional attention over prompt and every block, recomputed at every step (no K/V can
be reused). `steps` are split evenly across blocks; per step the scheduled number of positions of the current block
is committed, the most confident first ("low_confidence": softmax probability of the chosen token) or in random
order ("random"); positions past the current block are never committed early. Where the reference asserts, we
extend: a `max_tokens` that is not a multiple of `block_length` ends in a shorter block, and `steps` not divisible
by the number of blocks is rounded down (at least 1 per block). Steps that would commit nothing (more steps per
block than positions) are skipped: the reference runs the model there and discards the result, so the tokens are
the same and only its NFE is higher.

Temperature 0 is truly greedy (argmax), as LLaDA's reference is; LLaDA2's samples from the softmax even then (a
known bug). Above 0 tokens are sampled with the request's seeded generator.

TIDE (tiermoe.offload.placement.refresh): with `tau` set, the decoder tells the expert store before every step's
forward whether it is a refresh step (every step of the first generated block, then every tau-th step of a block) or a
reuse step, so that the store re-places experts only at refreshes.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import asdict, dataclass

import torch

from tiermoe.decode.kv_cache import KVCache
from tiermoe.decode.remasking import (
    commit_confident,
    commit_top_k,
    logit_rows,
    predict,
    random_confidence,
    transfer_schedule,
)
from tiermoe.engine.request import Request
from tiermoe.models.diffusion import DiffusionModel
from tiermoe.models.layers import ForwardBatch, SeqSlice
from tiermoe.models.sparse_attention import SparseKV
from tiermoe.models.sparse_spec import SparseAttention
from tiermoe.models.transformer import CausalLM
from tiermoe.offload.placement.refresh import RefreshSchedule, Tau
from tiermoe.offload.tiers.store import ExpertStore


@dataclass(frozen=True, slots=True)
class DiffusionOptions:
    """Engine-side knobs (not per request)."""

    kv_cache: bool = True  # LLaDA2: reuse finished blocks' K/V; False recomputes all every step (the reference)
    logit_rows: int | None = None  # rows per lm_head call; None: as many as LOGIT_BUDGET bytes of logits allow
    tau: Tau | None = None  # TIDE refresh interval (steps, or "auto"); None: no refresh/reuse hook
    sparse: SparseAttention | None = None  # LLaDA2: light steps attend to each KV head's top-k prefix positions


@dataclass(slots=True)
class DiffusionStats:
    """The work one request's decoding took."""

    nfe: int = 0  # number of forward evaluations of the model
    forward_rows: int = 0  # token rows those evaluations computed
    logit_rows: int = 0  # rows the lm_head was applied to (masked positions of the current block only)
    max_logit_rows: int = 0  # the most rows of any one lm_head call (bounds the logits' memory)
    committed: int = 0  # positions unmasked, including any past max_tokens in the last block
    blocks: int = 0  # blocks denoised
    decode_time: float = 0.0  # seconds
    refresh_steps: int = 0  # TIDE: steps that refreshed the expert placement
    tau: int | None = None  # TIDE: the refresh interval used after the first block (solved when "auto")

    def to_dict(self, output_tokens: int) -> dict:
        return {**asdict(self), "output_tokens": output_tokens,
                "tokens_per_forward": output_tokens / self.nfe if self.nfe else 0.0}


@dataclass(slots=True)
class Canvas:
    """The sequence being denoised: prompt then generated positions, mask tokens until committed."""

    tokens: torch.Tensor  # [L] token ids (CPU)
    open: torch.Tensor  # [L] bool: a generated position not committed yet
    prompt_len: int

    @classmethod
    def new(cls, prompt: list[int], length: int, mask_id: int) -> Canvas:
        tokens = torch.full((length,), mask_id, dtype=torch.long)
        tokens[: len(prompt)] = torch.tensor(prompt)
        is_open = torch.ones(length, dtype=torch.bool)
        is_open[: len(prompt)] = False
        return cls(tokens, is_open, len(prompt))

    def masked(self, lo: int, hi: int) -> torch.Tensor:
        """Positions in [lo, hi) still to be committed, ascending: [m]."""
        return self.open[lo:hi].nonzero().squeeze(1) + lo

    def commit(self, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        self.tokens[positions] = tokens
        self.open[positions] = False


@dataclass(frozen=True, slots=True)
class Forward:
    """One denoising step's forward pass over a request's cache."""

    ids: torch.Tensor  # [n] token ids (CPU)
    start: int  # position of ids[0]; the cache holds [0, start) already
    attn_block: int | None  # ForwardBatch.attn_block: the block length (LLaDA2) or None (LLaDA, bidirectional)

    @property
    def cost(self) -> int:
        """Token rows the forward computes: what the step takes of an engine step's max_num_batched_tokens."""
        return self.ids.shape[0]

    @property
    def heavy(self) -> bool:
        """dLLM-Serve's phases: a heavy step (a block's first step, which computes K/V before the block -- the
        prompt, the previous block --, or LLaDA's full recomputation: cost ~ sequence length) or a light one (reuses
        the cached K/V and computes the block only: cost ~ block length)."""
        return self.attn_block is None or self.cost > self.attn_block


@dataclass(slots=True)
class Denoiser:
    """One request being denoised: asks for forwards, runs the logits path, counts the work, emits finished blocks."""

    model: CausalLM
    seq: Request
    cache: KVCache  # or the engine's paged view: holds [0, length) of the canvas
    tokenizer: object
    mask_id: int
    rows: int  # rows per lm_head call
    generator: torch.Generator | None
    stats: DiffusionStats
    schedule: RefreshSchedule | None = None  # TIDE: tells the expert store refresh vs reuse before each step

    def begin_step(self, block: int, step: int) -> None:
        """Before the forward of denoising `step` of the request's generated block `block` (0 = its first)."""
        if self.schedule is not None:
            self.stats.refresh_steps += self.schedule.begin_step(block, step).refresh
            self.stats.tau = self.schedule.interval

    def forward(self, ids: torch.Tensor, start: int, block: int | None) -> Forward:
        """The forward a step needs (ids [n] at positions [start, start + n), K/V into `cache`); the driver runs it,
        maybe beside other requests' steps, and sends back the hidden states [n, H]."""
        self.stats.nfe += 1
        self.stats.forward_rows += ids.shape[0]
        return Forward(ids, start, block)

    def predict(self, hidden: torch.Tensor, tempered_confidence: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [m, H] of masked positions -> tokens [m], confidences [m], on the CPU."""
        self.stats.logit_rows += hidden.shape[0]
        self.stats.max_logit_rows = max(self.stats.max_logit_rows, min(self.rows, hidden.shape[0]))
        tokens, confidence = predict(self.model, hidden, self.seq.params, self.generator, self.rows, self.mask_id,
                                     tempered_confidence)
        return tokens.cpu(), confidence.cpu()


    def emit(self, canvas: Canvas, lo: int, hi: int) -> bool:
        """Append a finished block's generated tokens to the request; True once it has finished (EOS, length)."""
        self.stats.blocks += 1
        for token in canvas.tokens[max(lo, canvas.prompt_len):hi].tolist():
            self.seq.append(token, self.tokenizer)
            if self.seq.finished:
                return True
        return False


def canvas_length(req: Request, schedule: str) -> int:
    """Positions a request's canvas (prompt and generated region) spans: what its K/V cache must hold."""
    prompt_len, gen, size = len(req.prompt_ids), generated_length(req), req.params.block_length
    if schedule == "blocks":  # whole blocks aligned to position 0
        return -(-(prompt_len + gen) // size) * size
    return prompt_len + gen


def generated_length(req: Request) -> int:
    """Positions to generate: max_tokens, or the room left in the context (max_model_len) when that is less;
    nothing past the context would be kept, so it is not denoised either."""
    return min(req.params.max_tokens, req.max_len - len(req.prompt_ids))


Steps = Generator[Forward, torch.Tensor, None]  # yields the forwards it needs, is sent their hidden states


def decode_blocks(d: Denoiser, options: DiffusionOptions) -> Steps:
    """LLaDA2's block diffusion with a K/V cache of the prompt and finished blocks."""
    p, prompt, gen = d.seq.params, d.seq.prompt_ids, generated_length(d.seq)
    size = p.block_length
    # The reference caps steps at gen_length // minimal_topk, and runs no step at all (returns mask tokens) at 0.
    steps = max(1, min(p.steps, gen // p.min_commit))
    schedule = transfer_schedule(size, steps)
    num_blocks = canvas_length(d.seq, "blocks") // size
    canvas = Canvas.new(prompt, num_blocks * size, d.mask_id)
    final = 0  # positions before this have their final K/V in the cache
    first = len(prompt) // size
    for block in range(first, num_blocks):
        lo, hi = block * size, (block + 1) * size
        for step in range(steps):
            masked = canvas.masked(lo, hi)  # [m]
            if masked.numel() == 0:
                break
            d.begin_step(block - first, step)
            start = final if options.kv_cache else 0
            hidden = yield d.forward(canvas.tokens[start:hi], start, size)  # [hi - start, H]
            final = lo
            tokens, confidence = d.predict(hidden[masked - start], tempered_confidence=True)
            chosen = commit_confident(confidence, p.threshold, schedule[step])
            canvas.commit(masked[chosen], tokens[chosen])
            d.stats.committed += chosen.numel()
        if d.emit(canvas, lo, hi):
            return


def decode_full(d: Denoiser) -> Steps:
    """LLaDA's semi-autoregressive remasking: bidirectional attention over everything, recomputed every step (the
    cache is overwritten from position 0 by every step)."""
    p, prompt, gen = d.seq.params, d.seq.prompt_ids, generated_length(d.seq)
    size, length = p.block_length, canvas_length(d.seq, "full")
    num_blocks = -(-gen // size)
    steps = max(1, p.steps // num_blocks)
    canvas = Canvas.new(prompt, length, d.mask_id)
    for block in range(num_blocks):
        lo, hi = len(prompt) + block * size, min(len(prompt) + (block + 1) * size, length)
        for step, k in enumerate(transfer_schedule(hi - lo, steps)):
            masked = canvas.masked(lo, hi)  # [m]
            if k == 0 or masked.numel() == 0:  # the reference still runs the model here, and commits nothing
                break
            d.begin_step(block, step)
            hidden = yield d.forward(canvas.tokens, 0, None)  # [L, H]
            tokens, confidence = d.predict(hidden[masked], tempered_confidence=False)
            if p.remasking == "random":
                confidence = random_confidence(masked.numel(), d.generator)
            chosen = commit_top_k(confidence, k)
            canvas.commit(masked[chosen], tokens[chosen])
            d.stats.committed += chosen.numel()
        if d.emit(canvas, lo, hi):
            return


class Denoising:
    """One diffusion request as the engine drives it: `pending` is the forward its next step needs; `resume` with
    that forward's hidden states runs the step (and any block it completes) up to the next forward. `done` once
    finished; the request's `work` then holds its DiffusionStats as a dict."""

    def __init__(self, model: CausalLM, req: Request, tokenizer, diffusion: DiffusionModel,
                 options: DiffusionOptions = DiffusionOptions(), store: ExpertStore | None = None):
        rows = options.logit_rows or logit_rows(model.shape.vocab_size)
        self.req = req
        self.length = canvas_length(req, diffusion.schedule)
        self.denoiser = Denoiser(model, req, KVCache(self.length), tokenizer, diffusion.mask_id, rows, req.generator,
                                 DiffusionStats(), _schedule(options.tau, store))
        self.steps = (decode_blocks(self.denoiser, options) if diffusion.schedule == "blocks"
                      else decode_full(self.denoiser))
        self.sparse = SparseKV(options.sparse.top_k) if options.sparse is not None else None
        self.pending: Forward | None = None
        self.done = False
        self.started: float | None = None
        self.counted = 0  # output tokens the engine has counted

    @property
    def blocks(self) -> int:
        """Blocks committed so far."""
        return self.denoiser.stats.blocks

    def start(self) -> None:
        """Run up to the first forward."""
        self.started = time.perf_counter()
        self._advance(None)

    def resume(self, hidden: torch.Tensor) -> None:
        self._advance(hidden)

    def _advance(self, hidden: torch.Tensor | None) -> None:
        try:
            with torch.inference_mode():
                self.pending = self.steps.send(hidden)
        except StopIteration:
            self.pending, self.done = None, True
        if self.done:
            stats = self.denoiser.stats
            stats.decode_time = time.perf_counter() - self.started
            self.req.work = stats.to_dict(len(self.req.output_ids))


def forward(model: CausalLM, jobs: list[Denoising]) -> list[torch.Tensor]:
    """The pending forwards of several requests (of one attn_block) in one flattened pass; their hidden states."""
    device = model.lm_head.weight.device
    works = [job.pending for job in jobs]
    slices, row = [], 0
    for job, w in zip(jobs, works, strict=True):
        slices.append(SeqSlice(job.denoiser.cache, row, w.ids.shape[0], w.start, job.sparse))
        row += w.ids.shape[0]
    positions = torch.cat([torch.arange(w.start, w.start + w.ids.shape[0]) for w in works])
    with torch.inference_mode():
        hidden = model(torch.cat([w.ids for w in works]).to(device),
                       ForwardBatch(positions.to(device), slices, attn_block=works[0].attn_block))
    return list(hidden.split([w.ids.shape[0] for w in works]))


def generate(model: CausalLM, reqs: list[Request], tokenizer, diffusion: DiffusionModel,
             options: DiffusionOptions = DiffusionOptions(), store: ExpertStore | None = None) -> dict[str, dict]:
    """Decode every request to the end, one at a time; returns each one's DiffusionStats as a dict, by request id.
    With `options.tau` set, `store` (the one the MoE layers read from) is told refresh vs reuse before every step."""
    for req in reqs:
        job = Denoising(model, req, tokenizer, diffusion, options, store)
        job.start()
        while not job.done:
            job.resume(forward(model, [job])[0])
    return {req.request_id: req.work for req in reqs}


def _schedule(tau: Tau | None, store: ExpertStore | None) -> RefreshSchedule | None:
    """A request's refresh rhythm, when there is a store to tell; tau "auto" asks the store's solver."""
    if tau is None or store is None:
        return None
    return RefreshSchedule(tau, store, getattr(store, "solve_tau", None))

