"""What the run was measured on, and its output: peers.json, peers.md (tables), peers.png (plot)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench.report import machine, markdown_table, write

ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_bf16", "amx_tile", "amx_int8", "avx_vnni")  # what decides kernels' speed, of /proc/cpuinfo's list
PACKAGES = ("torch", "transformers", "accelerate", "llama-cpp-python", "gguf", "tokenizers", "safetensors")


def environment(argv: list[str]) -> dict:
    """Machine, ISA flags, package versions, git commit and the command line."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    return {"machine": machine(), "loadavg": loadavg(), "cpu_flags": [f for f in ISA_FLAGS if f in flags],
            "versions": versions,
            "tiermoe_commit": commit, "command": shlex.join(["python", "-m", "bench.peers", *argv]),
            "python": sys.version.split()[0]}


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy a shared machine was around a part."""
    path = Path("/proc/loadavg")
    return [float(x) for x in path.read_text().split()[:3]] if path.exists() else None


def describe_environment(env: dict) -> str:
    m, v = env["machine"], env["versions"]
    return (f"CPU: {m['cpu']} ({m['cores']} cores; {' '.join(env['cpu_flags']) or 'no AVX'}), RAM {m['ram_gib']} GiB\n"
            f"Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x) + f", tiermoe {env['tiermoe_commit']}\n"
            f"Command: {env['command']}")


def resident_table(rows: list[dict], checks: list[dict]) -> str:
    check_of = {(c["engine"], c["dtype"]): c for c in checks}
    out = []
    for r in rows:
        d, p = r["decode_tok_s"], r["prefill_tok_s"]
        c = check_of.get((r["engine"], r["dtype"]))
        tokens = "reference" if c is None else "identical" if c["identical"] else f"{c['agreement_pct']:.0f}% agree"
        if c and c["must_match"] and not c["identical"]:
            tokens = f"DIFFERENT, must be identical ({tokens})"
        out.append([r["engine"], r["dtype"], _num(d and d["median"]), _range(d), _num(p and p["median"]),
                    f"{r['load_s']:.1f}", f"{r['peak_rss_bytes'] / 2**20:.0f}", r["runs"], tokens])
    return markdown_table(["engine", "dtype", "decode tok/s (median)", "min-max", "prefill tok/s", "load s",
                           "peak RSS MiB", "runs", "tokens vs transformers"], out)


def memory_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        status = "OOM-killed" if r["oom_killed"] else ("failed" if r["decode_tok_s"] is None else "ok")
        same = {True: "yes", False: "no", None: "-"}[r["same_tokens_as_resident"]]
        out.append([f"{r['limit_pct']:.0f}% ({r['limit_bytes'] / 2**20:.0f} MiB)", r["engine"], r["setting"],
                    _num(r["decode_tok_s"]), _num(r["prefill_tok_s"]), _mib(r["group_peak_bytes"]),
                    _mib(r["read_bytes"]), status, same, _notes(r)])
    return markdown_table(["limit", "engine", "weights", "decode tok/s", "prefill tok/s", "peak MiB (cgroup)",
                           "MiB read", "status", "same tokens as resident", "notes"], out)


def _notes(row: dict) -> str:
    """Engine facts of a limited run: tiermoe's hit rate, accelerate's placement, OOM-killed tries before it."""
    extra, notes = row["extra"] or {}, []
    if "hit_rate" in extra:
        notes.append(f"expert hit rate {extra['hit_rate']:.2f}")
    if plan := extra.get("memory"):  # how tiermoe split the limit
        notes.append(f"fixed {plan['fixed'] / 2**20:.0f} MiB (runtime {plan['runtime'] / 2**20:.0f}, weights "
                     f"{plan['weights'] / 2**20:.0f}, KV {plan['kv_cache'] / 2**20:.0f}, activations "
                     f"{plan['activations'] / 2**20:.0f}, reads {plan['read_buffers'] / 2**20:.0f}, margin "
                     f"{plan['margin'] / 2**20:.0f})")
    if bound := row.get("disk_bound"):  # tiermoe's decode against the disk
        notes.append(f"decode reads {bound['bytes_per_token'] / 2**20:.0f} MiB/token: disk bound "
                     f"{bound['tok_s']:.2f} tok/s at {bound['bandwidth'] / 1e6:.0f} MB/s, {bound['reached']:.2f} of it")
    if "modules_on_disk" in extra:
        notes.append(f"{extra['modules_on_disk']} of {extra['modules_on_disk'] + extra['modules_on_cpu']} "
                     "modules on disk")
    if row["attempts"] > 1:
        notes.append(f"{row['attempts'] - 1} larger setting(s) OOM-killed first")
    return "; ".join(notes) or "-"


def save(out_dir: Path, name: str, result: dict, label: str | None) -> None:
    """peers.json + peers.md (environment, tables) + peers.png."""
    parts = [f"**{label}**\n" if label else "", describe_environment(result["environment"]).replace("\n", "  \n"),
             "", _model_line(result["model"])]
    if result.get("resident"):
        resident = result["resident"]
        parts += ["", f"### (a) Resident decode, batch 1, greedy{_load(resident)}", "",
                  resident_table(resident["rows"], resident["checks"])]
    if result.get("memory"):
        parts += ["", f"### (b) Equal memory: cgroup limit, cold page cache{_load(result['memory'])}", "",
                  memory_table(result["memory"]["rows"])]
        if disk := result["memory"].get("disk_bandwidth"):
            parts += ["", "Disk, cold direct reads of whole experts (before, after the runs): " + "; ".join(
                ", ".join(f"{k} at once {v / 1e6:.0f} MB/s" for k, v in d.items()) for d in disk)
                + ". The disk bound of tiermoe's decode is its missed bytes per token over the best of these."]
    if result.get("notes"):
        parts += ["", *[f"- {n}" for n in result["notes"]]]
    write(out_dir, name, {"machine": result["environment"]["machine"], **result}, "\n".join(parts))
    plot(result, out_dir / f"{name}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("resident", "memory") if result.get(k)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        (_plot_resident if panel == "resident" else _plot_memory)(ax, result[panel]["rows"])
    label = f" ({result['label']})" if result.get("label") else ""
    fig.suptitle(f"{result['model']['shape']} ({result['model']['params'] / 1e9:.2f}B params), "
                 f"{result['environment']['machine']['cpu']}, {result['model']['threads']} threads{label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_resident(ax, rows: list[dict]) -> None:
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    width = 0.8 / len(dtypes)
    for j, dtype in enumerate(dtypes):
        xs, ys, lo, hi = [], [], [], []
        for i, engine in enumerate(engines):
            r = next((r for r in rows if r["engine"] == engine and r["dtype"] == dtype and r["decode_tok_s"]), None)
            if r:
                d = r["decode_tok_s"]
                xs.append(i + j * width)
                ys.append(d["median"])
                lo.append(d["median"] - d["min"])
                hi.append(d["max"] - d["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=dtype)
    ax.set_xticks([i + width * (len(dtypes) - 1) / 2 for i in range(len(engines))], engines)
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_title("(a) resident, batch 1")
    ax.legend()


def _plot_memory(ax, rows: list[dict]) -> None:
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        ok = [r for r in mine if r["decode_tok_s"]]
        line = ax.plot([r["limit_pct"] for r in ok], [r["decode_tok_s"] for r in ok], marker="o", label=engine)
        failed = [r["limit_pct"] for r in mine if not r["decode_tok_s"]]
        if failed:  # at the bottom edge: x in data, y in axes coordinates
            ax.scatter(failed, [0.03] * len(failed), marker="x", s=60, color=line[0].get_color(),
                       transform=ax.get_xaxis_transform(), label=f"{engine}: OOM-killed/failed", clip_on=False)
    ax.set_yscale("log")
    ax.set_xlabel("memory limit, % of the model's bytes")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("(b) equal memory, cold start")
    ax.legend(fontsize=8)


def _model_line(model: dict) -> str:
    return (f"Model: random {model['shape']} ({model['params'] / 1e9:.2f}B params, {model['bytes'] / 2**20:.0f} MiB "
            f"bf16 safetensors), prompt {model['prompt_tokens']} tokens, {model['threads']} threads.")


def _load(part: dict) -> str:
    return f" (load average at its end: {part['loadavg_after'][0]:.1f})" if part.get("loadavg_after") else ""


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _range(d: dict | None) -> str:
    return "-" if d is None else f"{d['min']:.3g}-{d['max']:.3g}"


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"
