"""Evaluation: held-out loss and perplexity, generation metrics, base vs tuned."""
