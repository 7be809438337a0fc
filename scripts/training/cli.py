"""The command line, and one run from corpus to model folder and report."""

from __future__ import annotations

import argparse

import torch

from .config import REPO, ModelConfig, RunConfig, TrainConfig
from .data import eval_windows, prepare_corpus
from .loop import log, seed_everything, train_loop
from .recipes import RECIPES
from .report import build_report, dir_bytes, param_summary, save_model, write_report
from .tokenizer import encode_works, load_or_train_tokenizer, special_ids


def parse_args(argv: list[str] | None = None, description: str | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """CLI overrides for the fields one is likely to change; everything else stays at the dataclass defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/ckpt.pt")
    p.add_argument("--bench", type=int, default=0, help="run N steps, print throughput, save nothing")
    p.add_argument("--run-dir", help="checkpoints and tokenizer (default: the recipe's)")
    p.add_argument("--out-dir", help="the model folder written at the end (default: the recipe's)")
    p.add_argument("--model-type", default=ModelConfig.model_type, choices=sorted(RECIPES))
    for name in ("steps", "lr", "batch_size", "seq_len"):  # default: the recipe's, else TrainConfig's
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(TrainConfig, name)))
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch threads (1 is faster on a busy CPU)")
    args = p.parse_args(argv)
    recipe = RECIPES[args.model_type]
    for name in ("steps", "lr", "batch_size", "seq_len"):
        if getattr(args, name) is None:
            setattr(args, name, recipe.train_defaults.get(name, getattr(TrainConfig, name)))
    run = RunConfig(
        run_dir=args.run_dir or recipe.run_dir,
        out_dir=args.out_dir or recipe.out_dir,
        model=ModelConfig(model_type=args.model_type),
        train=TrainConfig(
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            seed=args.seed,
            threads=args.threads,
        ),
    )
    return run, args


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    """Prepare data and tokenizer, train, save the model folder and its training report."""
    run, args = parse_args(argv, description)
    torch.set_num_threads(run.train.threads)
    seed_everything(run.train.seed)
    (REPO / run.run_dir).mkdir(parents=True, exist_ok=True)
    recipe = RECIPES[run.model.model_type]

    corpus = prepare_corpus(run.data)
    tokenizer = load_or_train_tokenizer(run, corpus, recipe.special_tokens)
    streams = {
        split: encode_works(tokenizer, [corpus["texts"][n] for n in corpus[f"{split}_works"]])
        for split in ("train", "val")
    }
    log(f"train tokens {len(streams['train'])}, val tokens {len(streams['val'])}, vocab {len(tokenizer)}")

    model = recipe.build_model(run.model, special_ids(tokenizer))
    log(f"params {param_summary(model, run.model)}")
    state = train_loop(run, recipe, model, tokenizer, streams, args.resume, args.bench)
    if args.bench:
        return

    out_dir = REPO / run.out_dir
    val_loss_fp32 = recipe.eval_loss(model, eval_windows(streams["val"], run.train.seq_len), run.model)
    save_model(recipe, model, tokenizer, out_dir)
    report = build_report(run, corpus, streams, model, state, out_dir, recipe, val_loss_fp32)
    write_report(out_dir, report)
    log(f"saved {out_dir} ({dir_bytes(out_dir)} bytes); val loss {report['validation']['loss']}")
