"""`tiermoe serve`'s command-line flags; the server itself is in tiermoe.server.run (imported when it starts)."""

from __future__ import annotations

import argparse


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """`serve`'s own flags; the model and engine flags are `generate`'s (tiermoe.cli.add_model_args)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize (default: none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: --model as given, or the built-in model's name)")
    p.add_argument("--diffusion", action="store_true",
                   help="without --model: serve the built-in diffusion model (llada2_moe) instead")
    p.add_argument("--tau", type=lambda t: t if t == "auto" else int(t), default=None,
                   help="diffusion models with an expert budget: TIDE's refresh interval, or 'auto'")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="sequences (prompts x n of each request) admitted beyond --max-num-seqs to wait for a slot; "
                        "more are refused with 503 "
                        "(default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=60,
                   help="seconds running requests get to finish after SIGTERM before they are ended (default: "
                        "%(default)s)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default: %(default)s)")


def cmd_serve(args: argparse.Namespace) -> int:
    from tiermoe.server.run import serve

    return serve(args)
