"""What ``raypo eval`` and ``raypo generate`` take as MODEL: a run directory, a checkpoint or an export.

Every form ends at a Hugging Face model directory holding ``raypo_model.json`` (the loss, beta, the
log-prob reduction, the reference model's source and the dimension names, written by the trainer with
every checkpoint and copied into every export) and, for a lambda-conditioned policy,
``raypo_conditioning.json`` (:mod:`raypo.data.conditioning`):

* an export (``checkpoint.export_path``, ``raypo export``): used as it is;
* a checkpoint (``<run>/step_00000040``: ``ds/`` and ``hf/``): exported once into
  ``<checkpoint>/eval_export`` (ZeRO-3 shards merged on CPU), reused afterwards;
* a run directory (``<storage>/<run>``, with ``raypo_summary.json`` or ``raypo_run.json``): its export if
  the run wrote one, else its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from raypo.data.conditioning import PromptConditioning, read_conditioning
from raypo.train.checkpoint import DS_DIR, HF_DIR, MODEL_CARD_FILE

CHECKPOINT_DIR = re.compile(r"^step_\d{8}$")
EVAL_EXPORT = "eval_export"


class ModelNotFound(ValueError):
    """MODEL is not a raypo run directory, checkpoint or export."""


@dataclass(frozen=True)
class EvalModel:
    """A trained policy ready to load: its HF directory, its record and its conditioning (or None)."""

    path: str
    card: dict[str, Any]
    conditioning: Optional[PromptConditioning]

    @property
    def dimensions(self) -> list[str]:
        return list(self.card.get("dimensions") or [])

    @property
    def beta(self) -> float:
        return float(self.card.get("beta") or 1.0)

    @property
    def reference(self) -> Optional[str]:
        return self.card.get("reference") if self.card.get("uses_reference", True) else None


def _is_export(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") or f.endswith(".bin") for f in os.listdir(path))


def _is_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, DS_DIR)) and os.path.isdir(os.path.join(path, HF_DIR))


def _latest_checkpoint(run_dir: str) -> Optional[str]:
    steps = sorted(d for d in os.listdir(run_dir) if CHECKPOINT_DIR.match(d)
                   and _is_checkpoint(os.path.join(run_dir, d)))
    return os.path.join(run_dir, steps[-1]) if steps else None


def _from_run_dir(run_dir: str) -> Optional[str]:
    summary = os.path.join(run_dir, "raypo_summary.json")
    if os.path.exists(summary):
        with open(summary) as f:
            export = json.load(f).get("export_dir")
        if export and os.path.isdir(export) and _is_export(export):
            return export
    return _latest_checkpoint(run_dir)


def _export_checkpoint(checkpoint: str) -> str:
    from raypo.train.checkpoint import export_checkpoint

    out = os.path.join(checkpoint, EVAL_EXPORT)
    if not (os.path.isdir(out) and _is_export(out)):
        print(f"raypo: exporting {checkpoint} to {out} (once) to evaluate it", flush=True)
        export_checkpoint(checkpoint, out)
    return out


def resolve_eval_model(model: str) -> EvalModel:
    """The :class:`EvalModel` behind MODEL, or :class:`ModelNotFound` saying what was expected."""
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.isdir(path):
        raise ModelNotFound(f"MODEL {model!r} is not a directory; give a raypo run directory "
                            "(<checkpoint.storage_path>/<run_name>), a checkpoint (<run>/step_00000040) or "
                            "an exported model (checkpoint.export_path)")
    hf_dir = None
    if _is_checkpoint(path):
        hf_dir = _export_checkpoint(path)
    elif _is_export(path):
        hf_dir = path
    elif any(os.path.exists(os.path.join(path, f)) for f in ("raypo_summary.json", "raypo_run.json")):
        found = _from_run_dir(path)
        if found is None:
            raise ModelNotFound(f"run directory {model!r} has no export and no checkpoint yet; train it "
                                "first (raypo train) or pass a checkpoint directory")
        hf_dir = _export_checkpoint(found) if _is_checkpoint(found) else found
    if hf_dir is None:
        raise ModelNotFound(f"{model!r} is not a raypo run directory, checkpoint or export: expected "
                            "raypo_summary.json (a run), ds/ and hf/ (a checkpoint), or config.json and "
                            "safetensors weights (an export)")
    card_path = os.path.join(hf_dir, MODEL_CARD_FILE)
    if not os.path.exists(card_path):
        raise ModelNotFound(f"{hf_dir} has no {MODEL_CARD_FILE}: it is not a model raypo trained (or was "
                            "exported by an older raypo); its loss, beta and reference are unknown")
    with open(card_path) as f:
        card = json.load(f)
    return EvalModel(path=hf_dir, card=card, conditioning=read_conditioning(hf_dir))
