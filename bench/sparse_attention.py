"""Head-centric sparse attention (--sparse-attention top_k=N, tiermoe.models.sparse_attention) against dense: speed
of the light denoising steps at long prefixes, and the quality it costs.

    python -m bench.sparse_attention [--part speed|quality|all] [--prefixes 512 1024 2048] [--top-k 64 128 256]
        [--reps 15] [--heavy-reps 3] [--quality-prefixes 64 128 256 384] [--quality-top-k 16 32 64 128 256]
        [--prompts 8] [--windows 24] [--draws 4] [--experts 64] [--out bench/results]

Results: sparse_attention_speed.{json,md,png} (run under the exclusive CPU lock) and
sparse_attention_quality.{json,md,png} (no timing).

Speed, on the random llada2_moe shaped like LLaDA2.0-mini (bench/llada2_model.py: hidden 512, 8 query / 2 KV heads of
64, top-8 experts of 128 plus a shared one, 6 layers; --experts routed experts per layer, 64 by default to keep the
checkpoint small: a row's compute does not depend on it), fp32, block 32: per prefix length P, the heavy step (the
block's first: rows [0, P + 32) over everything, dense; it makes each variant's selection) timed `--heavy-reps`
times, then the light step (the block's 32 rows at past = P) `--reps` times per variant, variants interleaved in a
new shuffled order every repetition; medians. The attention op alone is timed the same way at LLaDA2.0-mini's real
head shape (16 query, 4 KV heads of 128): dense `attend` against the kept-prefix attention.

Quality, on the shipped trained diffusion model (max 512 positions, so prefixes up to 384 + 64 generated; NOTE: it
was trained on 128-token sequences, so past 128 positions dense attention is itself off its training distribution,
and keeping fewer positions can lower the loss there), with text
the model was not trained on: tiermoe/assets/calibration.txt, the opening of The Winter's Tale, which is the held-out
validation work of that model's training (training_report.json; the file is otherwise used only to calibrate expert
prefetch and placement, which do not change outputs).
- agreement: greedy generation of 64 tokens (2 blocks, 32 steps, threshold 0.95, EOS ignored) from `--prompts`
  consecutive windows of P tokens, sparse against dense: the share of generated positions holding dense's token, and
  the share of requests whose whole output equals dense's. Positional agreement compounds: one different commit
  changes the order of every later one.
- masked-token loss: `--windows` further windows of P + 32 tokens, each with `--draws` masks; the heavy step sees the
  block fully masked (as a block's first step does), the light step sees a fraction r ~ U(0.1, 0.9) of it masked
  (seeded, the same draws for every variant); cross-entropy (nats) of the masked positions' true tokens, dense and
  sparse, and the share of masked positions whose most likely token is dense's (one step: no cascade).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.llada2_model import CALIBRATION, Scale, build_random
from bench.report import machine, markdown_table, write
from tiermoe import LLM, SamplingParams
from tiermoe.decode.kv_cache import KVCache
from tiermoe.models.layers import ForwardBatch, SeqSlice, attend
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL
from tiermoe.models.sparse_attention import SparseKV, attend_kept, select

BLOCK = 32


def forward(model, ids: list[int], past: int, cache: KVCache, sparse: SparseKV | None) -> torch.Tensor:
    """ids at positions [past, past + len(ids)) over `cache`: hidden states [len(ids), H]."""
    with torch.inference_mode():
        batch = ForwardBatch(torch.arange(past, past + len(ids)), [SeqSlice(cache, 0, len(ids), past, sparse)],
                             attn_block=BLOCK)
        return model(torch.tensor(ids), batch)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(variants: dict[str, object], reps: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of each variant's callable over `reps` rounds, each round in a new shuffled order, after one
    untimed warm-up round (a first run at new shapes was 3x slower)."""
    rng, times = random.Random(seed), {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(reps):
        for name in rng.sample(list(variants), len(variants)):
            times[name].append(timed(variants[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def light_step_speed(model, vocab: int, P: int, top_ks: list[int], reps: int, heavy_reps: int) -> list[dict]:
    """At prefix P: the heavy and the light step's median times per variant (each heavy run selects anew)."""
    ids = torch.randint(0, vocab - 2, (P + BLOCK,), generator=torch.Generator().manual_seed(P)).tolist()
    cache = KVCache(P + BLOCK)
    stores = {"dense": None} | {f"top_k={k}": SparseKV(k) for k in top_ks}
    heavy = interleaved({name: partial(forward, model, ids, 0, cache, s) for name, s in stores.items()}, heavy_reps,
                        seed=P)
    light = interleaved({name: partial(forward, model, ids[P:], P, cache, s) for name, s in stores.items()}, reps,
                        seed=P + 1)
    return [{"prefix": P, "variant": name, "light_ms": light[name] * 1e3, "heavy_ms": heavy[name] * 1e3,
             "light_speedup": light["dense"] / light[name]} for name in stores]


def attention_op_speed(P: int, top_ks: list[int], reps: int, heads: int = 16, kv_heads: int = 4,
                       dim: int = 128) -> list[dict]:
    """The light step's attention alone at LLaDA2.0-mini's head shape: dense over P + 32 keys vs the kept N + 32."""
    g = torch.Generator().manual_seed(P)
    S = P + BLOCK
    q = torch.randn(S, heads, dim, generator=g)  # [S, h, d]
    k, v = torch.randn(S, kv_heads, dim, generator=g), torch.randn(S, kv_heads, dim, generator=g)  # [S, g, d]
    rows = q[P:]  # [32, h, d] the block's rows
    variants = {"dense": partial(attend, rows, k, v, P, None, BLOCK)}
    for n in top_ks:
        variants[f"top_k={n}"] = partial(attend_kept, rows, select(q, k, v, 0, None, BLOCK, n), k[P:], v[P:], None)
    with torch.inference_mode():
        t = interleaved(variants, reps, seed=P)
    return [{"prefix": P, "variant": name, "attention_us": t[name] * 1e6, "speedup": t["dense"] / t[name]}
            for name in variants]


def token_windows(llm, length: int, count: int, skip: int) -> list[list[int]]:
    ids = llm.tokenizer.encode(CALIBRATION.read_text())[skip:]
    if len(ids) < count * length:
        raise SystemExit(f"{CALIBRATION} holds {len(ids)} tokens after {skip}: too few for {count} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def agreement(folder: Path, prefixes: list[int], top_ks: list[int], n: int) -> list[dict]:
    """Greedy tokens of sparse variants against dense, per prefix length."""
    params = SamplingParams(temperature=0, max_tokens=2 * BLOCK, block_length=BLOCK, steps=32, ignore_eos=True)
    variants = [None] + [f"top_k={k}" for k in top_ks]
    outputs = {}
    for spec in variants:
        llm = LLM(folder, sparse_attention=spec)
        for P in prefixes:
            prompts = [{"prompt_token_ids": w} for w in token_windows(llm, P, n, 0)]
            outputs[spec, P] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    rows = []
    for P in prefixes:
        dense = outputs[None, P]
        for spec in variants[1:]:
            same = [sum(a == b for a, b in zip(s, d, strict=True)) / len(d) for s, d in zip(outputs[spec, P], dense,
                                                                                          strict=True)]
            rows.append({"prefix": P, "variant": spec, "token_agreement": statistics.mean(same),
                         "identical_outputs": sum(x == 1.0 for x in same) / len(same)})
    return rows


def masked_logits(llm, window: list[int], rate: float, seed: int,
                  sparse: SparseKV | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy step over the prefix and the block fully masked, light step over the block masked at `rate`: the
    light step's logits of the masked positions [m, V] and their true tokens [m]."""
    P, mask_id = len(window) - BLOCK, llm.diffusion.mask_id
    masked = torch.randperm(BLOCK, generator=torch.Generator().manual_seed(seed))[:max(1, round(rate * BLOCK))]
    block = torch.tensor(window[P:])  # [32]
    noisy = block.clone()
    noisy[masked] = mask_id
    cache = KVCache(len(window))
    forward(llm.model, window[:P] + [mask_id] * BLOCK, 0, cache, sparse)
    hidden = forward(llm.model, noisy.tolist(), P, cache, sparse)  # [32, H]
    with torch.inference_mode():
        return llm.model.logits(hidden[masked]), block[masked]


def loss(folder: Path, prefixes: list[int], top_ks: list[int], windows: int, draws: int, skip: int) -> list[dict]:
    """Per prefix length and variant over held-out windows: the light step's masked-token loss, and how often its
    most likely token at a masked position is dense's (one step, no cascade through later commits)."""
    llm = LLM(folder)
    rng = random.Random(0)
    rows = []
    for P in prefixes:
        texts = [w for w in token_windows(llm, P + BLOCK, windows, skip) for _ in range(draws)]
        rates = [rng.uniform(0.1, 0.9) for _ in texts]
        dense = [masked_logits(llm, w, r, i, None) for i, (w, r) in enumerate(zip(texts, rates, strict=True))]
        dense_loss = F.cross_entropy(torch.cat([lg for lg, _ in dense]), torch.cat([t for _, t in dense])).item()
        rows.append({"prefix": P, "variant": "dense", "masked_loss": dense_loss, "loss_delta": 0.0,
                     "argmax_agreement": 1.0, "masked_tokens": sum(t.numel() for _, t in dense)})
        for k in top_ks:
            runs = [masked_logits(llm, w, r, i, SparseKV(k)) for i, (w, r) in enumerate(zip(texts, rates, strict=True))]
            logits, truth = torch.cat([lg for lg, _ in runs]), torch.cat([t for _, t in runs])
            same = logits.argmax(-1) == torch.cat([lg for lg, _ in dense]).argmax(-1)
            value = F.cross_entropy(logits, truth).item()
            rows.append({"prefix": P, "variant": f"top_k={k}", "masked_loss": value, "loss_delta": value - dense_loss,
                         "argmax_agreement": same.float().mean().item(), "masked_tokens": truth.numel()})
    return rows


def figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))


def plot_speed(result: dict, path: Path) -> None:
    fig, axes = figure(2)
    for ax, key, unit, title in ((axes[0], "light_step", "light_ms", "light denoising step, random mini model (ms)"),
                                 (axes[1], "attention_op", "attention_us", "its attention, LLaDA2.0-mini heads (us)")):
        for name in dict.fromkeys(r["variant"] for r in result[key]):
            pts = [r for r in result[key] if r["variant"] == name]
            ax.plot([r["prefix"] for r in pts], [r[unit] for r in pts], marker="o", label=name)
        ax.set(xlabel="prefix tokens", ylabel="median time", title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_quality(result: dict, path: Path) -> None:
    fig, (a, b) = figure(2)
    for P in dict.fromkeys(r["prefix"] for r in result["agreement"]):
        greedy = [r for r in result["agreement"] if r["prefix"] == P]
        line, = a.plot([top_k(r) for r in greedy], [r["token_agreement"] for r in greedy], marker="o",
                       label=f"prefix {P}, greedy output")
        step = [r for r in result["loss"] if r["prefix"] == P and r["variant"] != "dense"]
        a.plot([top_k(r) for r in step], [r["argmax_agreement"] for r in step], marker="x", linestyle="--",
               color=line.get_color(), label=f"prefix {P}, one step")
        b.plot([top_k(r) for r in step], [r["loss_delta"] for r in step], marker="o", label=f"prefix {P}")
    a.set(xlabel="top_k", ylabel="tokens equal to dense's", title="agreement, shipped model")
    b.set(xlabel="top_k", ylabel="masked-token loss - dense (nats)", title="loss, held-out text")
    ticks = sorted({top_k(r) for r in result["agreement"]})
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    a.legend(fontsize=7)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def top_k(row: dict) -> int:
    return int(row["variant"].split("=")[1])


def speed_table(result: dict) -> str:
    light = markdown_table(["prefix", "variant", "light step ms", "light speedup", "heavy step ms"],
                           [[r["prefix"], r["variant"], r["light_ms"], r["light_speedup"], r["heavy_ms"]]
                            for r in result["light_step"]])
    op = markdown_table(["prefix", "variant", "attention us", "speedup"],
                        [[r["prefix"], r["variant"], r["attention_us"], r["speedup"]] for r in result["attention_op"]])
    return (f"Light denoising step (block 32 over a prefix), {result['model']}; fp32, medians of {result['reps']} "
            f"interleaved runs (heavy step: {result['heavy_reps']}):\n\n{light}\n\nThe light step's attention "
            f"alone, LLaDA2.0-mini's head shape (16 query, 4 KV heads of 128):\n\n{op}\n\n"
            f"Command: `{result['command']}`")


def quality_table(result: dict) -> str:
    rows = [[a["prefix"], a["variant"], a["token_agreement"], a["identical_outputs"], lo["argmax_agreement"],
             lo["masked_loss"], lo["loss_delta"]] for a in result["agreement"] for lo in result["loss"]
            if (lo["prefix"], lo["variant"]) == (a["prefix"], a["variant"])]
    dense = {r["prefix"]: round(r["masked_loss"], 3) for r in result["loss"] if r["variant"] == "dense"}
    headers = ["prefix", "variant", "greedy tokens = dense", "outputs = dense", "one-step argmax = dense",
               "masked loss", "loss - dense"]
    return (f"Shipped diffusion model, held-out text ({result['text']}); dense masked-token loss per prefix: "
            f"{dense}\n\n{markdown_table(headers, rows)}\n\nCommand: `{result['command']}`")


SPEED_FLAGS = ("prefixes", "top_k", "reps", "heavy_reps", "experts")
QUALITY_FLAGS = ("quality_prefixes", "quality_top_k", "prompts", "windows", "draws")


def command(args: argparse.Namespace, part: str, names: tuple[str, ...]) -> str:
    """The command that reruns one part with these settings."""
    values = {name: getattr(args, name) for name in names}
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in values.items())
    return f"python -m bench.sparse_attention --part {part} {flags}"


def run_speed(args: argparse.Namespace) -> None:
    scale = Scale(experts=args.experts)
    llm = LLM(build_random(args.workdir / f"llada2-mini-scaled-{args.experts}", scale))
    vocab = llm.model.shape.vocab_size
    result = {"machine": machine(), "command": command(args, "speed", SPEED_FLAGS), "reps": args.reps,
              "heavy_reps": args.heavy_reps,
              "model": f"random llada2_moe shaped like LLaDA2.0-mini scaled down ({scale})",
              "light_step": [row for P in args.prefixes
                             for row in light_step_speed(llm.model, vocab, P, args.top_k, args.reps, args.heavy_reps)],
              "attention_op": [row for P in args.prefixes for row in attention_op_speed(P, args.top_k, args.reps)]}
    write(args.out, "sparse_attention_speed", result, speed_table(result))
    plot_speed(result, args.out / "sparse_attention_speed.png")


def run_quality(args: argparse.Namespace) -> None:
    skip = args.prompts * max(args.quality_prefixes)  # the loss windows follow the agreement prompts
    result = {"machine": machine(), "command": command(args, "quality", QUALITY_FLAGS),
              "text": f"{CALIBRATION.name}: The Winter's Tale, held out from the shipped model's training",
              "agreement": agreement(DEFAULT_DIFFUSION_MODEL, args.quality_prefixes, args.quality_top_k, args.prompts),
              "loss": loss(DEFAULT_DIFFUSION_MODEL, args.quality_prefixes, args.quality_top_k, args.windows, args.draws,
                           skip)}
    write(args.out, "sparse_attention_quality", result, quality_table(result))
    plot_quality(result, args.out / "sparse_attention_quality.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["speed", "quality", "all"], default="all",
                    help="speed needs the exclusive CPU; quality (no timing) does not")
    ap.add_argument("--prefixes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--top-k", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--reps", type=int, default=15, help="timed runs of each light step (and attention op)")
    ap.add_argument("--heavy-reps", type=int, default=3, help="timed runs of each heavy step")
    ap.add_argument("--quality-prefixes", type=int, nargs="+", default=[64, 128, 256, 384])
    ap.add_argument("--quality-top-k", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--prompts", type=int, default=8, help="agreement: prompts per prefix length")
    ap.add_argument("--windows", type=int, default=24, help="loss: windows per prefix length")
    ap.add_argument("--draws", type=int, default=4, help="loss: masks drawn per window")
    ap.add_argument("--experts", type=int, default=64, help="routed experts per layer of the random speed model")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_sparse"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.part in ("speed", "all"):
        run_speed(args)
    if args.part in ("quality", "all"):
        run_quality(args)


if __name__ == "__main__":
    main()
