"""Errors the reference model raises for bad checkpoints (caught by the CLI and shown as one line)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or does not match its config."""
