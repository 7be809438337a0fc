"""The hardware simulator against the engine on this machine: simulated vs measured decode tokens/s, for
autoregressive offloading and for TIDE's block diffusion.

    python -m bench.sim_validation [--budgets 25%,50%,100%] [--policies lru,dali] [--sequences 1] [--max-tokens 96]
        [--tide-budgets 50%,25%] [--tide-taus 8] [--diffusion-model DIR] [--reps 3] [--threads 1]
        [--out bench/results]

The live side is bench/offload_speed.py's (the same OLMoE-shaped model with its router replaying the OLMoE trace,
batch 1, cold page cache, prefetch off, medians of `--reps` interleaved runs; 100% is its all-resident baseline, every
expert read before timing). The simulated side measures this machine into a hardware profile (`tiermoe profile`'s
`measure_this_machine`: the engine's own kernels and fixed costs on micro-benchmarks of its shipped models,
tiermoe.sim.engine_probe, the RAM tier's own costs on the real stores of this checkpoint (the policies) and of the
diffusion model (TIDE), tiermoe.sim.store_probe, and the disk with random direct reads of one expert in the
checkpoint's expert file), then runs `tiermoe sim run`'s simulation of the same trace rows with the model's
config.json, the same budget and policy, no GPU and the same thread count. The machine's speed drifts by 10-40% from
one minute to the next (its cores and disk are shared), so a profile is measured before the first repetition and
after every one, and just before and just after each run the terms its price leans on most are measured again: the
engine's fixed costs of its kind (`LocalCosts`: tiermoe.sim.engine_probe's `ar_overheads`, hot and cache-cold, or
`diffusion_overheads`) and, for an offloaded run, the disk. A run of repetition i is simulated twice, with the
profile before its repetition and the measurements just before it, and with the profile after its repetition and
the measurements just after it (the disk: the mean of both); its simulated time is the mean of the two (both are in
its JSON notes), and the reported ratio is the median of the per-repetition ratios (every repetition's ratio is in
the table and the JSON). A repetition runs the autoregressive runs (all resident first, then the offloaded ones,
most CPU-bound first), then TIDE's, so that runs of one kind follow each other and the measurement after one is the
one before the next. Nothing is fitted to the measured speeds: the measurements of the machine are the only input.
Reported: both tokens/s, their ratio, and both RAM hit rates (the live run's prompt is routed by the random router,
the simulator's has none, so the hit counts differ slightly; test_machine_sim.py checks them equal when both see the
same routing).

TIDE (diffusion): bench/tide_speed.py's configuration (the shipped diffusion model unless `--diffusion-model`, 2
prompts of 32 tokens, 96 new tokens, block 32, 32 steps, threshold 0.95, a fresh engine per run, the whole
`generate` timed) at each budget and fixed tau, and all experts resident. An untimed run of each configuration
records the engine's own routing (`generate(record_trace=...)`: every denoising forward's rows) and its store's
counts; the simulator replays that trace with strategy `tide` (TIDE on the RAM tier, the engine's RefreshStore) at
the same budget and tau, or all resident. Its hits, misses and streamed experts must equal the recorded run's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.llada2_model import default_trained, prompts
from bench.offload_speed import DEFAULT_TRACE, Config, build_model, decode_stats, summarise
from bench.report import machine, markdown_table, write
from tiermoe import LLM, SamplingParams
from tiermoe.offload.tiers.budget import parse_budget
from tiermoe.offload.tiers.ram import min_budget
from tiermoe.sim.cache_cold import COLD_MIB
from tiermoe.sim.engine_probe import ar_overheads, diffusion_overheads
from tiermoe.sim.hardware import Hardware, SSDProfile, measure_disk, measure_this_machine
from tiermoe.sim.machine_sim import simulate
from tiermoe.sim.model_shape import load_shape
from tiermoe.sim.sim_config import SimConfig
from tiermoe.sim.trace import Trace


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--expert-dim", type=int, default=256)
    ap.add_argument("--budgets", default="25%,50%,100%")
    ap.add_argument("--policies", default="lru,dali")
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tide-budgets", default="50%,25%", help="TIDE: expert budgets ('' skips the TIDE part)")
    ap.add_argument("--tide-taus", default="8", help="TIDE: refresh intervals")
    ap.add_argument("--diffusion-model", type=Path, default=None, help="default: the shipped diffusion model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_sim_validation"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    trace = Trace.load(args.trace)
    args.workdir.mkdir(parents=True, exist_ok=True)
    todo = configs(args)
    live: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
    sims: dict[int, list] = {i: [] for i in range(len(todo))}
    profiles = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = build_model(Path(tmp), trace, args.hidden, args.expert_dim)
        llm = LLM(folder)
        layers = [b.layer for b in llm.model.moe_blocks]
        expert_bytes, expert_file = _expert_file(llm)
        least = min_budget(llm.index, layers, llm.model.shape.top_k, llm.config.torch_dtype)
        del llm
        shape = load_shape(folder).with_dtype("float32")
        rows = trace.select_sequences(range(args.sequences))
        tide = TideValidation(args) if _csv(args.tide_budgets) else None

        # per run: the disk measured around it (offloaded runs) and its fixed costs measured around it
        around: dict[int, list] = {i: [] for i in range(len(todo))}
        local = LocalCosts()

        def profile() -> None:
            profiles.append(measure_this_machine(read_bytes=expert_bytes, disk_file=expert_file, store_model=folder,
                                                 policies=tuple(sorted({c.policy for c in todo if c.policy}))))

        def run_ar(i: int) -> None:
            (result, ssd), costs = local.around("ar", lambda: disk_around(
                lambda: decode_stats(folder, args.trace, list(range(args.sequences)), todo[i], args.io_threads,
                                     args.max_tokens, least), (expert_file, expert_bytes) if todo[i].budget else None))
            live[i].append(result)
            around[i].append((ssd, costs))

        resident = [i for i, c in enumerate(todo) if c.budget is None]
        offloaded = sorted(set(range(len(todo))) - set(resident), key=lambda i: -_percent(todo[i].budget))
        profile()
        for _ in range(args.reps):  # each repetition's runs between two profiles (the machine drifts within minutes)
            # the autoregressive runs, all resident first, then the offloaded ones, most CPU-bound first, then
            # TIDE's: runs of one kind in a row, so that the fixed costs measured after one serve the next
            for i in resident + offloaded:
                run_ar(i)
            if tide is not None:
                tide.repetition(local)
            profile()
        for i in range(len(todo)):
            sims[i] = [bracketed(rows, shape, profiles[rep:rep + 2], ssd, sim_config(todo[i], shape, args), costs)
                       for rep, (ssd, costs) in enumerate(around[i])]
        if tide is not None:
            tide.simulate(profiles)
    expected = live[0][0]["token_ids"]
    table_rows, runs = [], []
    for i, config in enumerate(todo):
        summary = summarise(config, live[i], expected)
        ratios = [s.tokens_per_s / (r["tokens"] / r["decode_time_s"]) for s, r in zip(sims[i], live[i], strict=True)]
        sim = sims[i][_median_index(ratios)]
        n = sim.hits + sim.misses
        run = {"config": config.name, "budget": config.budget or "100%", "measured_tok_s": summary["tok_s"],
               "simulated_tok_s": statistics.median(s.tokens_per_s for s in sims[i]),
               "sim_over_measured": statistics.median(ratios), "ratios": ratios,
               "measured_hit_rate": summary["hit_rate"], "simulated_hit_rate": sim.hits / n if n else 1.0,
               "measured_mib_read": summary["mib_read"], "simulated_mib_read": sim.bytes_read / 2**20,
               "measured_times_s": summary["all_decode_times_s"],
               "local_costs": [costs for _, costs in around[i]],
               "disk_around": [asdict(ssd) if ssd else None for ssd, _ in around[i]],
               "simulated": sim.to_dict()}
        runs.append(run)
        table_rows.append([run["config"], run["budget"], run["measured_tok_s"], run["simulated_tok_s"],
                           run["sim_over_measured"], _spread(ratios), run["measured_hit_rate"],
                           run["simulated_hit_rate"], run["measured_mib_read"], run["simulated_mib_read"],
                           _within(run["sim_over_measured"])])
    table = markdown_table(["configuration", "budget", "measured tok/s", "simulated tok/s", "sim / measured",
                            "per-rep ratios", "measured hit rate", "simulated hit rate", "measured MiB read",
                            "simulated MiB read", "within 15%"], table_rows)
    table += (f"\n\nModel: OLMoE shape {trace.num_layers}x{trace.num_experts} top-{trace.top_k}, hidden {args.hidden}, "
              f"expert dim {args.expert_dim}, fp32; trace {args.trace.name}, sequences 0..{args.sequences - 1}, "
              f"{args.max_tokens} decode tokens each, batch 1, {args.threads} torch thread(s). Measured: medians of "
              f"{args.reps} interleaved runs. Simulated: a run of repetition i with the profile measured before that "
              f"repetition and the fixed costs of autoregressive decode measured just before the run, and with the "
              f"profile after the repetition and the costs measured just after the run, its time the mean of the "
              f"two (the disk measured just before and after each offloaded run, random reads of one expert in the "
              f"checkpoint's expert file); sim / measured is the median of the per-repetition ratios, simulated "
              f"tok/s the median of the simulated runs. The store's costs (tiermoe.sim.store_probe, on this "
              f"checkpoint for the policies, on the diffusion model for TIDE) per kind as request / expert / read "
              f"(+ I/O thread) / eviction / refresh us, x the compute's slowdown beside its reads (policies: an "
              f"expert computed while reads are in flight). Profiles: {_profiles_line(profiles)}.")
    if tide is not None:
        table += "\n\n" + tide_table(tide.results(), args)
    write(args.out, "sim_validation", {"machine": machine(), "profiles": [hw.to_dict() for hw in profiles],
                                       "runs": runs, "tide": tide.results() if tide else []}, table)


def disk_around(run, disk: tuple[Path, int] | None):
    """(run(), the disk measured just before and just after it, reading one expert of `disk` = (file, bytes) at a
    time, as the mean of the two: rates by their time per byte); no disk measured with `disk` None."""
    if disk is None:
        return run(), None
    before = measure_disk(*disk)
    result = run()
    return result, mean_disk(before, measure_disk(*disk))


def mean_disk(a: SSDProfile, b: SSDProfile) -> SSDProfile:
    """The disk between two measurements: fixed times averaged, rates by their time per byte (or per read)."""
    rates = ("seq_read_gbs", "rand_read_gbs", "read_iops", "rand_read_qd1_gbs")
    return replace(a, **{f: (2 / (1 / getattr(a, f) + 1 / getattr(b, f)) if f in rates
                             else (getattr(a, f) + getattr(b, f)) / 2)
                         for f in (*rates, "read_latency_us", "read_latency_qd1_us")})


class LocalCosts:
    """The engine's fixed costs a run's price leans on most (tiermoe.sim.engine_probe: `ar_overheads`, hot and
    cache-cold, for an autoregressive run, `diffusion_overheads` for a diffusion run), measured again just before
    and just after the run: the machine's speed moves within the minutes between two profiles. Runs of one kind in a
    row share a measurement (the one after a run is the one before the next)."""

    def __init__(self):
        self.last: tuple[str, dict] | None = None  # (kind, costs) measured since the last run

    def around(self, kind: str, run):
        """(run(), (the costs before, the costs after))."""
        before = self.last[1] if self.last and self.last[0] == kind else self.measure(kind)
        result = run()
        self.last = (kind, self.measure(kind))
        return result, (before, self.last[1])

    @staticmethod
    def measure(kind: str) -> dict:
        if kind == "ar":
            return {"engine": ar_overheads(), "engine_cold": ar_overheads(cold_mib=COLD_MIB)}
        return {"engine": diffusion_overheads()}


def with_costs(hw: Hardware, costs: dict) -> Hardware:
    """`hw` with the fixed costs in `costs` (a `LocalCosts.measure`) in place of its own."""
    cpu = hw.cpu
    return replace(hw, cpu=replace(cpu, **{k: {**getattr(cpu, k), **v} for k, v in costs.items()}))


def bracketed(trace, shape, pair, ssd, cfg: SimConfig, costs: tuple[dict, dict]):
    """A run simulated with the profiles measured just before and just after its repetition, each with the fixed
    costs measured just before and just after the run (`costs`) in place of the profile's, and the disk measured
    around the run (`ssd`, when it reads), its time the mean of the two; both kept in its notes."""
    pair = [with_costs(hw, c) for hw, c in zip(pair, costs, strict=True)]
    a, b = (simulate(trace, shape, replace(hw, ssd=ssd) if ssd else hw, cfg) for hw in pair)
    seconds = (a.seconds + b.seconds) / 2
    return replace(a, seconds=seconds, tokens_per_s=a.tokens / seconds if seconds else 0.0,
                   notes=[*a.notes, f"tok/s with the profile before / after: {a.tokens_per_s:.4g} / "
                                    f"{b.tokens_per_s:.4g}"])


def _expert_file(llm: LLM) -> tuple[int, Path]:
    """(bytes of one expert, the file holding the first one): the disk is measured reading that file."""
    spec = llm.index.expert(*next(iter(llm.index.experts())))
    return spec.nbytes, Path(spec.parts[0].file)


def _percent(budget: str) -> float:
    return float(budget.rstrip("%")) if budget.endswith("%") else 0.0


def _median_index(values: list[float]) -> int:
    return sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]


def _spread(ratios: list[float]) -> str:
    return " ".join(f"{r:.2f}" for r in ratios)


def _within(ratio: float) -> str:
    return "yes" if abs(ratio - 1) <= 0.15 else "**no**"


def _profiles_line(profiles) -> str:
    return "; ".join(f"GEMV {hw.cpu.gemv_gbs[1]:.1f} GB/s, disk {hw.ssd.rand_read_gbs} GB/s (4 in flight), "
                     f"store {_store_line(hw.cpu.store or {})}" for hw in profiles)


def _store_line(store: dict) -> str:
    """The RAM tier's measured costs per kind: request / expert / read (+ I/O thread) / eviction / refresh, us, and
    x the model's compute slowdown while its reads are in flight (policies)."""
    return ", ".join(f"{kind} {c['request_us']:.0f}/{c['key_us']:.0f}/{c['read_us']:.0f}+{c['load_us']:.0f}/"
                     f"{c['evict_us']:.0f}/{c['refresh_us']:.0f}"
                     + (f" x{c['read_slowdown']:.2f}" if "read_slowdown" in c else "") for kind, c in store.items())


