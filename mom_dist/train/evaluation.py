"""Perplexity evaluation moved to ``mom_dist.evaluate.perplexity``; this name stays for callers."""

from mom_dist.evaluate.perplexity import perplexity

__all__ = ["perplexity"]
