"""Datasets, the staged training recipe and the training loop."""
