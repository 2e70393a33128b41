"""Helpers for the loss tests: the reference-vector adapter and random inputs for every registered loss."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from raypo.losses import get_loss_spec, list_losses, listwise_loss, neg_log_dispersion
from raypo.losses.label_rules import impute_ratings
from raypo.losses.labels import DEFAULT_RATING
from raypo.losses.mallows import DEFAULT_C

# A copy of tests/losses/loss_vectors.json lives next to this file; RAYPO_LOSS_VECTORS points at another
# vector file
# of the same form (e.g. a held-back set).
BUNDLED_VECTORS_PATH = Path(__file__).with_name("loss_vectors.json")
VECTORS_PATH = Path(os.environ.get("RAYPO_LOSS_VECTORS", BUNDLED_VECTORS_PATH))


def load_vectors(path: Optional[Path] = None) -> list[dict[str, Any]]:
    """The vectors of ``path`` (default: ``RAYPO_LOSS_VECTORS`` or the bundled copy of the spec's file)."""
    return json.loads(Path(VECTORS_PATH if path is None else path).read_text())["vectors"]


# --------------------------------------------------------------------------------------------------
# Reference vectors -> listwise_loss calls
# --------------------------------------------------------------------------------------------------

# Reference-implementation function name -> registry name.
FN_TO_LOSS = {
    "dpo_sigmoid_loss": "dpo",
    "dpo_loss": "dpo",
    "ipo_loss": "ipo",
    "slic_hinge_loss": "slic",
    "slic_loss": "slic",
    "simpo_loss": "simpo",
    "lipo_pair_logistic": "lipo_pair_logistic",
    "lipo_pair_hinge": "lipo_pair_hinge",
    "lipo_list_mle": "lipo_list_mle",
    "lipo_softmax": "lipo_softmax",
    "lipo_point_mse": "lipo_point_mse",
    "lipo_point_sigmoid": "lipo_point_sigmoid",
    "lipo_lambda_loss": "lipo_lambda",
    "lipo_lambda": "lipo_lambda",
    "lambda_dpo_loss": "lambda_dpo",
    "mallows_theta_loss": "mallows_theta",
    "mallows_ipo_loss": "mallows_ipo",
    "mallows_phi_loss": "mallows_phi",
    "mpo_loss": "mpo",
    "wmpo_loss": "wmpo",
    "infonca_loss": "infonca",
    "nca_loss": "nca",
    "ultrafb_best_worst_dpo": "ultrafb_best_worst_dpo",
}

# Reference function names of loss variants that raypo reaches through a hyperparameter.
FN_TO_VARIANT: dict[str, tuple[str, dict[str, Any]]] = {
    "pairwise_nca_loss": ("nca", {"variant": "pair"}),
    "nca_pair_loss": ("nca", {"variant": "pair"}),
    "nca_pairwise_loss": ("nca", {"variant": "pair"}),
    "pair_nca_loss": ("nca", {"variant": "pair"}),
    "biased_nca_loss": ("nca", {"variant": "biased"}),
    "biasednca_loss": ("nca", {"variant": "biased"}),
    "nca_biased_loss": ("nca", {"variant": "biased"}),
}
NCA_VARIANT_NAMES = {"pairwise": "pair", "nca": "pair", "biasednca": "biased", "biased_nca": "biased"}

# Vector params that describe the case rather than set a hyperparameter (dropped unless the loss takes them).
INFO_PARAMS = ("m", "N", "K", "B", "order", "logp_kind", "target")


def _num(x: Any) -> float:
    """One JSON leaf -> float. Numbers and bools as they are; None, "N/A", "" and anything else that does
    not parse -> NaN (docs/loss_reference.md §3.2: such a rating is missing; at padding the value is never
    read)."""
    if isinstance(x, (bool, int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return math.nan
    return math.nan


def _shape(x: Any) -> tuple[int, ...]:
    """The padded shape of a (possibly ragged) nested list: the longest length at every depth."""
    if not isinstance(x, (list, tuple)):
        return ()
    subs = [_shape(v) for v in x]
    depth = max((len(sh) for sh in subs), default=0)
    return (len(x), *(max((sh[d] for sh in subs if len(sh) > d), default=0) for d in range(depth)))


def _fill(x: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
    """``x`` padded to ``shape`` with NaN; also whether each entry was present in ``x``."""
    if not shape:
        return (_num(x), True) if not isinstance(x, (list, tuple)) else (math.nan, False)
    items = list(x) if isinstance(x, (list, tuple)) else []
    vals, present = [], []
    for i in range(shape[0]):
        v, p = _fill(items[i], shape[1:]) if i < len(items) else _fill(None, shape[1:])
        if i >= len(items):
            p = _absent(p)
        vals.append(v)
        present.append(p)
    return vals, present


def _absent(p: Any) -> Any:
    return [_absent(v) for v in p] if isinstance(p, list) else False


def _t_present(x: Any) -> tuple[Tensor, Tensor]:
    """A nested list (ragged rows allowed) -> (float64 tensor with NaN for missing / padded entries, bool
    tensor: the entry was given, not added by padding a ragged row)."""
    vals, present = _fill(x, _shape(x))
    return torch.tensor(vals, dtype=torch.float64), torch.tensor(present, dtype=torch.bool)


def _t(x: Any) -> Tensor:
    return _t_present(x)[0]


def tensor_like(x: Any, shape: torch.Size) -> Tensor:
    """An expected quantity (nulls allowed) as a float64 tensor of ``shape`` (NaN = not given)."""
    t = _t(x)
    return t.reshape(shape) if t.numel() == math.prod(shape) else t


def _batched(x: Tensor) -> Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def _labels(x: Any, like: Tensor) -> Tensor:
    """Scalar labels ``[B, N]`` (flat or nested) or per-response ratings ``[B, N, m]`` / ``[N, m]``."""
    t = _t(x)
    if t.numel() == like.numel():
        return t.reshape(like.shape)
    if t.dim() == 2 and like.shape[0] == 1 and t.shape[0] == like.shape[1]:
        return t.unsqueeze(0)  # [N, m] ratings of a single prompt
    return t


def _mask(x: Any, like: Tensor) -> Tensor:
    """A 0/1 or bool mask (nulls = padding) reshaped to ``like``."""
    m = _t(x)
    return (torch.nan_to_num(m, nan=0.0) != 0).reshape(like.shape)


@dataclass
class VectorCall:
    name: str
    policy: Tensor
    ref: Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)


def vector_loss_name(v: dict[str, Any]) -> str:
    fn = v["fn"]
    if fn in FN_TO_VARIANT:
        return FN_TO_VARIANT[fn][0]
    return FN_TO_LOSS.get(fn, fn[:-5] if fn.endswith("_loss") else fn)


def _temperature_from_target(target: Any) -> Optional[float]:
    match = re.search(r"ratings\s*/\s*([0-9.eE+-]+)", str(target))
    return float(match.group(1)) if match else None


def vector_to_call(v: dict[str, Any]) -> VectorCall:
    """Maps one reference vector (inputs in the reference implementation's naming) to a listwise_loss call.

    Robust to the forms a vector file may use: ragged rows (padded, masked), null / "N/A" entries (NaN:
    masked at padding, invalid labels, missing ratings -> the loss's default rating), bool or 0/1 masks.
    """
    fn = v["fn"]
    name = vector_loss_name(v)
    params = dict(v["params"])
    if fn in FN_TO_VARIANT:
        for key, value in FN_TO_VARIANT[fn][1].items():
            params.setdefault(key, value)
    inp = v["inputs"]
    if "beta(tau)" in params:
        params["beta"] = params.pop("beta(tau)")
    if name == "nca" and "variant" not in params and params.get("loss_type") in ("NCA", "biasedNCA"):
        params["variant"] = params.pop("loss_type")  # preference_trainer.py's pairwise loss_type names
    if name == "nca" and isinstance(params.get("variant"), str):
        params["variant"] = NCA_VARIANT_NAMES.get(params["variant"].lower(), params["variant"])
    kwargs: dict[str, Any] = {}

    theta_key, ref_key = ("logp_theta", "logp_ref")
    if theta_key not in inp:
        theta_key, ref_key = ("avg_logp_theta", "avg_logp_ref")
    policy, present = _t_present(inp[theta_key])
    policy, present = _batched(policy), _batched(present)
    if ref_key in inp:
        ref, ref_present = _t_present(inp[ref_key])
        ref, ref_present = _batched(ref).reshape(policy.shape), _batched(ref_present).reshape(policy.shape)
    else:
        ref, ref_present = torch.zeros_like(policy), torch.ones_like(present)

    if "mask" in inp:
        kwargs["mask"] = _mask(inp["mask"], policy)
    else:
        # No mask given: null log-probs and the tails of ragged rows are padding.
        given = present & ref_present & ~torch.isnan(policy) & ~torch.isnan(ref)
        if not bool(given.all()):
            kwargs["mask"] = given
    for key in ("psi", "scores", "labels"):
        if key in inp:
            kwargs["scores"] = _batched(_labels(inp[key], policy))
    if "ranks" in inp or "ranks(1=best)" in inp:
        from raypo.losses import lipo_psi_from_ranks

        r = _batched(_labels(inp.get("ranks", inp.get("ranks(1=best)")), policy))
        kwargs["scores"] = lipo_psi_from_ranks(r, kwargs.get("mask"))
    ratings = inp.get("ratings[b,k,i]")
    if ratings is not None:  # dimension-first in the vectors -> [B, N, m]
        r = _t(ratings)
        kwargs["scores"] = (r.unsqueeze(0) if r.dim() == 2 else r).transpose(1, 2)
    elif "ratings" in inp:
        kwargs["scores"] = _labels(inp["ratings"], policy)

    spec_defaults = get_loss_spec(name).defaults if name in list_losses() else {}
    if "target" in params and "temperature" in spec_defaults:
        temperature = _temperature_from_target(params["target"])
        if temperature is not None:
            params.setdefault("temperature", temperature)
    if "T" in params and "T" not in spec_defaults and "temperature" in spec_defaults:
        params.setdefault("temperature", params.pop("T"))

    if name == "lambda_dpo":
        lam = inp.get("lambda", params.pop("lambda", None))
        kwargs["lam"] = None if lam is None else _t(lam)
        # The vectors follow the official lambda-DPO converter: a missing rating is 1.0 (docs/losses.md
        # "Missing ratings", the impute rule), not raypo's default drop rule.
        params.setdefault("missing_ratings", "impute")
    if name == "ultrafb_best_worst_dpo" and kwargs.get("scores") is not None:
        kwargs["scores"] = impute_ratings(kwargs["scores"], params.get("default_rating", DEFAULT_RATING))

    if name.startswith("mallows"):
        c = params.pop("c", None)
        if "Hbar_w" in inp:
            hw, hl = _t(inp["Hbar_w"]).reshape(-1), _t(inp["Hbar_l"]).reshape(-1)
            c = DEFAULT_C if c is None else c  # MallowsPO's shipped neg_log_dispersion_mean
            kwargs["dispersion"] = neg_log_dispersion((hw, hl), c=c)
        elif "neg_log_dispersion" in inp:
            kwargs["dispersion"] = _t(inp["neg_log_dispersion"]).reshape(-1)
        elif "phi" in params:  # a Mallows dispersion varphi in (0, 1)
            kwargs["dispersion"] = -torch.log(_t(params.pop("phi"))).reshape(-1)
        if "dispersion" in kwargs and kwargs["dispersion"].numel() == 1:
            kwargs["dispersion"] = kwargs["dispersion"].expand(policy.shape[0]).clone()
    for key in INFO_PARAMS:
        if key not in spec_defaults:
            params.pop(key, None)
    return VectorCall(name, policy, ref, kwargs, params)


def run_vector(v: dict[str, Any]) -> tuple[Any, Tensor]:
    """Returns ``(LossOutput, grad w.r.t. policy logps)`` in float64."""
    call = vector_to_call(v)
    policy = call.policy.clone().requires_grad_(True)
    out = listwise_loss(call.name, policy, call.ref, **call.kwargs, **call.hparams)
    (grad,) = torch.autograd.grad(out.loss, policy, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(policy)
    return out, grad


# --------------------------------------------------------------------------------------------------
# Random inputs for every loss
# --------------------------------------------------------------------------------------------------

ALL_LOSSES = list_losses()
PAIRWISE = ("dpo", "ipo", "slic", "simpo", "mallows_theta", "mallows_ipo", "mallows_phi",
            "ultrafb_best_worst_dpo")
#: Losses whose ``scores`` are per-dimension ratings [B, N, m].
RATED = ("lambda_dpo", "ultrafb_best_worst_dpo")
M_DIMS = 4


@dataclass
class Case:
    name: str
    policy: Tensor
    ref: Tensor
    mask: Tensor
    scores: Tensor
    lam: Optional[Tensor] = None
    dispersion: Optional[Tensor] = None
    hparams: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"mask": self.mask, "scores": self.scores}
        if self.lam is not None:
            kw["lam"] = self.lam
        if self.dispersion is not None:
            kw["dispersion"] = self.dispersion
        return kw

    def call(self, policy: Optional[Tensor] = None) -> Any:
        return listwise_loss(self.name, self.policy if policy is None else policy, self.ref, **self.kwargs(),
                             **self.hparams)

    def rows(self, idx: slice) -> Case:
        def take(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x[idx]

        return Case(self.name, self.policy[idx], self.ref[idx], self.mask[idx], self.scores[idx],
                    take(self.lam), take(self.dispersion), dict(self.hparams))


def make_case(name: str, batch: int = 5, n: int = 6, *, dtype: torch.dtype = torch.float64, seed: int = 0,
              full: bool = False, logp_scale: float = 3.0) -> Case:
    """Random valid inputs for loss ``name``: variable list length (>= 2 valid), distinct labels."""
    g = torch.Generator().manual_seed(seed)
    ref = -20.0 + logp_scale * torch.randn(batch, n, generator=g, dtype=torch.float64)
    policy = ref + logp_scale * torch.randn(batch, n, generator=g, dtype=torch.float64)
    if full:
        mask = torch.ones(batch, n, dtype=torch.bool)
    else:
        lengths = torch.randint(2, n + 1, (batch,), generator=g)
        lengths[0] = n
        mask = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
    scores = torch.rand(batch, n, generator=g, dtype=torch.float64)
    lam = dispersion = None
    hparams: dict[str, Any] = {}
    if name in RATED:
        scores = torch.randint(1, 6, (batch, n, M_DIMS), generator=g).to(torch.float64)
        scores[0, 1, 2] = math.nan  # a missing rating -> default_rating
        e = -torch.log(torch.rand(batch, M_DIMS, generator=g, dtype=torch.float64))  # Dirichlet(1)
        lam = e / e.sum(-1, keepdim=True) if name == "lambda_dpo" else None
    if name.startswith("mallows"):
        dispersion = 0.5 + torch.rand(batch, generator=g, dtype=torch.float64)
    if name in ("mallows_theta",):
        hparams = {"beta": 0.5}  # the shipped beta = 10 saturates the sigmoid at these log-prob scales
    if name == "wmpo":
        hparams = {"alpha": 0.5}
    if name in ("infonca", "nca"):
        hparams = {"temperature_alpha": 0.3, "beta": 0.1}
    if name == "mallows_phi":
        hparams = {"beta": 0.3}
    policy = policy.masked_fill(~mask, math.nan)  # padding garbage must never leak
    return Case(name, policy.to(dtype), ref.to(dtype), mask, scores.to(dtype),
                None if lam is None else lam.to(dtype), None if dispersion is None else dispersion.to(dtype),
                hparams)
