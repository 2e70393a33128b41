"""Training: the per-worker loop, trainer assembly, checkpointing and export."""
