"""Building a whole (unpartitioned) model in a process that holds a live ZeRO-3 config."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def without_zero3_init():
    """Build a plain (unpartitioned) model even if this process holds a live ``HfDeepSpeedConfig``
    (transformers keeps a process-global weakref to the last one, e.g. from an in-process engine)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
