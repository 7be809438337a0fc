"""Command line: `tiermoe generate | chat | calibrate | convert | sim | policy` (vLLM-style flags where vLLM has one).

Bad input ends in one line on stderr and exit status 2, Ctrl-C in exit status 130; never in a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tiermoe import __version__
from tiermoe.cli_flags import DIFFUSION_DEFAULTS, add_model_args, add_output_args, add_sampling_args
from tiermoe.cli_help import finish_parsers
from tiermoe.errors import ConfigError, RequestError, TiermoeError
from tiermoe.models.registry import DEFAULT_DIFFUSION_MODEL, DEFAULT_MODEL

CALIBRATION_TEXT = DEFAULT_MODEL.parent / "calibration.txt"  # held out from the built-in model's training
# The diffusion options' defaults; on an autoregressive model any other value is ignored, and said so.
# One example per command, shown at the end of its --help.
def warn(message: str) -> None:
    print(f"tiermoe: warning: {message}", file=sys.stderr)


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
                max_num_seqs=args.max_num_seqs, scheduler=args.scheduler, kv_cache_memory=args.kv_cache_memory,
                prefetch_top_p=args.prefetch_top_p, device=args.device, gpu_expert_cache=args.gpu_expert_cache,
                sparse_attention=args.sparse_attention)


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # checked before the model loads
    text = read_prompt(args)
    if args.system is not None and not args.chat:
        warn("--system is used with --chat only: ignored")
    from tiermoe import progress
    from tiermoe.llm import LLM

    llm = LLM(model_path(args), **engine_kwargs(args), tau=args.tau)
    warn_ignored(args, llm)
    prompt = llm.chat_prompt(_messages(args, text)) if args.chat else text
    warn_context(llm, prompt, params)
    echo = "" if args.chat else text
    if args.json or args.record_trace or params.n > 1:
        (out,) = llm.generate([prompt], params, use_tqdm=params.n > 1 and progress.shown(),
                              record_trace=args.record_trace)
        if args.json:
            print(json.dumps(out.to_dict()))
        for completion in [] if args.json else out.outputs:
            header = f"--- completion {completion.index} ---\n" if params.n > 1 else ""
            print(header + echo + completion.text)
    else:
        out = _stream(llm, prompt, params, echo)
    if not args.json and (params.logprobs is not None or params.prompt_logprobs is not None):
        print_logprobs(out, sys.stderr)
    if args.stats:
        print_stats(llm, out, sys.stderr)
    return 0


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt: the argument itself, stdin for '-', a file's text for '@FILE' or --prompt-file FILE (one trailing
    newline dropped from stdin and files)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise RequestError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        return read_text(args.prompt_file, "prompt file", RequestError).removesuffix("\n")
    if args.prompt is None:
        raise RequestError("no prompt: give it as an argument, '-' to read stdin, @FILE or --prompt-file FILE")
    if args.prompt == "-":
        return utf8(sys.stdin.buffer.read(), "the prompt on stdin", RequestError).removesuffix("\n")
    if args.prompt.startswith("@") and len(args.prompt) > 1:
        return read_text(args.prompt[1:], "prompt file", RequestError).removesuffix("\n")
    return utf8(os.fsencode(args.prompt), "the prompt", RequestError)  # argv holds raw bytes as surrogates


def utf8(data: bytes, what: str, error: type[TiermoeError]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_text(path: str | Path, what: str, error: type[TiermoeError] = ConfigError) -> str:
    """A UTF-8 text file's contents; a missing or unreadable file is an `error` naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{what} {path}: {e.strerror or e}") from None
    return utf8(data, f"{what} {path}", error)


def warn_ignored(args: argparse.Namespace, llm) -> None:
    """Say which options the loaded model ignores."""
    model_type = llm.hf_config["model_type"]
    if llm.diffusion is None:
        ignored = [f"--{k.replace('_', '-')}" for k, v in DIFFUSION_DEFAULTS.items() if getattr(args, k) != v]
        if ignored:
            warn(f"{', '.join(ignored)}: for diffusion models only; {model_type} is autoregressive: ignored")
        if getattr(args, "diffusion", False) and args.model:
            warn(f"--diffusion picks the built-in diffusion model when --model is not given; {args.model} is "
                 f"{model_type}, an autoregressive model: --diffusion ignored")
    trained, given = llm.model.shape.max_position_embeddings, getattr(args, "max_model_len", None)
    if given is not None and given > trained:
        warn(f"--max-model-len {given} is above the {trained} positions {model_type} was trained on: "
             "text past them may degrade")


def warn_context(llm, prompt, params) -> None:
    """Say when max_tokens will be cut by the context (generation stops at its end)."""
    ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else llm.tokenizer.encode(prompt)
    room = llm.max_model_len - len(ids)
    if params.max_tokens > room > 0:
        warn(f"--max-tokens {params.max_tokens} does not fit the context: at most {room} tokens will be generated "
             f"(context {llm.max_model_len} tokens, prompt {len(ids)}; see --max-model-len)")


