"""The loss registry and the single entry point :func:`listwise_loss`.

Each :class:`LossSpec` records what the trainer needs to know about a loss before calling it: the labels it
needs, whether it uses lambda or a dispersion, which log-prob reduction its source uses (``"sum"`` over
completion tokens or per-token ``"mean"``), whether it needs the reference model, and its hyperparameter
defaults (read from the loss function's signature, so they cannot drift from the code).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from raypo.losses._common import LossHyperparameterError, LossOutput
from raypo.losses.lambda_dpo import lambda_dpo_loss
from raypo.losses.lipo import (
    lipo_lambda_loss,
    lipo_list_mle_loss,
    lipo_pair_hinge_loss,
    lipo_pair_logistic_loss,
    lipo_point_mse_loss,
    lipo_point_sigmoid_loss,
    lipo_softmax_loss,
)
from raypo.losses.mallows import mallows_ipo_loss, mallows_phi_loss, mallows_theta_loss
from raypo.losses.mpo import mpo_loss, wmpo_loss
from raypo.losses.nca import infonca_loss, nca_loss
from raypo.losses.pairwise import dpo_loss, ipo_loss, simpo_loss, slic_loss

#: Label kinds. "pairwise_order": N = 2 [chosen, rejected] or scalar scores [B, N] (best vs worst);
#: "scalar_scores": scores [B, N] required; "per_dimension_scores": ratings [B, N, m] (+ lam for lambda_dpo;
#: ultrafb_best_worst_dpo picks its best and worst response from them).
LABEL_KINDS = ("pairwise_order", "scalar_scores", "per_dimension_scores")

# Arguments of every loss function that are inputs, not hyperparameters.
_INPUT_ARGS = ("policy_logps", "ref_logps", "mask", "scores", "lam", "dispersion")


@dataclass(frozen=True)
class LossSpec:
    """What the trainer needs to know about one loss.

    Attributes:
        name: registry key.
        fn: the loss function ``fn(policy_logps, ref_logps, *, mask, scores, [lam], [dispersion], **hp)``.
        family: module / paper family.
        labels: one of :data:`LABEL_KINDS`.
        needs_lambda: takes ``lam`` ([m] or [B, m]).
        needs_dispersion: takes ``dispersion`` [B] (neg-log dispersion, MallowsPO).
        logp_reduction: ``"sum"`` (log-probs summed over completion tokens) or ``"mean"``
            (length-normalised), as the loss's source computes them; :meth:`logp_reduction_for` applies a
            ``length_normalization`` hparam where the loss has one.
        reference_free: with default hparams the reference log-probs are ignored (no reference forward
            needed); :meth:`uses_reference` applies a ``reference_free`` hparam where the loss has one.
        unit: what the default denominator counts: ``"prompt"``, ``"pair"`` or ``"item"``.
        source: where the formula comes from (spec section, paper, code).
        defaults: hyperparameter defaults (``None`` = required or derived, see the docstring).
    """

    name: str
    fn: Callable[..., LossOutput]
    family: str
    labels: str
    needs_lambda: bool
    needs_dispersion: bool
    logp_reduction: str
    reference_free: bool
    unit: str
    source: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def check_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Raises :class:`LossHyperparameterError` for unknown keys, with a "did you mean" hint."""
        for key in hparams:
            if key in self.defaults:
                continue
            if key in _INPUT_ARGS:
                raise LossHyperparameterError(
                    f"loss {self.name!r}: {key!r} is an input; pass it as listwise_loss(..., {key}=...), "
                    "not inside the hyperparameters"
                )
            close = difflib.get_close_matches(key, list(self.defaults), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise LossHyperparameterError(
                f"loss {self.name!r} got an unknown hyperparameter {key!r}{hint} "
                f"(accepted: {', '.join(sorted(self.defaults))})"
            )

    def resolved(self, hparams: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """Defaults updated with ``hparams`` (after checking them)."""
        hparams = dict(hparams or {})
        self.check_hparams(hparams)
        out = dict(self.defaults)
        out.update(hparams)
        return out

    def uses_reference(self, hparams: Optional[Mapping[str, Any]] = None) -> bool:
        """Whether the loss reads ``ref_logps`` with these hyperparameters."""
        hp = self.resolved(hparams)
        if "reference_free" in hp:
            return not hp["reference_free"]
        return not self.reference_free

    def logp_reduction_for(self, hparams: Optional[Mapping[str, Any]] = None) -> str:
        """``"sum"`` or ``"mean"`` log-prob reduction with these hyperparameters."""
        hp = self.resolved(hparams)
        if "length_normalization" in hp:
            return "mean" if hp["length_normalization"] else "sum"
        return self.logp_reduction


def _defaults_of(fn: Callable[..., Any]) -> dict[str, Any]:
    sig = inspect.signature(fn)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _INPUT_ARGS
    }


def _spec(name: str, fn: Callable[..., LossOutput], family: str, labels: str, logp_reduction: str, unit: str,
          source: str, *, reference_free: bool = False, needs_lambda: bool = False,
          needs_dispersion: bool = False) -> LossSpec:
    return LossSpec(name=name, fn=fn, family=family, labels=labels, needs_lambda=needs_lambda,
                    needs_dispersion=needs_dispersion, logp_reduction=logp_reduction,
                    reference_free=reference_free, unit=unit, source=source, defaults=_defaults_of(fn))


_PO, _SC, _PD = LABEL_KINDS

LOSS_REGISTRY: dict[str, LossSpec] = {
    s.name: s
    for s in (
        _spec("dpo", dpo_loss, "pairwise", _PO, "sum", "prompt",
              "spec 1.1; Rafailov et al. Eq. 7; TRL sigmoid"),
        _spec("ipo", ipo_loss, "pairwise", _PO, "mean", "prompt", "spec 1.2; Azar et al. Eq. 17; TRL ipo"),
        _spec("slic", slic_loss, "pairwise", _PO, "sum", "prompt", "spec 1.3; TRL hinge; LiPO Eq. 6"),
        _spec("simpo", simpo_loss, "pairwise", _PO, "mean", "prompt", "spec 6.2; princeton-nlp/SimPO",
              reference_free=True),
        _spec("lipo_pair_logistic", lipo_pair_logistic_loss, "lipo", _SC, "sum", "pair",
              "spec 2.2; LiPO Eq. 5; rax.pairwise_logistic_loss"),
        _spec("lipo_pair_hinge", lipo_pair_hinge_loss, "lipo", _SC, "sum", "pair",
              "spec 2.3; LiPO Eq. 6; rax.pairwise_hinge_loss"),
        _spec("lipo_list_mle", lipo_list_mle_loss, "lipo", _SC, "sum", "prompt",
              "spec 2.4; LiPO Eq. 7; rax.listmle_loss"),
        _spec("lipo_softmax", lipo_softmax_loss, "lipo", _SC, "sum", "prompt",
              "spec 2.5; LiPO Eq. 11; rax.softmax_loss"),
        _spec("lipo_point_mse", lipo_point_mse_loss, "lipo", _SC, "sum", "item",
              "spec 2.6; LiPO Eq. 9; rax.pointwise_mse_loss"),
        _spec("lipo_point_sigmoid", lipo_point_sigmoid_loss, "lipo", _SC, "sum", "item",
              "spec 2.7; LiPO Eq. 10; rax.pointwise_sigmoid_loss"),
        _spec("lipo_lambda", lipo_lambda_loss, "lipo", _SC, "sum", "pair",
              "spec 2.8; LiPO Eq. 8; rax.pairwise_logistic_loss + rax.dcg_lambdaweight"),
        _spec("lambda_dpo", lambda_dpo_loss, "lambda_dpo", _PD, "mean", "prompt",
              "spec 3; Sun et al. arXiv 2506.19780; yuhui15/Multi-Preference-Lambda-weighted-DPO",
              needs_lambda=True),
        # The lambda-DPO trainer's pairwise baseline (spec 3.3): dpo_loss on [B, N, m] ratings (best / worst
        # by the mean over dimensions of softmax(R_k / T)) with length-normalised log-probs.
        _spec("ultrafb_best_worst_dpo", dpo_loss, "pairwise", _PD, "mean", "prompt",
              "spec 3.3; yuhui15/Multi-Preference-Lambda-weighted-DPO _compute_ultrafb_preference_loss; "
              "DPO spec 1.1"),
        _spec("mallows_theta", mallows_theta_loss, "mallows", _PO, "mean", "prompt",
              "spec 4.1; Chen et al. arXiv 2405.14953; haoxian-chen/MallowsPO mallows_dpo",
              reference_free=True, needs_dispersion=True),
        _spec("mallows_ipo", mallows_ipo_loss, "mallows", _PO, "mean", "prompt",
              "spec 4.2; haoxian-chen/MallowsPO and RainbowPO mallows_ipo", needs_dispersion=True),
        _spec("mallows_phi", mallows_phi_loss, "mallows", _PO, "sum", "prompt",
              "spec 4.4; Chen et al. arXiv 2405.14953 (exact Mallows-Kendall link)", needs_dispersion=True),
        _spec("mpo", mpo_loss, "mpo", _SC, "sum", "prompt", "spec 5; Gupta et al. arXiv 2412.04628"),
        _spec("wmpo", wmpo_loss, "mpo", _SC, "sum", "prompt",
              "spec 5; Gupta et al. arXiv 2412.04628 (W-MPO)"),
        _spec("infonca", infonca_loss, "nca", _SC, "sum", "prompt",
              "spec 6.1; Chen et al. 2024; thu-ml/Noise-Contrastive-Alignment"),
        _spec("nca", nca_loss, "nca", _SC, "sum", "prompt",
              "spec 6.1; Chen et al. 2024; thu-ml/Noise-Contrastive-Alignment (variant: listwise "
              "reward_trainer.py, pair / biased preference_trainer.py)"),
    )
}


def list_losses() -> list[str]:
    """Registered loss names, in registry order."""
    return list(LOSS_REGISTRY)


def get_loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` of ``name``; unknown names raise with the closest match."""
    try:
        return LOSS_REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(LOSS_REGISTRY), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise LossHyperparameterError(
            f"unknown loss {name!r}{hint} (known: {', '.join(LOSS_REGISTRY)})"
        ) from None


def registry_table() -> list[dict[str, Any]]:
    """One plain dict per loss (name, family, labels, needs_lambda, needs_dispersion, logp_reduction,
    reference_free, unit, source, defaults), e.g. for ``raypo`` CLI listings and docs."""
    return [
        {
            "name": s.name, "family": s.family, "labels": s.labels, "needs_lambda": s.needs_lambda,
            "needs_dispersion": s.needs_dispersion, "logp_reduction": s.logp_reduction,
            "reference_free": s.reference_free, "unit": s.unit, "source": s.source,
            "defaults": dict(s.defaults),
        }
        for s in LOSS_REGISTRY.values()
    ]


def listwise_loss(
    name: str,
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
    dispersion: Optional[Tensor] = None,
    **hparams: Any,
) -> LossOutput:
    """Computes loss ``name`` on a listwise batch; the single entry point of :mod:`raypo.losses`.

    Args:
        name: a key of :data:`LOSS_REGISTRY` (see :func:`list_losses`).
        policy_logps: ``[B, N]`` per-response sequence log-probs of the policy (summed or length-normalised,
            see :attr:`LossSpec.logp_reduction`).
        ref_logps: ``[B, N]`` reference log-probs; ``None`` (or zeros) for reference-free losses.
        mask: bool ``[B, N]``, True = real response; None = all real. Padding never changes a loss, except
            lipo_lambda with ``scale="padded"`` (RAX's list-size factor, spec identity 15).
        scores: ``[B, N]`` scalar labels (psi, ratings, rewards) or ``[B, N, m]`` per-dimension ratings
            (lambda_dpo).
        lam: ``[m]`` or ``[B, m]`` (lambda_dpo only).
        dispersion: ``[B]`` neg-log dispersion phi(x) (mallows_* only).
        **hparams: the loss's hyperparameters; unknown keys raise :class:`LossHyperparameterError`.

    Returns:
        :class:`LossOutput` with ``loss = numerator / denominator`` (0 if every prompt was skipped).
    """
    spec = get_loss_spec(name)
    spec.check_hparams(hparams)
    if ref_logps is None and spec.uses_reference(hparams):
        raise LossHyperparameterError(
            f"loss {name!r} needs ref_logps [B, N] with these hyperparameters; None is only accepted for "
            "reference-free losses (simpo, mallows_* with reference_free=True)"
        )
    kwargs: dict[str, Any] = {"mask": mask, "scores": scores}
    if spec.needs_lambda:
        kwargs["lam"] = lam
    elif lam is not None:
        raise LossHyperparameterError(
            f"loss {name!r} does not use lam (only lambda_dpo weights dimensions); drop lam"
        )
    if spec.needs_dispersion:
        kwargs["dispersion"] = dispersion
    elif dispersion is not None:
        raise LossHyperparameterError(
            f"loss {name!r} does not use dispersion (only mallows_theta, mallows_ipo and mallows_phi do)"
        )
    return spec.fn(policy_logps, ref_logps, **kwargs, **hparams)
