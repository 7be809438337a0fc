"""How `tiermoe --help` reads: an example per command, stated defaults, and -q/--quiet on every command."""

from __future__ import annotations

import argparse

EXAMPLES = {
    "": 'tiermoe generate "ROMEO:"   (tiermoe COMMAND --help: its options)',
    "generate": 'tiermoe generate --max-tokens 32 "ROMEO:"   (prompt from stdin: -, from a file: @FILE)',
    "chat": "tiermoe chat --system 'Answer as a Shakespearean character.'",
    "calibrate": "tiermoe calibrate --model path/to/hf-model --text my-text.txt",
    "convert": "tiermoe convert path/to/hf-model path/to/aligned",
    "sim": "tiermoe sim cache --trace trace.npz --capacity 25%,50% --policy lru,lfu,belady",
    "sim cache": "tiermoe sim cache --trace trace.npz --capacity 25%,50% --policy lru,lfu,belady",
    "sim run": "tiermoe sim run --trace trace.npz --model-shape olmoe-1b-7b --hardware rtx4090 --gpu-memory 8GiB "
               "--strategy dali,llamacpp,tiermoe",
    "profile": "tiermoe profile --out my-machine.json",
    "policy": "tiermoe policy train --trace trace.npz --out learned.safetensors",
    "policy train": "tiermoe policy train --trace trace.npz --out learned.safetensors",
    "prefetch": "tiermoe prefetch train --trace trace.npz --model path/to/hf-model",
    "prefetch train": "tiermoe prefetch train --trace trace.npz --model path/to/hf-model",
    "serve": "tiermoe serve --model path/to/hf-model --expert-cache 25% --port 8000",
    "bench": "tiermoe bench serve --url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4",
    "bench serve": "tiermoe bench serve --url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4",
}


def finish_parsers(parser: argparse.ArgumentParser, path: str = "") -> None:
    """On every command's parser: defaults and an example in --help, and -q/--quiet (no progress bars)."""
    parser.formatter_class = HelpFormatter
    if path in EXAMPLES and not parser.epilog:  # a command registered elsewhere may bring its own
        parser.epilog = f"example: {EXAMPLES[path]}"
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in commands:
        for name, child in action.choices.items():
            finish_parsers(child, f"{path} {name}".strip())
    if not commands and path:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless it states its default or has none worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"
