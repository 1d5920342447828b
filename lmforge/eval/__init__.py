"""Evaluation: perplexity and bits per byte (more tasks arrive with the eval issue)."""
