"""``raypo train``: load and validate the config on the driver, then run the trainer."""

from __future__ import annotations

import argparse

from raypo.config import RaypoConfig, load_config, to_yaml


def train_command(args: argparse.Namespace) -> int:
    cfg: RaypoConfig = load_config(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from raypo.cli import NotBuiltError

    raise NotBuiltError("training is not available in this build of raypo yet; "
                        "`raypo train CONFIG --dry-run` validates a config")
