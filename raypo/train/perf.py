"""Where a worker's time goes, and the model FLOPs a step does.

The loop's clock (:class:`LoopWindow`), per logging window, on every rank:

* ``perf/step_s``: mean seconds in :meth:`ListwiseRecipe.train_step` per step;
* ``perf/data_wait_s``: mean seconds per step waiting for the step's micro-batches (Ray Data, and the
  all-reduce that checks every rank has them);
* ``perf/report_wait_s``: mean seconds per step spent handing results to Ray Train (``ray.train.report``
  without a checkpoint) and writing the metrics row;
* ``perf/loop_efficiency``: train-step time / wall time of the window. Evaluations and checkpoints (their
  save and upload) are left out of the wall time: they are work the run asked for, not loop overhead.

All are means over ranks. Model FLOPs (:func:`step_flops`), following the PaLM paper, Appendix B: a
forward and backward pass costs ``6 N`` FLOPs per token (``N``: the parameters of every matmul a token goes
through, the lm_head included, the input embedding lookup not), plus ``12 L h`` per attended (query, key)
pair (``QK^T`` and ``AV``: 4 h FLOPs per pair and layer forward, 3x for forward + backward), counted causally
as the computation needs them: with prefix sharing a group's prompt once (``P (P + 1) / 2`` pairs) and each
response over the prompt and itself (``R_i P + R_i (R_i + 1) / 2``); unshared, every response row
``(P + R_i)(P + R_i + 1) / 2``. Tokens are the trained ones (prompt once with prefix sharing), padding
excluded. The reference model's forward is not counted. ``perf/mfu`` divides by the device's peak dense bf16
FLOP/s (:data:`PEAK_BF16_FLOPS`); it is logged on GPUs in that table only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from raypo.model.batch import ListwiseBatch

#: Peak dense bf16 tensor-core FLOP/s per device (vendor data sheets, SXM parts, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


def peak_flops(device: torch.device) -> Optional[float]:
    """The device's peak bf16 FLOP/s from :data:`PEAK_BF16_FLOPS`; None on CPU or an unlisted GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


@dataclass(frozen=True)
class FlopsModel:
    """What the FLOP count needs of the model: matmul parameters per token, layers, attention width."""

    matmul_params: int
    num_layers: int
    attention_width: int  # num_heads x head_dim

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> Optional[FlopsModel]:
        """From a Llama / Qwen2 / Mistral-like ``transformers`` config; None for a shape it cannot read."""
        from raypo.model.shape import ModelShape

        try:
            raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
            shape = ModelShape.from_hf_config(raw)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return cls(matmul_params=shape.decoder_matmul_params() + shape.embedding_params,
                   num_layers=shape.num_layers, attention_width=shape.num_heads * shape.head_dim)

    def flops(self, tokens: float, pairs: float) -> float:
        """Forward + backward FLOPs of ``tokens`` tokens attending ``pairs`` (query, key) pairs."""
        return 6.0 * self.matmul_params * tokens + 12.0 * self.num_layers * self.attention_width * pairs


def attended_pairs(batch: ListwiseBatch, prefix_sharing: bool) -> int:
    """Causal (query, key) pairs of ``batch``'s forward in its layout (see the module docstring)."""
    total = 0
    for prompt, responses in zip(batch.prompt_ids, batch.response_ids):
        p = len(prompt)
        if prefix_sharing:
            total += p * (p + 1) // 2 + sum(len(r) * p + len(r) * (len(r) + 1) // 2 for r in responses)
        else:
            total += sum((p + len(r)) * (p + len(r) + 1) // 2 for r in responses)
    return total


@dataclass
class LoopWindow:
    """The clock of one logging window on one rank (perf_counter seconds)."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    step_s: float = 0.0
    data_wait_s: float = 0.0
    report_wait_s: float = 0.0
    excluded_s: float = 0.0  # evaluations and checkpoints inside the window

    def add_step(self, data_wait_s: float, step_s: float) -> None:
        self.steps += 1
        self.data_wait_s += data_wait_s
        self.step_s += step_s

    def wall(self, now: float) -> float:
        return max(now - self.start - self.excluded_s, 1e-9)

    def sums(self, now: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """This rank's timing entries for the window's metric sums (reduced with the rest)."""
        one = torch.ones((), dtype=torch.float64)
        steps = torch.tensor(float(max(self.steps, 1)), dtype=torch.float64)

        def t(x: float) -> torch.Tensor:
            return torch.tensor(float(x), dtype=torch.float64)

        if not self.steps:
            return {}
        return {"perf/step_s": (t(self.step_s), steps), "perf/data_wait_s": (t(self.data_wait_s), steps),
                "perf/report_wait_s": (t(self.report_wait_s), steps),
                "perf/loop_efficiency": (t(min(self.step_s / self.wall(now), 1.0)), one),
                "perf/window_s": (t(self.wall(now)), one)}
