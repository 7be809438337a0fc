"""Offline tools behind the CLI: calibration, and training/evaluating the learned policy."""
