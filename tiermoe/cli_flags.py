"""The flag groups commands share: the model and engine, sampling, and output."""

from __future__ import annotations

import argparse

DIFFUSION_DEFAULTS = {"block_length": 32, "steps": 32, "threshold": 0.95, "remasking": "low_confidence"}


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def _sparse_attention(text: str):
    from tiermoe.errors import ConfigError
    from tiermoe.models.sparse_spec import SparseAttention

    try:
        return SparseAttention.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags every command that loads a model shares."""
    p.add_argument("--model", default=None, help="Hugging Face model folder (default: the built-in model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute dtype")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--expert-cache", default=None,
                   help="RAM budget for routed experts, e.g. 2GiB or 25%% (default: keep all resident)")
    p.add_argument("--cache-policy", default=None,
                   help="eviction policy of the expert cache: lru, lfu, learned, dali, or static (pin the experts "
                        "`tiermoe calibrate` found most used, stream the rest) (default: lru)")
    p.add_argument("--learned-weights", default=None, metavar="PATH",
                   help="weights of --cache-policy learned, as `tiermoe policy train --out` writes them "
                        "(default: the shipped ones)")
    p.add_argument("--memory-limit", default=None,
                   help="RAM for the whole engine, e.g. 650MB, or 'auto' (the cgroup's limit, else the RAM "
                        "available): the fixed footprint is measured after load and the rest becomes the expert "
                        "cache (default: none, unless the model does not fit the cgroup's limit)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens one engine step may compute over all requests; longer prompts are prefilled in "
                        "chunks (default: no cap, or 512 under a memory limit)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once (default: 256)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help="diffusion models: how requests share engine steps: fcfs-request (one request denoised to "
                        "the end at a time), fcfs (batched, phase-blind) or phase (dLLM-Serve's phase-multiplexed: "
                        "heavy and light denoising steps of different requests mixed under "
                        "--max-num-batched-tokens) (default: phase, fcfs-request with --tau)")
    p.add_argument("--kv-cache-memory", default=None,
                   help="bytes of the paged KV cache shared by running requests, e.g. 1GiB (default: what a memory "
                        "limit reserves, else 1 GiB)")
    p.add_argument("--io-threads", type=int, default=None,
                   help="threads reading experts from disk (default: 4, or top_k under a memory limit)")
    p.add_argument("--no-direct-io", dest="direct_io", action="store_false",
                   help="read experts through the page cache instead of O_DIRECT")
    p.add_argument("--prefetch", choices=["residual", "plain", "affinity", "off"], default=None,
                   help="read the next layer's predicted experts ahead (residual: DALI, needs `tiermoe calibrate`; "
                        "affinity: inter-layer expert affinity, needs `tiermoe prefetch train`; default: plain "
                        "where a cache policy runs on the RAM tier)")
    p.add_argument("--prefetch-top-p", type=int, default=None,
                   help="experts predicted per token for prefetch, at most the model's top_k (default: 1 for "
                        "residual and plain, the validated count for affinity)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--gpu-expert-cache", default=None, help="accelerator budget for experts, e.g. 4GiB or 10%%")
    p.add_argument("--sparse-attention", type=_sparse_attention, default=None, metavar="top_k=N",
                   help="block-diffusion models (llada2_moe): a block's light denoising steps attend, per KV head, "
                        "only to the N prefix positions its first step attended to most (dLLM-Serve; approximate, "
                        "faster at long prompts) (default: dense attention)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """SamplingParams' options; the defaults here (64 tokens, greedy) are the CLI's, not SamplingParams' (16, 1.0)."""
    p.add_argument("--max-tokens", type=int, default=64,
                   help="tokens to generate at most (default: %(default)s; SamplingParams' is 16, as vLLM's)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="EOS, --stop-token-ids and --stop take effect only after this many tokens (default: "
                        "%(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="in [0, 2]; 0 = greedy (default: %(default)s, greedy; SamplingParams' is 1.0, as vLLM's)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens; 0 = all (default: "
                                                        "%(default)s)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the most likely tokens holding this much probability (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than MIN_P times the most likely one (default: %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted from every token already generated (default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted per time a token was generated (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0: divides positive (multiplies negative) logits of tokens in the prompt or the output; "
                        "1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed of the request's sampling (default: none, random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; default: none)")
    p.add_argument("--stop-token-ids", type=_token_ids, action="extend", default=[], metavar="ID[,ID...]",
                   help="token ids that end the reply besides EOS (default: none)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS")
    diff = p.add_argument_group("diffusion models (LLaDA, LLaDA2)")
    d = DIFFUSION_DEFAULTS
    diff.add_argument("--block-length", type=int, default=d["block_length"],
                      help="positions denoised together, block by block (default: %(default)s)")
    diff.add_argument("--steps", type=int, default=d["steps"],
                      help="denoising steps per block (LLaDA2), or in all (LLaDA) (default: %(default)s)")
    diff.add_argument("--threshold", type=float, default=d["threshold"],
                      help="LLaDA2: commit every position more confident than this, else the most confident "
                           "(default: %(default)s)")
    diff.add_argument("--remasking", choices=["low_confidence", "random"], default=d["remasking"],
                      help="LLaDA: which positions each step commits (default: %(default)s)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """Options of `generate` that shape what a request returns."""
    p.add_argument("--n", type=int, default=1,
                   help="completions of the prompt; with --seed S, completion i uses seed S+i (default: %(default)s)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="per generated token, the logprobs of the N most likely tokens and the chosen one, under "
                        "the model's distribution before penalties and temperature; -1 = all (default: none)")
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                   help="per prompt token, the logprobs of the N most likely tokens and the prompt's (default: none)")


def run_standalone(prog: str, description: str, dest: str, add_commands, argv=None) -> int:
    """A command group's own entry point (`python -m <module> COMMAND ...`): `add_commands(subparsers)` registers
    its commands, each setting `func`; returns the chosen command's exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_commands(parser.add_subparsers(dest=dest, required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)
