"""Distillation: a teacher teaches a smaller student through the training loop (see distill/run.py)."""
