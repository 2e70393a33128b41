"""Keep the console readable: raypo's progress line, not every library's INFO logs and progress bars.

Called on the driver and at the start of every worker. ``RAYPO_VERBOSE=1`` leaves everything on.
"""

from __future__ import annotations

import logging
import os
import warnings

# Library warnings that fire on every step on CPU/gloo and say nothing actionable to a raypo user.
_NOISY_WARNINGS = (
    r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|_reduce_scatter_base).*",
    r".*is deprecated.*",
)
_NOISY_LOGGERS = ("ray.train", "ray.data", "ray.tune", "DeepSpeed", "deepspeed", "torch.distributed")

QUIET_ENV = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
             "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def quiet() -> None:
    if os.environ.get("RAYPO_VERBOSE") == "1":
        return
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Some Ray Train modules name their logger by file path (logging.getLogger(__file__)).
    for name in list(logging.root.manager.loggerDict):
        if f"{os.sep}ray{os.sep}train{os.sep}" in name or f"{os.sep}ray{os.sep}data{os.sep}" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # an older Ray without these knobs: keep going with its defaults
        pass
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:
        pass
