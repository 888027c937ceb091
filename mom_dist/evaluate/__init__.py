"""Evaluation of trained models in one process (no DeepSpeed): perplexity on indexed data."""