def tide_configs(args) -> list[tuple[str, dict]]:
    """(name, engine options) of the TIDE part: all resident, then every budget at every tau."""
    return [("all-resident", {})] + [(f"{b} tide tau={t}", {"expert_cache": b, "tau": int(t)})
                                     for b in _csv(args.tide_budgets) for t in _csv(args.tide_taus)]


def tide_run(folder: Path, ids: list[list[int]], params: SamplingParams, options: dict,
             record: Path | None = None) -> dict:
    """One generate on a fresh engine (all-resident: every expert read first): seconds, tokens, the store's counts;
    with `record`, the routing trace written there (then untimed: recording costs time)."""
    llm = LLM(folder, **options)
    if not options:
        for layer, e in llm.index.experts():
            list(llm.store.fetch(layer, [e]))
    start = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=False, record_trace=record)
    seconds = time.perf_counter() - start
    stats = llm.store.stats
    out = {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "hits": stats.total.hits,
           "misses": stats.total.misses, "streamed": stats.streamed, "budget_bytes": getattr(llm.store, "budget", 0),
           "token_ids": [o.outputs[0].token_ids for o in outs], "dtype": str(llm.config.torch_dtype)}
    llm.store.close()
    return out


class TideValidation:
    """The TIDE part: each configuration's routing recorded once (untimed), then per repetition every configuration
    timed (the fixed costs of diffusion measured around each run, and the disk around an offloaded run, reads of
    one of this model's experts in its expert file), and once all are measured simulated between the profiles
    around its repetition."""

    def __init__(self, args):
        self.args, self.folder = args, args.diffusion_model or default_trained()
        if self.folder is None:
            raise SystemExit("no diffusion model ships with this install: pass --diffusion-model DIR")
        self.params = SamplingParams(temperature=0, max_tokens=96, block_length=32, steps=32, threshold=0.95,
                                     ignore_eos=True)
        probe = LLM(self.folder)
        self.ids = prompts(probe, 2, 32)
        self.expert_bytes, self.expert_file = _expert_file(probe)
        del probe
        self.todo = tide_configs(args)
        self.recorded = {}
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            for name, options in self.todo:  # untimed: the routing and the store's counts of each configuration
                path = Path(tmp) / name.replace(" ", "_").replace("%", "pct").replace("=", "")
                self.recorded[name] = (tide_run(self.folder, self.ids, self.params, options, path), Trace.load(path))
        self.timed: dict[str, list[tuple[dict, object]]] = {name: [] for name, _ in self.todo}

    def repetition(self, local: LocalCosts) -> None:
        for name, options in self.todo:
            disk = (self.expert_file, self.expert_bytes) if options else None
            (result, ssd), costs = local.around("diffusion", lambda options=options, disk=disk: disk_around(
                lambda: tide_run(self.folder, self.ids, self.params, options), disk))
            self.timed[name].append((result, ssd, costs))

    def simulate(self, profiles: list) -> None:
        """Each timed run simulated between the profiles around its repetition (`bracketed`)."""
        self.sims = {name: [bracketed(self.recorded[name][1], self._shape(), profiles[rep:rep + 2], ssd,
                                      self._cfg(options), costs)
                            for rep, (_, ssd, costs) in enumerate(self.timed[name])]
                     for name, options in self.todo}

    def _shape(self):
        return load_shape(self.folder).with_dtype(self.recorded["all-resident"][0]["dtype"].removeprefix("torch."))

    def _cfg(self, options: dict) -> SimConfig:
        threads = self.args.threads
        if not options:
            return SimConfig("tiermoe", gpu_memory=0, expert_cache=self._shape().total_expert_bytes, threads=threads,
                             preload=True)
        budget = self.recorded[next(n for n, o in self.todo if o is options)][0]["budget_bytes"]
        return SimConfig("tide", gpu_memory=0, expert_cache=budget, tau=options["tau"], threads=threads)

    def results(self) -> list[dict]:
        """Measured (medians of the repetitions) against simulated (median of the per-repetition ratios)."""
        expected = self.recorded["all-resident"][0]["token_ids"]
        out = []
        for name, options in self.todo:
            live, trace = self.recorded[name]
            runs, sims = [r for r, _, _ in self.timed[name]], self.sims[name]
            ratios = [s.tokens_per_s / (r["tokens"] / r["seconds"]) for r, s in zip(runs, sims, strict=True)]
            sim = sims[_median_index(ratios)]
            mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
            counts = (sim.hits, sim.misses, sim.streamed)
            out.append({"config": name, "budget": options.get("expert_cache", "100%"), "tau": options.get("tau"),
                        "measured_tok_s": mid["tokens"] / mid["seconds"],
                        "simulated_tok_s": statistics.median(s.tokens_per_s for s in sims),
                        "sim_over_measured": statistics.median(ratios), "ratios": ratios,
                        "measured_times_s": [r["seconds"] for r in runs],
                        "local_costs": [costs for _, _, costs in self.timed[name]],
                        "live": {k: live[k] for k in ("hits", "misses", "streamed")},
                        "simulated_counts": dict(zip(("hits", "misses", "streamed"), counts, strict=True)),
                        "counts_equal": counts == (live["hits"], live["misses"], live["streamed"]),
                        "same_tokens": all(r["token_ids"] == expected for r in [live, *runs]),
                        "model": str(Path(self.folder).name), "forwards": int(trace.meta.get("forwards", 0)),
                        "simulated": sim.to_dict()})
        return out


