"""raypo loss library: listwise, multi-dimensional preference losses as pure tensor functions.

Entry point::

    out = raypo.losses.listwise_loss(name, policy_logps, ref_logps, mask=..., scores=..., lam=...,
                                     dispersion=..., **hparams)
    out.loss, out.numerator, out.denominator, out.metrics, out.rewards

Reference: ``docs/loss_reference.md`` (formulas, defaults, edge cases, sources) and the reference vectors
in ``tests/losses/loss_vectors.json``. No model, no Ray: every function takes ``[B, N]`` tensors and works
on CPU and GPU, in float32 and float64.
"""

from raypo.losses._common import LossHyperparameterError, LossOutput
from raypo.losses.labels import (
    aggregate_ratings,
    best_worst,
    lipo_psi_from_pairwise,
    lipo_psi_from_ranks,
    lipo_psi_from_ratings,
    mpo_sets,
    targets_from_ratings,
)
from raypo.losses.lambda_dpo import lambda_dpo_loss
from raypo.losses.lipo import (
    lipo_lambda_loss,
    lipo_lambda_weights,
    lipo_list_mle_loss,
    lipo_pair_hinge_loss,
    lipo_pair_logistic_loss,
    lipo_point_mse_loss,
    lipo_point_sigmoid_loss,
    lipo_softmax_loss,
)
from raypo.losses.mallows import (
    calibrate_c,
    entropy_from_logits,
    mallows_ipo_loss,
    mallows_phi_link,
    mallows_phi_loss,
    mallows_theta_loss,
    neg_log_dispersion,
    normalized_mean_entropy,
    prompt_hbar,
)
from raypo.losses.metrics import finalize_metrics, merge_metric_sums, ranking_metrics
from raypo.losses.mpo import mpo_loss, wmpo_loss
from raypo.losses.nca import infonca_loss, nca_loss
from raypo.losses.pairwise import dpo_loss, ipo_loss, simpo_loss, slic_loss
from raypo.losses.registry import (
    LABEL_KINDS,
    LOSS_REGISTRY,
    LossSpec,
    get_loss_spec,
    list_losses,
    listwise_loss,
    loss_denominator,
    registry_table,
)

__all__ = [
    "LABEL_KINDS",
    "LOSS_REGISTRY",
    "LossHyperparameterError",
    "LossOutput",
    "LossSpec",
    "aggregate_ratings",
    "best_worst",
    "calibrate_c",
    "dpo_loss",
    "entropy_from_logits",
    "finalize_metrics",
    "get_loss_spec",
    "infonca_loss",
    "ipo_loss",
    "lambda_dpo_loss",
    "lipo_lambda_loss",
    "lipo_lambda_weights",
    "lipo_list_mle_loss",
    "lipo_pair_hinge_loss",
    "lipo_pair_logistic_loss",
    "lipo_point_mse_loss",
    "lipo_point_sigmoid_loss",
    "lipo_psi_from_pairwise",
    "lipo_psi_from_ranks",
    "lipo_psi_from_ratings",
    "lipo_softmax_loss",
    "list_losses",
    "listwise_loss",
    "loss_denominator",
    "mallows_ipo_loss",
    "mallows_phi_link",
    "mallows_phi_loss",
    "mallows_theta_loss",
    "merge_metric_sums",
    "mpo_loss",
    "mpo_sets",
    "nca_loss",
    "neg_log_dispersion",
    "normalized_mean_entropy",
    "prompt_hbar",
    "ranking_metrics",
    "registry_table",
    "simpo_loss",
    "slic_loss",
    "targets_from_ratings",
    "wmpo_loss",
]
