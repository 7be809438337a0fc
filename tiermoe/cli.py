"""Command line: `tiermoe generate | sim ...` (vLLM-style flags where vLLM has one)."""

from __future__ import annotations

import argparse
import json
import sys

from tiermoe.errors import TiermoeError
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL

CALIBRATION_TEXT = DEFAULT_MODEL.parent / "calibration.txt"  # held out from the built-in model's training


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags every command that loads a model shares."""
    p.add_argument("--model", default=None, help="Hugging Face model folder (default: the built-in model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
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
    p.add_argument("--kv-cache-memory", default=None,
                   help="bytes of the paged KV cache shared by running requests, e.g. 1GiB (default: what a memory "
                        "limit reserves, else 1 GiB)")
    p.add_argument("--io-threads", type=int, default=None,
                   help="threads reading experts from disk (default: 4, or top_k under a memory limit)")
    p.add_argument("--no-direct-io", dest="direct_io", action="store_false",
                   help="read experts through the page cache instead of O_DIRECT")
    p.add_argument("--prefetch", choices=["residual", "plain", "off"], default=None,
                   help="read the next layer's predicted experts ahead (residual: DALI, needs `tiermoe calibrate`; "
                        "default: plain where a cache policy runs on the RAM tier)")
    p.add_argument("--prefetch-top-p", type=int, default=1, help="experts predicted per token for prefetch")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--gpu-expert-cache", default=None, help="accelerator budget for experts, e.g. 4GiB or 10%%")


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
    diff.add_argument("--block-length", type=int, default=32,
                      help="positions denoised together, block by block (default: %(default)s)")
    diff.add_argument("--steps", type=int, default=32,
                      help="denoising steps per block (LLaDA2), or in all (LLaDA) (default: %(default)s)")
    diff.add_argument("--threshold", type=float, default=0.95,
                      help="LLaDA2: commit every position more confident than this, else the most confident "
                           "(default: %(default)s)")
    diff.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence",
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


def sampling_params(args: argparse.Namespace):
    from tiermoe.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                          min_tokens=args.min_tokens, stop=args.stop, stop_token_ids=args.stop_token_ids,
                          ignore_eos=args.ignore_eos, n=getattr(args, "n", 1),
                          logprobs=getattr(args, "logprobs", None),
                          prompt_logprobs=getattr(args, "prompt_logprobs", None), block_length=args.block_length,
                          steps=args.steps, threshold=args.threshold, remasking=args.remasking)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def model_path(args: argparse.Namespace) -> str:
    """--model, else the built-in diffusion model with --diffusion, else the built-in autoregressive one."""
    if args.model:
        return args.model
    return str(DEFAULT_DIFFUSION_MODEL if getattr(args, "diffusion", False) else DEFAULT_MODEL)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, max_model_len=args.max_model_len, threads=args.threads,
                expert_cache=args.expert_cache, cache_policy=args.cache_policy, learned_weights=args.learned_weights,
                io_threads=args.io_threads, direct_io=args.direct_io, prefetch=args.prefetch,
                memory_limit=args.memory_limit, max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory,
                prefetch_top_p=args.prefetch_top_p, device=args.device, gpu_expert_cache=args.gpu_expert_cache)


def cmd_generate(args: argparse.Namespace) -> int:
    from tiermoe.llm import LLM

    params = sampling_params(args)  # checked before the model loads
    llm = LLM(model_path(args), **engine_kwargs(args), tau=args.tau)
    prompt = llm.chat_prompt(_messages(args)) if args.chat else args.prompt
    if args.json or args.record_trace or params.n > 1:
        (out,) = llm.generate([prompt], params, use_tqdm=False, record_trace=args.record_trace)
        if args.json:
            print(json.dumps(out.to_dict()))
        for completion in [] if args.json else out.outputs:
            header = f"--- completion {completion.index} ---\n" if params.n > 1 else ""
            print(header + _prompt_echo(args) + completion.text)
    else:
        out = _stream(llm, prompt, params, _prompt_echo(args))
    if not args.json and (params.logprobs is not None or params.prompt_logprobs is not None):
        print_logprobs(out, sys.stderr)
    if args.stats:
        print(llm.store.stats.table(), file=sys.stderr)
        if "diffusion" in out.stats:
            work = out.stats["diffusion"]
            print(f"NFE {work['nfe']}, tokens per forward {work['tokens_per_forward']:.2f}, {work['blocks']} blocks",
                  file=sys.stderr)
    return 0


def print_logprobs(out, file) -> None:
    """A table per completion: each token, its logprob and rank, and the most likely alternatives."""
    def rows(title: str, entries) -> None:
        print(title, file=file)
        for entry in entries:
            if entry is None:  # the first prompt token: nothing predicts it
                continue
            (token, chosen), *_ = entry.items()
            top = ", ".join(f"{lp.decoded_token or t!r} {lp.logprob:.3f}" for t, lp in entry.items() if t != token)
            print(f"  {chosen.decoded_token or token!r:>14} {chosen.logprob:8.3f}  rank {chosen.rank:<5} {top}",
                  file=file)

    if out.prompt_logprobs is not None:
        rows("prompt logprobs:", out.prompt_logprobs)
    for completion in out.outputs:
        if completion.logprobs is not None:
            rows(f"logprobs of completion {completion.index} (sum {completion.cumulative_logprob:.3f}):",
                 completion.logprobs)


def _prompt_echo(args: argparse.Namespace) -> str:
    return "" if args.chat else args.prompt


def _stream(llm, prompt, params, echo: str):
    """Print tokens as they are produced; returns the final output."""
    shown, out = 0, None
    for i, out in enumerate(llm.stream(prompt, params)):
        if i == 0:
            print(echo, end="", flush=True)
        text = out.outputs[0].text
        print(text[shown:], end="", flush=True)
        shown = len(text)
    print()
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tiermoe.llm import LLM
    from tiermoe.offload.calibrate import calibrate
    from tiermoe.offload.usage import calibrate_usage

    llm = LLM(model_path(args), dtype=args.dtype, threads=args.threads)
    text = Path(args.text).read_text() if args.text else CALIBRATION_TEXT.read_text()
    ids = llm.tokenizer.encode(text)
    report = calibrate(llm, ids, args.chunk_tokens) if args.only in (None, "residuals") else {}
    if args.only in (None, "usage"):
        report["expert_usage"] = calibrate_usage(llm, ids, args.chunk_tokens, args.usage_prompts,
                                                 sampling_params(args))
    print(json.dumps(report, indent=1))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tiermoe.convert import convert

    dst = convert(args.src, args.dst)
    print(f"wrote {dst} (experts in {dst / 'experts.bin'}, aligned to 4 KiB, index {dst / 'experts.json'})")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tiermoe.chat import chat
    from tiermoe.llm import LLM

    llm = LLM(model_path(args), **engine_kwargs(args))
    return chat(llm, sampling_params(args), args.system)


def _messages(args: argparse.Namespace) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": args.prompt}]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiermoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    gen.add_argument("prompt")
    add_model_args(gen)
    add_sampling_args(gen)
    add_output_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    gen.add_argument("--system", default=None, help="system message for --chat")
    gen.add_argument("--stats", action="store_true", help="print expert-store statistics (stderr) at the end")
    gen.add_argument("--record-trace", default=None, metavar="FILE",
                     help="write every token's routing to FILE.npz/.json (../shared/traces format)")
    gen.add_argument("--diffusion", action="store_true",
                     help="without --model: use the built-in diffusion model (llada2_moe) instead")
    gen.add_argument("--tau", type=_tau, default=None,
                     help="diffusion models with an expert budget: refresh the expert placement every TAU denoising "
                          "steps (TIDE), or 'auto' to solve TAU from a cost model")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="talk with a model: a multi-turn conversation in its chat template, replies "
                                       "streamed; /reset, /exit, Ctrl-C stops a reply")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message opening the conversation (default: none)")
    chat.add_argument("--diffusion", action="store_true",
                      help="without --model: use the built-in diffusion model (llada2_moe) instead")
    chat.set_defaults(func=cmd_chat)
    cal = sub.add_parser("calibrate", help="fit DALI's prefetch residuals on text and store them with the model; "
                                           "count which experts generation from the text uses (cache_policy static)")
    cal.add_argument("--model", default=None, help="Hugging Face model folder (default: the built-in model)")
    cal.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cal.add_argument("--threads", type=int, default=None)
    cal.add_argument("--text", default=None, help="calibration text file (default: a held-out Shakespeare play)")
    cal.add_argument("--chunk-tokens", type=int, default=256, help="tokens per calibration chunk (and usage prompt)")
    cal.add_argument("--only", choices=["residuals", "usage"], default=None,
                     help="residuals: DALI's prefetch residuals; usage: the experts' usage, generating from the "
                          "text, which cache_policy 'static' pins from (default: both)")
    cal.add_argument("--usage-prompts", type=int, default=8,
                     help="prompts (chunks of the text) to generate from when counting expert usage")
    add_sampling_args(cal)
    cal.set_defaults(func=cmd_calibrate)
    conv = sub.add_parser("convert", help="rewrite a checkpoint so every expert is one aligned read")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.set_defaults(func=cmd_convert)
    add_serve_parser(sub)
    _add_optional_commands(sub)
    return parser


def add_serve_parser(sub) -> None:
    """`serve` and `bench serve` (tiermoe.server)."""
    from tiermoe.server import bench_client
    from tiermoe.server.cli import add_serve_args, cmd_serve

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, "
                                         "/v1/models, /health, /metrics, /tokenize, /detokenize, /version")
    add_model_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    bench_client.add_parser(sub)


def _add_optional_commands(sub) -> None:
    """Commands whose modules register their own parsers."""
    try:
        from tiermoe.sim import cli as sim_cli
    except ImportError:
        return
    sim_cli.add_parser(sub)
    __import__("tiermoe.offload.policy_cli", fromlist=["add_parser"]).add_parser(sub)  # `policy train`


def _tau(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except TiermoeError as e:
        print(f"tiermoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
