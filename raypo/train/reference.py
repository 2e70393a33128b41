"""Reference log-probs precomputed once, as a Ray Data batch-inference stage.

The reference model is frozen, so its per-response log-probs (and MallowsPO's normalised entropies) can be
computed once per dataset instead of on every step: no reference model in the training job and ~25 % fewer
step FLOPs. The stage runs :func:`raypo.model.listwise.grouped_logprobs`, the function the online reference
and the policy use, and writes two columns, one value per response:

* ``ref_logps``: summed log-probs sum_t log pi_ref(y_t | x, y_<t) (the loss divides by the token count
  itself when it wants length-normalised values);
* ``ref_entropy``: H̄(y) = sum_t H_t / (T ln|V|) (only when the loss needs a dispersion).

Exactness: in a batched forward a log-prob depends, in its last bits, on the other groups of the batch
(kernels block their sums by the padded shapes). The stage therefore scores one group per forward
(``grouped_logprobs(per_group=True)``), and a run with ``train.reference: precomputed`` computes its policy
log-probs the same way, so the implicit rewards are exactly zero at step 0 in both reference modes.

``train.reference_batching: batched`` (``per_group=False`` in :class:`ReferenceScorer`) batches the stage
instead: one forward per batch of rows rather than one per group, and the policy one forward per
micro-batch; values equal the per-group ones to float rounding (float64: 1e-12; float32: 1e-6,
tests/train/test_reference_batched.py), so step-0 rewards are then zero only to that rounding.

During training, :func:`reference_outputs` gives a micro-batch's reference values: from these columns when
the data carries them, else from the online reference engine, through the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import torch

from raypo.config import RaypoConfig
from raypo.model.batch import ListwiseBatch
from raypo.model.listwise import grouped_logprobs
from raypo.train.engines import s3_options, worker_dtype
from raypo.train.objective import Objective, sequence_logps


class ReferenceScorer:
    """Ray Data callable class: loads the reference once per actor, scores batches of tokenised rows."""

    def __init__(self, ref_path: str, dtype: str, attention: str, prefix_sharing: bool, with_entropy: bool,
                 storage_options: dict | None = None, *, per_group: bool = True):
        from raypo.model.listwise import ListwiseLogProbModel
        from raypo.model.loading import load_reference, without_zero3_init

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with without_zero3_init():  # a whole model per actor, even in a process that holds a ZeRO-3 engine
            model = load_reference(ref_path, dtype=dtype, attention=attention, prefix_sharing=prefix_sharing,
                                   storage_options=storage_options)
        self.model = ListwiseLogProbModel(model.to(self.device))
        self.prefix_sharing = prefix_sharing
        self.with_entropy = with_entropy
        self.per_group = per_group

    def __call__(self, table: pa.Table) -> pa.Table:
        from raypo.model.batch import collate_listwise

        rows = table.to_pylist()
        batch = collate_listwise(rows)
        with torch.no_grad():
            out = grouped_logprobs(self.model, batch, prefix_sharing=self.prefix_sharing,
                                   with_entropy=self.with_entropy, per_group=self.per_group)
        counts = [len(r["response_ids"]) for r in rows]
        table = _set_column(table, "ref_logps", _ragged(out.logps, counts))
        if self.with_entropy:
            table = _set_column(table, "ref_entropy", _ragged(out.entropy, counts))
        return table


def _ragged(values: torch.Tensor, counts: list[int]) -> pa.Array:
    """[B, N] padded values -> list<double> with each row cut to its own N."""
    values = values.double().cpu()
    return pa.array([values[b, :n].tolist() for b, n in enumerate(counts)], type=pa.list_(pa.float64()))


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def add_reference_logprobs(ds, cfg: RaypoConfig, ref_path: str, *, batch_size: int = 8,
                           with_entropy: bool | None = None):
    """``ds`` with ``ref_logps`` (and ``ref_entropy`` for MallowsPO) filled by the reference model.

    ``with_entropy``: also write ``ref_entropy`` (None: when ``cfg.loss`` needs a dispersion; a sweep over
    several losses asks for it when any of them does).
    """
    import ray.data

    from raypo.losses.registry import get_loss_spec

    if with_entropy is None:
        with_entropy = get_loss_spec(cfg.loss.name).needs_dispersion
    from raypo.progress import ray_data_stage

    use_gpu = cfg.scaling.use_gpu
    with ray_data_stage("reference log-probs", unit="prompts") as stage:
        scored = ds.map_batches(
            ReferenceScorer,
            fn_constructor_args=(ref_path, worker_dtype(cfg), cfg.model.attention, cfg.model.prefix_sharing,
                                 with_entropy, s3_options(cfg)),
            fn_constructor_kwargs={"per_group": cfg.train.reference_batching == "per_group"},
            batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
            num_gpus=1 if use_gpu else 0, num_cpus=1,
        ).materialize()
        stage.done = scored.count()
    return scored


@dataclass
class ReferenceOutputs:
    logps: torch.Tensor  # [B, N] reduced as the loss wants (sum or mean over tokens)
    raw_logps: torch.Tensor  # [B, N] summed log-probs
    # MallowsPO: each response's normalised reference entropy Hbar(y) [B, N] (float64; NaN = missing), from
    # which the loss takes its pair's dispersion phi(x) = -c log((Hbar_w + Hbar_l) / 2)
    dispersion: Optional[torch.Tensor]


def _precomputed(batch: ListwiseBatch, key: str) -> Optional[torch.Tensor]:
    """A precomputed per-response column, if every real response of the batch has a value."""
    values = batch.extras.get(key)
    if values is None or torch.isnan(values[batch.response_mask()]).any():
        return None
    return values


def reference_outputs(objective: Objective, reference: Any, batch: ListwiseBatch, prefix_sharing: bool,
                      device: torch.device) -> ReferenceOutputs:
    """Reference log-probs of a micro-batch from the data (precomputed) or from the ``reference`` engine
    (online; None when there is none), and MallowsPO's per-response entropies Hbar(y) (the loss takes each
    pair's dispersion from them, docs/losses.md "MallowsPO dispersion"). Precomputed entropies with gaps
    (NaN) are passed on as they are when no online reference can fill them: the loss's missing_entropy rule
    then decides (an error by default, never a silent phi = 0)."""
    num_tokens = batch.num_scored_tokens().to(device)
    needs_entropy = objective.spec.needs_dispersion
    pre_logps, pre_entropy = _precomputed(batch, "ref_logps"), _precomputed(batch, "ref_entropy")
    if pre_logps is not None and (not needs_entropy or pre_entropy is not None):
        raw = torch.nan_to_num(pre_logps.to(device=device, dtype=torch.float32))
        entropy = pre_entropy
    elif reference is not None:
        with torch.no_grad():
            out = grouped_logprobs(reference, batch, prefix_sharing=prefix_sharing,
                                   with_entropy=needs_entropy)
        raw, entropy = out.logps.float(), out.entropy
    elif not objective.uses_reference and not needs_entropy:
        zeros = torch.zeros(batch.num_groups, batch.num_responses, device=device)
        return ReferenceOutputs(zeros, zeros, None)
    elif pre_logps is not None:  # entropies with gaps and no reference to fill them: NaN = missing
        raw = torch.nan_to_num(pre_logps.to(device=device, dtype=torch.float32))
        entropy = batch.extras.get("ref_entropy")
        if entropy is None:
            entropy = torch.full((batch.num_groups, batch.num_responses), float("nan"))
    else:
        raise RuntimeError("train.reference=precomputed but the batch has no ref_logps (or ref_entropy) "
                           "values; precompute them (raypo does so when train.reference=precomputed) or "
                           "set train.reference=online")
    dispersion = entropy.to(device=device, dtype=torch.float64) if needs_entropy else None
    return ReferenceOutputs(sequence_logps(raw, num_tokens, objective.reduction), raw, dispersion)
