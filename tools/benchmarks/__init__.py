"""Benchmarks printing train-step and inference figures: ``python -m tools benchmark NAME``."""
