"""``raypo export CHECKPOINT OUT``."""

from __future__ import annotations

import argparse

from raypo.train.checkpoint import export_checkpoint


def export_command(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, dtype=getattr(args, "dtype", "float32"))
    print(f"exported {args.checkpoint} -> {out} (Hugging Face safetensors + tokenizer)")
    return 0
