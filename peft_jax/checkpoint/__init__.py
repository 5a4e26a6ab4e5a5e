"""Checkpoint import/export (Hugging Face layout) and training checkpoints."""
