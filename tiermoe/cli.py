"""Command line: `tiermoe generate | sim ...` (vLLM-style flags where vLLM has one)."""

from __future__ import annotations

import argparse
import json
import sys

from tiermoe.errors import TiermoeError
from tiermoe.models.registry import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags every command that loads a model shares."""
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face model folder (default: built-in model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default here)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace):
    from tiermoe.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, max_model_len=args.max_model_len, threads=args.threads)


def cmd_generate(args: argparse.Namespace) -> int:
    from tiermoe.llm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    params = sampling_params(args)
    prompt = llm.chat_prompt(_messages(args)) if args.chat else args.prompt
    if args.json:
        (out,) = llm.generate([prompt], params)
        print(json.dumps(out.to_dict()))
        return 0
    shown = 0
    for i, out in enumerate(llm.stream(prompt, params)):
        if i == 0 and not args.chat:
            print(args.prompt, end="", flush=True)
        text = out.outputs[0].text
        print(text[shown:], end="", flush=True)
        shown = len(text)
    print()
    return 0


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
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    gen.add_argument("--system", default=None, help="system message for --chat")
    gen.set_defaults(func=cmd_generate)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands whose modules register their own parsers."""
    try:
        from tiermoe.sim import cli as sim_cli
    except ImportError:
        return
    sim_cli.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except TiermoeError as e:
        print(f"tiermoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
