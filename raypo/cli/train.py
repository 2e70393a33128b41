"""``raypo train``: load and validate the config on the driver, then run the trainer."""

from __future__ import annotations

import argparse

from raypo.config import RaypoConfig, load_config, to_yaml


def train_command(args: argparse.Namespace) -> int:
    cfg: RaypoConfig = load_config(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from raypo.train.trainer import run_training

    result = run_training(cfg)
    print(f"\nrun directory: {result.run_dir}")
    print(f"checkpoint:    {result.checkpoint}")
    if result.export_dir:
        print(f"exported model (Hugging Face format): {result.export_dir}")
    for key in ("eval/pairwise_accuracy", "eval/loss", "train/loss"):
        if key in result.metrics:
            print(f"{key}: {result.metrics[key]:.4f}")
    return 0
