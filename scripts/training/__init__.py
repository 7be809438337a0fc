"""Training of tiermoe's built-in default models (entry point: scripts/train_model.py).

config     what a run depends on (dataclasses) and the repository root its paths are relative to
data       the Shakespeare corpus: fetch, clean, split; training batches and evaluation windows
tokenizer  the byte-level BPE, its special tokens and chat template
recipes    one module per model family: build, loss, evaluation, save/load, routing, sample
loop       optimisation: learning-rate schedule, optimizer, checkpoints, the resumable loop
report     what is measured on the shipped weights and written to training_report.json
cli        command line and the run from corpus to report
"""
