"""Evaluation: generation scored against references (``generation``)."""
