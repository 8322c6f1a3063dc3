"""Evaluation metrics and the base-vs-tuned report."""
