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

from raypo.losses import list_losses, listwise_loss, neg_log_dispersion

# A copy of spec/loss_vectors.json lives next to this file; RAYPO_LOSS_VECTORS points at another vector file
# of the same form (e.g. a held-back set).
VECTORS_PATH = Path(os.environ.get("RAYPO_LOSS_VECTORS", Path(__file__).with_name("loss_vectors.json")))


def load_vectors() -> list[dict[str, Any]]:
    return json.loads(Path(VECTORS_PATH).read_text())["vectors"]


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
}


def _t(x: Any) -> Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _batched(x: Tensor) -> Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


@dataclass
class VectorCall:
    name: str
    policy: Tensor
    ref: Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)


def vector_to_call(v: dict[str, Any]) -> VectorCall:
    """Maps one reference vector (inputs in the reference implementation's naming) to a listwise_loss call."""
    fn = v["fn"]
    name = FN_TO_LOSS.get(fn, fn[:-5] if fn.endswith("_loss") else fn)
    params = dict(v["params"])
    inp = v["inputs"]
    if "beta(tau)" in params:
        params["beta"] = params.pop("beta(tau)")
    kwargs: dict[str, Any] = {}

    if "logp_theta" in inp:
        policy = _batched(_t(inp["logp_theta"]))
        ref = _batched(_t(inp["logp_ref"])) if "logp_ref" in inp else torch.zeros_like(policy)
    else:
        policy = _batched(_t(inp["avg_logp_theta"]))
        ref = _batched(_t(inp["avg_logp_ref"])) if "avg_logp_ref" in inp else torch.zeros_like(policy)

    if "mask" in inp:
        kwargs["mask"] = _batched(torch.tensor(inp["mask"])).to(torch.bool).reshape(policy.shape)
    for key in ("psi", "scores", "labels"):
        if key in inp:
            kwargs["scores"] = _batched(_t(inp[key])).reshape(policy.shape)
    if "ranks" in inp or "ranks(1=best)" in inp:
        from raypo.losses import lipo_psi_from_ranks

        r = _batched(_t(inp.get("ranks", inp.get("ranks(1=best)"))))
        kwargs["scores"] = lipo_psi_from_ranks(r, kwargs.get("mask"))

    if name == "lambda_dpo":
        ratings = inp.get("ratings[b,k,i]")
        if ratings is not None:  # dimension-first in the vectors -> [B, N, m]
            dim_first = [[[math.nan if x is None else x for x in row] for row in b] for b in ratings]
            kwargs["scores"] = _t(dim_first).transpose(1, 2)
        elif "ratings" in inp:
            kwargs["scores"] = _t(inp["ratings"])
        kwargs["lam"] = _t(inp.get("lambda", params.pop("lambda", None)))
        target = params.pop("target", None)
        if target is not None:
            match = re.search(r"ratings\s*/\s*([0-9.eE+-]+)", target)
            if match:
                params.setdefault("temperature", float(match.group(1)))
        params.pop("m", None)
        params.pop("N", None)

    if name.startswith("mallows"):
        c = params.pop("c", None)
        if "Hbar_w" in inp:
            hw, hl = _t(inp["Hbar_w"]).reshape(-1), _t(inp["Hbar_l"]).reshape(-1)
            kwargs["dispersion"] = neg_log_dispersion((hw, hl), c=0.29 if c is None else c)
        elif "neg_log_dispersion" in inp:
            kwargs["dispersion"] = _t(inp["neg_log_dispersion"]).reshape(-1)
        elif "phi" in params:  # a Mallows dispersion varphi in (0, 1)
            kwargs["dispersion"] = -torch.log(_t(params.pop("phi"))).reshape(-1)
        if "dispersion" in kwargs and kwargs["dispersion"].numel() == 1:
            kwargs["dispersion"] = kwargs["dispersion"].expand(policy.shape[0]).clone()
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
PAIRWISE = ("dpo", "ipo", "slic", "simpo", "mallows_theta", "mallows_ipo", "mallows_phi")
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
    if name == "lambda_dpo":
        scores = torch.randint(1, 6, (batch, n, M_DIMS), generator=g).to(torch.float64)
        scores[0, 1, 2] = math.nan  # a missing rating -> default_rating
        e = -torch.log(torch.rand(batch, M_DIMS, generator=g, dtype=torch.float64))  # Dirichlet(1)
        lam = e / e.sum(-1, keepdim=True)
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
