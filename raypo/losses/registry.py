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

import torch
from torch import Tensor

from raypo.losses._common import LossHyperparameterError, LossOutput, compute_dtype_of, prepare_mask
from raypo.losses.lambda_dpo import lambda_dpo_denominator, lambda_dpo_loss
from raypo.losses.lipo import (
    lipo_lambda_loss,
    lipo_list_denominator,
    lipo_list_mle_loss,
    lipo_pair_denominator,
    lipo_pair_hinge_loss,
    lipo_pair_logistic_loss,
    lipo_point_denominator,
    lipo_point_mse_loss,
    lipo_point_sigmoid_loss,
    lipo_softmax_loss,
)
from raypo.losses.mallows import mallows_ipo_loss, mallows_phi_loss, mallows_theta_loss
from raypo.losses.mpo import mpo_denominator, mpo_loss, wmpo_loss
from raypo.losses.nca import infonca_denominator, infonca_loss, nca_denominator, nca_loss
from raypo.losses.pairwise import dpo_loss, ipo_loss, pair_denominator, simpo_loss, slic_loss

#: Label kinds. "pairwise_order": N = 2 [chosen, rejected] or scalar scores [B, N] (best vs worst);
#: "scalar_scores": scores [B, N] required; "per_dimension_scores": ratings [B, N, m] (+ lam for lambda_dpo;
#: ultrafb_best_worst_dpo picks its best and worst response from them).
LABEL_KINDS = ("pairwise_order", "scalar_scores", "per_dimension_scores")

# Arguments of every loss function that are inputs, not hyperparameters.
_INPUT_ARGS = ("policy_logps", "ref_logps", "mask", "scores", "lam", "dispersion", "ref_entropy")