def tide_table(rows: list[dict], args) -> str:
    table = markdown_table(
        ["TIDE configuration", "measured tok/s", "simulated tok/s", "sim / measured", "per-rep ratios",
         "live hits / misses / streamed", "simulated hits / misses / streamed", "counts equal", "same tokens",
         "within 15%"],
        [[r["config"], r["measured_tok_s"], r["simulated_tok_s"], r["sim_over_measured"], _spread(r["ratios"]),
          "{hits} / {misses} / {streamed}".format(**r["live"]),
          "{hits} / {misses} / {streamed}".format(**r["simulated_counts"]), "yes" if r["counts_equal"] else "**no**",
          "yes" if r["same_tokens"] else "**no**", _within(r["sim_over_measured"])] for r in rows])
    return table + (f"\n\nTIDE: model {rows[0]['model']}, bench/tide_speed.py's setting (2 prompts of 32 tokens, 96 "
                    f"new tokens, block 32, 32 steps, threshold 0.95; {rows[0]['forwards']} batched forwards), a fresh "
                    f"engine per run, the whole generate timed; medians of {args.reps} interleaved runs. Simulated: "
                    "the engine's own routing recorded in an untimed run of the same configuration, replayed with "
                    "strategy tide (the RAM tier placed by TIDE's refresh) at the same budget and tau, a run of "
                    "repetition i between the profiles before and after it (above) with the fixed costs of diffusion "
                    "measured just before and after the run (the disk too around each offloaded run, reads of one of "
                    "this model's experts), sim / measured the median of the per-repetition ratios.")


def configs(args) -> list[Config]:
    out = []
    for budget in _csv(args.budgets):
        if budget == "100%":
            out.append(Config("all-resident", None))
        else:
            out += [Config(policy, budget, policy) for policy in _csv(args.policies)]
    return out


def sim_config(config: Config, shape, args) -> SimConfig:
    budget = shape.total_expert_bytes if config.budget is None else parse_budget(config.budget,
                                                                                 shape.total_expert_bytes)
    return SimConfig("tiermoe", gpu_memory=0, expert_cache=budget, cache_policy=config.policy or "lru",
                     threads=args.threads, max_tokens=args.max_tokens, preload=config.budget is None)


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


if __name__ == "__main__":
    main()