def print_stats(llm, out, file) -> None:
    """Throughput, time to first token, and the expert store's hit rate and bytes read (per layer with a budget)."""
    t, total = out.timing(), llm.store.stats.total
    rate = lambda v: "n/a" if v is None else f"{v:.1f} tok/s"  # noqa: E731
    ttft = "n/a" if t["time_to_first_token_s"] is None else f"{t['time_to_first_token_s']:.3f} s"
    print(f"prompt {out.num_prompt_tokens} tokens, {rate(t['prompt_tokens_per_s'])}; time to first token {ttft}; "
          f"decode {out.num_completion_tokens} tokens, {rate(t['decode_tokens_per_s'])}; experts: hit rate "
          f"{total.hit_rate:.3f}, {total.bytes_read / 2**20:.1f} MiB read", file=file)
    if total.hits + total.misses:
        print(llm.store.stats.table(), file=file)
    if "diffusion" in out.stats:
        work = out.stats["diffusion"]
        print(f"NFE {work['nfe']}, tokens per forward {work['tokens_per_forward']:.2f}, {work['blocks']} blocks",
              file=file)


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


def _stream(llm, prompt, params, echo: str):
    """Print the prompt, then tokens as they are produced (a diffusion model's: block by block); returns the final
    output."""
    print(echo, end="", flush=True)
    shown, out = 0, None
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        print(text[shown:], end="", flush=True)
        shown = len(text)
    print()
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    text = read_text(args.text, "calibration text") if args.text else CALIBRATION_TEXT.read_text()
    from tiermoe.llm import LLM
    from tiermoe.offload.placement.usage import calibrate_usage
    from tiermoe.offload.tools.calibrate import calibrate, format_report

    llm = LLM(model_path(args), dtype=args.dtype, threads=args.threads)
    warn_ignored(args, llm)
    ids = llm.tokenizer.encode(text)
    report = calibrate(llm, ids, args.chunk_tokens) if args.only in (None, "residuals") else {}
    if args.only in (None, "usage"):
        report["expert_usage"] = calibrate_usage(llm, ids, args.chunk_tokens, args.usage_prompts,
                                                 sampling_params(args))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    for name in ("file", "expert_usage"):
        if name in report:
            print(f"tiermoe: saved {report[name]['file'] if name == 'expert_usage' else report[name]}",
                  file=sys.stderr)
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
    warn_ignored(args, llm)
    return chat(llm, sampling_params(args), args.system)


def _messages(args: argparse.Namespace, text: str) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": text}]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiermoe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tiermoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    gen.add_argument("prompt", nargs="?", help="the prompt; - reads it from stdin, @FILE from a file")
    gen.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from FILE")
    add_model_args(gen)
    add_sampling_args(gen)
    add_output_args(gen)
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, tokens, usage, timing with tokens/s, stats) instead of "
                          "streaming")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    gen.add_argument("--system", default=None, help="system message for --chat")
    gen.add_argument("--stats", action="store_true",
                     help="print prompt and decode tokens/s, time to first token, and the expert store's hit rate "
                          "and bytes read (stderr) at the end")
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
    cal = sub.add_parser("calibrate", help="fit DALI's prefetch residuals on text and store them beside the model (or "
                                           "in ~/.cache/tiermoe/ when that folder is read-only or the built-in "
                                           "model's); count which experts generation from the text uses "
                                           "(cache_policy static)")
    cal.add_argument("--model", default=None, help="Hugging Face model folder (default: the built-in model)")
    cal.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute dtype")
    cal.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    cal.add_argument("--text", default=None, help="calibration text file (default: a held-out Shakespeare play)")
    cal.add_argument("--chunk-tokens", type=int, default=256, help="tokens per calibration chunk (and usage prompt)")
    cal.add_argument("--only", choices=["residuals", "usage"], default=None,
                     help="residuals: DALI's prefetch residuals; usage: the experts' usage, generating from the "
                          "text, which cache_policy 'static' pins from (default: both)")
    cal.add_argument("--usage-prompts", type=int, default=8,
                     help="prompts (chunks of the text) to generate from when counting expert usage")
    cal.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    add_sampling_args(cal)
    cal.set_defaults(func=cmd_calibrate)
    conv = sub.add_parser("convert", help="rewrite a checkpoint so every expert is one aligned read")
    conv.add_argument("src", help="Hugging Face model folder")
    conv.add_argument("dst", help="folder to write (new or empty)")
    conv.set_defaults(func=cmd_convert)
    add_serve_parser(sub)
    _add_optional_commands(sub)
    finish_parsers(parser)
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
    __import__("tiermoe.offload.tools.policy_cli", fromlist=["add_parser"]).add_parser(sub)  # `policy train`
    __import__("tiermoe.offload.tools.prefetch_cli", fromlist=["add_parser"]).add_parser(sub)  # `prefetch train`


def _tau(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input is one line on stderr and status 2, Ctrl-C status 130, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
        from tiermoe import progress

        progress.quiet(getattr(args, "quiet", False))
        return args.func(args) or 0
    except TiermoeError as e:
        print(f"tiermoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
