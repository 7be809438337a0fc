"""Train tiermoe's built-in default models: small MoE language models on public-domain Shakespeare.

The script is reproducible (everything seeded, batches drawn from a per-step generator, so a resumed run sees the
same batches as an uninterrupted one) and resumable (``--resume`` continues from ``<run-dir>/ckpt.pt``). It is not
part of the test suite. The code lives in scripts/training/ (data, tokenizer, recipes, loop, report, cli).

Architectures plug in through ``training.recipes.RECIPES``: a ``Recipe`` bundles how to build a model from the
configs, how to turn a batch into a loss, how to evaluate, save and reload it, and which experts it routes to for the
routing report. ``qwen3_moe`` (autoregressive, next-token loss + per-layer load-balancing loss, transformers'
implementation) is the default model; ``llada2_moe`` (block diffusion, training/recipes/llada2_moe.py) is the
diffusion default model.

Reproduce the shipped models (about 35 minutes each of training on 2 uncontended CPU cores; on a CPU shared with
other jobs ``--threads 1`` is faster, since two threads stall on each other's barriers)::

    python scripts/train_model.py                          # tiermoe/assets/shakespeare-moe
    python scripts/train_model.py --model-type llada2_moe  # tiermoe/assets/shakespeare-dllm
    python scripts/train_model.py --resume                 # after an interruption (same other flags)

Measure throughput only (no saving)::

    python scripts/train_model.py --bench 20
"""

from training.cli import main  # scripts/ is on sys.path when this file runs

if __name__ == "__main__":
    main(description=__doc__)