@dataclass(frozen=True)
class LossSpec:
    """What the trainer needs to know about one loss.

    Attributes:
        name: registry key.
        fn: the loss function ``fn(policy_logps, ref_logps, *, mask, scores, [lam], [dispersion],
            [ref_entropy], **hp)``.
        family: module / paper family.
        labels: one of :data:`LABEL_KINDS`.
        needs_lambda: takes ``lam`` ([m] or [B, m]).
        needs_dispersion: takes ``dispersion`` [B] (neg-log dispersion, MallowsPO) or ``ref_entropy``
            [B, N] (per-response normalised reference entropies, the pair's dispersion taken by the loss).
        logp_reduction: ``"sum"`` (log-probs summed over completion tokens) or ``"mean"``
            (length-normalised), as the loss's source computes them; :meth:`logp_reduction_for` applies a
            ``length_normalization`` hparam where the loss has one.
        reference_free: with default hparams the reference log-probs are ignored (no reference forward
            needed); :meth:`uses_reference` applies a ``reference_free`` hparam where the loss has one.
        unit: what the default denominator counts: ``"prompt"``, ``"pair"`` or ``"item"``.
        source: where the formula comes from (section of docs/loss_reference.md, paper equation, code).
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
    #: ``denominator_fn(mask [B, N] bool, scores, *, dtype, name, [lam], **resolved_hparams) -> Tensor``: the
    #: label-only part of ``fn`` that counts its units (see :meth:`denominator`).
    denominator_fn: Optional[Callable[..., Tensor]] = field(default=None, repr=False, compare=False)

    def denominator(
        self,
        mask: Optional[Tensor] = None,
        scores: Optional[Tensor] = None,
        lam: Optional[Tensor] = None,
        *,
        dispersion: Optional[Tensor] = None,
        ref_entropy: Optional[Tensor] = None,
        shape: Optional[tuple[int, ...]] = None,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        **hparams: Any,
    ) -> Tensor:
        """``listwise_loss(self.name, policy_logps, ref_logps, mask=mask, scores=scores, lam=lam,
        **hparams).denominator`` for any log-probs, from the labels alone; the loss is not evaluated.

        The trainer calls this before any forward pass to normalise an optimizer step globally (the sum
        of these over the step's micro-batches and ranks).

        Args:
            mask, scores, lam: as for :func:`listwise_loss` (lam only for lambda_dpo, where it is checked).
            dispersion, ref_entropy: accepted for symmetry with :func:`listwise_loss` and ignored (they
                never change a count: a prompt with a missing entropy still counts, docs/losses.md
                "MallowsPO dispersion"); only mallows_* accept them.
            shape: ``(B, N)`` when ``mask`` is None; default: ``scores.shape[:2]``.
            dtype: the dtype of the policy log-probs the loss will get; the result is in the loss's
                compute dtype (float64 for float64, else float32), as ``LossOutput.denominator``.
            device: the log-probs' device; default: ``mask``'s, else ``scores``'.
            **hparams: the loss's hyperparameters (unknown keys raise); only those that change the count
                (e.g. LiPO ``reduction``, nca ``variant``, the rating ``temperature``) are read.

        Returns:
            A float scalar tensor without grad.
        """
        if self.denominator_fn is None:
            raise LossHyperparameterError(f"loss {self.name!r} has no label-only denominator")
        hp = self.resolved(hparams)
        if lam is not None and not self.needs_lambda:
            raise LossHyperparameterError(
                f"loss {self.name!r} does not use lam (only lambda_dpo weights dimensions); drop lam"
            )
        if (dispersion is not None or ref_entropy is not None) and not self.needs_dispersion:
            raise LossHyperparameterError(
                f"loss {self.name!r} does not use dispersion or ref_entropy (only mallows_theta, mallows_ipo "
                "and mallows_phi do)"
            )
        if shape is None:
            if mask is not None:
                shape = tuple(mask.shape)
            elif scores is not None:
                shape = tuple(scores.shape[:2])
        if shape is None or len(shape) != 2:
            raise LossHyperparameterError(
                f"loss {self.name!r}: the denominator needs mask [B, N] or shape=(B, N), got "
                f"{None if shape is None else tuple(shape)}"
            )
        if device is None:
            device = mask.device if mask is not None else (scores.device if scores is not None else None)
        mask_t = prepare_mask(self.name, mask, torch.Size(shape), torch.device("cpu") if device is None
                              else torch.device(device))
        kwargs: dict[str, Any] = {"lam": lam} if self.needs_lambda else {}
        out = self.denominator_fn(mask_t, scores, dtype=compute_dtype_of(dtype), name=self.name, **kwargs,
                                  **hp)
        return out.detach()

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
            value = hp["length_normalization"]
            if value is None:  # follows reference_free (mpo: SimPO's per-token mean when reference-free)
                value = bool(hp.get("reference_free", False))
            return "mean" if value else "sum"
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
                    reference_free=reference_free, unit=unit, source=source, defaults=_defaults_of(fn),
                    denominator_fn=_DENOMINATOR_OF[fn])


# Loss function -> its label-only denominator (the part of the loss that decides which units count).
_DENOMINATOR_OF: dict[Callable[..., LossOutput], Callable[..., Tensor]] = {
    dpo_loss: pair_denominator,
    ipo_loss: pair_denominator,
    slic_loss: pair_denominator,
    simpo_loss: pair_denominator,
    mallows_theta_loss: pair_denominator,
    mallows_ipo_loss: pair_denominator,
    mallows_phi_loss: pair_denominator,
    lipo_pair_logistic_loss: lipo_pair_denominator,
    lipo_pair_hinge_loss: lipo_pair_denominator,
    lipo_lambda_loss: lipo_pair_denominator,
    lipo_point_mse_loss: lipo_point_denominator,
    lipo_point_sigmoid_loss: lipo_point_denominator,
    lipo_list_mle_loss: lipo_list_denominator,
    lipo_softmax_loss: lipo_list_denominator,
    lambda_dpo_loss: lambda_dpo_denominator,
    mpo_loss: mpo_denominator,
    wmpo_loss: mpo_denominator,
    infonca_loss: infonca_denominator,
    nca_loss: nca_denominator,
}


_PO, _SC, _PD = LABEL_KINDS

LOSS_REGISTRY: dict[str, LossSpec] = {
    s.name: s
    for s in (
        _spec("dpo", dpo_loss, "pairwise", _PO, "sum", "prompt",
              "docs/loss_reference.md §1.1; Rafailov et al. Eq. 7; TRL sigmoid"),
        _spec("ipo", ipo_loss, "pairwise", _PO, "mean", "prompt",
              "docs/loss_reference.md §1.2; Azar et al. Eq. 17; TRL ipo"),
        _spec("slic", slic_loss, "pairwise", _PO, "sum", "prompt",
              "docs/loss_reference.md §1.3; TRL hinge; LiPO Eq. 6"),
        _spec("simpo", simpo_loss, "pairwise", _PO, "mean", "prompt",
              "docs/loss_reference.md §6.2; Meng et al. arXiv 2405.14734; princeton-nlp/SimPO",
              reference_free=True),
        _spec("lipo_pair_logistic", lipo_pair_logistic_loss, "lipo", _SC, "sum", "pair",
              "docs/loss_reference.md §2.2; LiPO Eq. 5; rax.pairwise_logistic_loss"),
        _spec("lipo_pair_hinge", lipo_pair_hinge_loss, "lipo", _SC, "sum", "pair",
              "docs/loss_reference.md §2.3; LiPO Eq. 6; rax.pairwise_hinge_loss"),
        _spec("lipo_list_mle", lipo_list_mle_loss, "lipo", _SC, "sum", "prompt",
              "docs/loss_reference.md §2.4; LiPO Eq. 7; rax.listmle_loss"),
        _spec("lipo_softmax", lipo_softmax_loss, "lipo", _SC, "sum", "prompt",
              "docs/loss_reference.md §2.5; LiPO Eq. 11; rax.softmax_loss"),
        _spec("lipo_point_mse", lipo_point_mse_loss, "lipo", _SC, "sum", "item",
              "docs/loss_reference.md §2.6; LiPO Eq. 9; rax.pointwise_mse_loss"),
        _spec("lipo_point_sigmoid", lipo_point_sigmoid_loss, "lipo", _SC, "sum", "item",
              "docs/loss_reference.md §2.7; LiPO Eq. 10; rax.pointwise_sigmoid_loss"),
        _spec("lipo_lambda", lipo_lambda_loss, "lipo", _SC, "sum", "pair",
              "docs/loss_reference.md §2.8; LiPO Eq. 8; rax.pairwise_logistic_loss + rax.dcg_lambdaweight"),
        _spec("lambda_dpo", lambda_dpo_loss, "lambda_dpo", _PD, "mean", "prompt",
              "docs/loss_reference.md §3.1; Sun et al. arXiv 2506.19780; "
              "yuhui15/Multi-Preference-Lambda-weighted-DPO",
              needs_lambda=True),
        # The lambda-DPO trainer's pairwise baseline (docs/loss_reference.md §3.3): dpo_loss on [B, N, m]
        # ratings (best / worst by the mean over dimensions of softmax(R_k / T)) with length-normalised
        # log-probs.
        _spec("ultrafb_best_worst_dpo", dpo_loss, "pairwise", _PD, "mean", "prompt",
              "docs/loss_reference.md §3.3; yuhui15/Multi-Preference-Lambda-weighted-DPO "
              "_compute_ultrafb_preference_loss; DPO: docs/loss_reference.md §1.1, Rafailov et al. Eq. 7"),
        _spec("mallows_theta", mallows_theta_loss, "mallows", _PO, "mean", "prompt",
              "docs/loss_reference.md §4.1; Chen et al. arXiv 2405.14953; haoxian-chen/MallowsPO mallows_dpo",
              reference_free=True, needs_dispersion=True),
        _spec("mallows_ipo", mallows_ipo_loss, "mallows", _PO, "mean", "prompt",
              "docs/loss_reference.md §4.2; haoxian-chen/MallowsPO and RainbowPO mallows_ipo",
              needs_dispersion=True),
        _spec("mallows_phi", mallows_phi_loss, "mallows", _PO, "sum", "prompt",
              "docs/loss_reference.md §4.4, §4.5; Chen et al. arXiv 2405.14953 (Mallows-Kendall link; "
              "App. C.5 smooth approximations)",
              needs_dispersion=True),
        _spec("mpo", mpo_loss, "mpo", _SC, "sum", "prompt",
              "docs/loss_reference.md §5.2, §5.4; Gupta et al. arXiv 2412.04628"),
        _spec("wmpo", wmpo_loss, "mpo", _SC, "sum", "prompt",
              "docs/loss_reference.md §5.3; Gupta et al. arXiv 2412.04628 (W-MPO, Eq. 6-7)"),
        _spec("infonca", infonca_loss, "nca", _SC, "sum", "prompt",
              "docs/loss_reference.md §6.1; Chen et al. arXiv 2402.05369; "
              "thu-ml/Noise-Contrastive-Alignment"),
        _spec("nca", nca_loss, "nca", _SC, "sum", "prompt",
              "docs/loss_reference.md §6.1; Chen et al. arXiv 2402.05369; thu-ml/Noise-Contrastive-Alignment "
              "(variant: listwise "
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
    ref_entropy: Optional[Tensor] = None,
    **hparams: Any,
) -> LossOutput:
    """Computes loss ``name`` on a listwise batch; the single entry point of :mod:`raypo.losses`.

    Args:
        name: a key of :data:`LOSS_REGISTRY` (see :func:`list_losses`).
        policy_logps: ``[B, N]`` per-response sequence log-probs of the policy (summed or length-normalised,
            see :attr:`LossSpec.logp_reduction`).
        ref_logps: ``[B, N]`` reference log-probs; ``None`` (or zeros) for reference-free losses.
        mask: bool ``[B, N]``, True = real response; None = all real. Padding never changes a loss, except
            lipo_lambda with ``scale="padded"`` (RAX's list-size factor; docs/loss_reference.md §2.8 and
            §7 identity 15).
        scores: ``[B, N]`` scalar labels (psi, ratings, rewards) or ``[B, N, m]`` per-dimension ratings
            (lambda_dpo).
        lam: ``[m]`` or ``[B, m]`` (lambda_dpo only).
        dispersion: ``[B]`` neg-log dispersion phi(x) (mallows_* only).
        ref_entropy: ``[B, N]`` per-response normalised reference entropies Hbar(y) (mallows_* only; instead
            of ``dispersion``: the loss takes phi(x) = -c log((Hbar_w + Hbar_l) / 2) from the pair it
            chooses, c = the ``dispersion_c`` hyperparameter).
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
        kwargs["ref_entropy"] = ref_entropy
    elif dispersion is not None or ref_entropy is not None:
        raise LossHyperparameterError(
            f"loss {name!r} does not use dispersion or ref_entropy (only mallows_theta, mallows_ipo and "
            "mallows_phi do)"
        )
    return spec.fn(policy_logps, ref_logps, **kwargs, **hparams)


def loss_denominator(
    name: str,
    *,
    mask: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
    dispersion: Optional[Tensor] = None,
    ref_entropy: Optional[Tensor] = None,
    shape: Optional[tuple[int, ...]] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    **hparams: Any,
) -> Tensor:
    """``listwise_loss(name, ...).denominator`` from the labels alone (:meth:`LossSpec.denominator`)."""
    return get_loss_spec(name).denominator(mask, scores, lam, dispersion=dispersion, ref_entropy=ref_entropy,
                                           shape=shape, dtype=dtype, device=device, **hparams)
