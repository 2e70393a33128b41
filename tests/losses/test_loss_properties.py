"""Properties every loss must have: gradients, additivity across micro-batches, padding invariance,
skipped prompts, extreme inputs, float32, hyperparameter checking and the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_cases import ALL_LOSSES, PAIRWISE, make_case

from raypo.losses import (
    LOSS_REGISTRY,
    LossHyperparameterError,
    get_loss_spec,
    listwise_loss,
    registry_table,
)

D64 = torch.float64
NAMES = [
    "dpo", "ipo", "slic", "simpo", "lipo_pair_logistic", "lipo_pair_hinge", "lipo_list_mle", "lipo_softmax",
    "lipo_point_mse", "lipo_point_sigmoid", "lipo_lambda", "lambda_dpo", "mallows_theta", "mallows_phi",
    "mpo", "wmpo", "infonca", "nca",
]


def test_registry_has_every_required_loss() -> None:
    # The losses of the contract, plus mallows_ipo (docs/loss_reference.md §4.2) and the
    # docs/loss_reference.md §3.3 baseline ultrafb_best_worst_dpo.
    assert set(NAMES) | {"mallows_ipo", "ultrafb_best_worst_dpo"} == set(ALL_LOSSES)


# Non-default reductions / variants also checked for gradients and additivity.
VARIANTS: list[tuple[str, dict]] = [(n, {}) for n in ALL_LOSSES] + [
    ("lipo_pair_logistic", {"reduction": "paper"}),
    ("lipo_pair_logistic", {"reduction": "per_list_mean"}),
    ("lipo_pair_hinge", {"reduction": "per_list_mean"}),
    ("lipo_point_mse", {"reduction": "paper"}),
    ("lipo_point_sigmoid", {"reduction": "paper"}),
    ("lipo_point_mse", {"reduction": "per_list_mean"}),
    ("lipo_list_mle", {"reduction": "paper"}),
    ("lipo_lambda", {"reduction": "paper", "scale": "none"}),
    ("lipo_lambda", {"scale": "valid", "normalize": True, "topn": 3}),
    ("lipo_lambda", {"reduction": "sum", "scale": "none", "normalize": True}),  # allRank's lambdaLoss
    ("lipo_pair_logistic", {"reduction": "sum"}),
    ("lipo_pair_hinge", {"reduction": "sum"}),
    ("lipo_point_mse", {"reduction": "sum"}),
    ("lipo_point_sigmoid", {"reduction": "sum"}),
    ("lipo_list_mle", {"reduction": "sum"}),
    ("lipo_softmax", {"normalize_labels": False}),
    ("lipo_softmax", {"reduction": "sum"}),
    ("nca", {"variant": "pair"}),
    ("nca", {"variant": "biased"}),
    ("dpo", {"label_smoothing": 0.1}),
    ("simpo", {"loss_type": "hinge"}),
    ("mallows_theta", {"reference_free": False, "if_mixing_alpha": True, "home_advantage": 0.3,
                       "label_smoothing": 0.05}),
    ("mallows_ipo", {"variant": "rainbowpo"}),
    ("mallows_ipo", {"variant": "rainbowpo_modified"}),
    ("lambda_dpo", {"eps": 0.0, "temperature": 2.0}),
]
VARIANT_IDS = [n + ("-" + "-".join(f"{k}={v}" for k, v in hp.items()) if hp else "") for n, hp in VARIANTS]


def _with(case, hp: dict):
    case.hparams = {**case.hparams, **hp}
    return case


# Gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hp"), VARIANTS, ids=VARIANT_IDS)
def test_gradcheck_float64(name: str, hp: dict) -> None:
    case = _with(make_case(name, batch=3, n=5, seed=1), hp)
    if name in PAIRWISE or name == "simpo":
        # IPO-type losses are quadratic in log-probs: keep a scale where finite differences stay exact.
        noise = torch.randn(case.ref.shape, dtype=D64, generator=torch.Generator().manual_seed(2))
        case.policy = torch.where(case.mask, case.ref + 0.1 * noise, case.policy)
    policy = torch.where(case.mask, case.policy, torch.zeros_like(case.policy)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: case.call(p).loss, (policy,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_padding_gets_zero_gradient(name: str) -> None:
    case = make_case(name, batch=4, n=6, seed=3)
    policy = case.policy.clone().requires_grad_(True)  # NaN at padding
    out = case.call(policy)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad).all()
    assert (grad[~case.mask] == 0).all()


# Micro-batch additivity ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hp"), VARIANTS, ids=VARIANT_IDS)
def test_micro_batch_additivity(name: str, hp: dict) -> None:
    """Numerators and denominators of micro-batches add up to those of the concatenated batch, so
    sum(num) / sum(den) (and its gradient) equals the full-batch loss.

    Documented exception: LiPO's ``reduction="sum"`` (allRank's plain sum, docs/loss_reference.md §2.10) has
    denominator 1 in
    every non-empty micro-batch; its numerators (and their gradients) still add up, and the full batch's
    loss is their sum."""
    case = _with(make_case(name, batch=7, n=6, seed=4), hp)
    full = case.call()
    parts = [case.rows(slice(0, 2)).call(), case.rows(slice(2, 3)).call(), case.rows(slice(3, 7)).call()]
    num = sum(p.numerator for p in parts)
    den = sum(p.denominator for p in parts)
    torch.testing.assert_close(num, full.numerator, rtol=1e-12, atol=1e-12)
    if hp.get("reduction") == "sum":
        assert [p.denominator.item() for p in parts] == [1.0, 1.0, 1.0] and full.denominator.item() == 1.0
        den = full.denominator
    else:
        torch.testing.assert_close(den, full.denominator, rtol=0, atol=0)
    assert full.loss.item() == pytest.approx((num / den).item(), rel=1e-12)
    for key, value in full.metrics.items():
        if key == "all_skipped":
            continue
        torch.testing.assert_close(sum(p.metrics[key] for p in parts), value, rtol=1e-12, atol=1e-12)
    # Gradient accumulation: the sum of the micro-batch numerator gradients / total denominator.
    policy = torch.where(case.mask, case.policy, torch.zeros_like(case.policy)).requires_grad_(True)
    (g_full,) = torch.autograd.grad(case.call(policy).loss, policy)
    g_acc = torch.zeros_like(policy)
    for sl in (slice(0, 2), slice(2, 3), slice(3, 7)):
        p = policy.detach()[sl].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(case.rows(sl).call(p).numerator, p)
        g_acc[sl] = g
    torch.testing.assert_close(g_acc / den, g_full, rtol=1e-10, atol=1e-14)


def test_lipo_lambda_padded_scale_additivity_needs_equal_padding() -> None:
    """Documented: scale="padded" uses each micro-batch's padded N, so micro-batches padded to a different N
    do not add up to the batch padded to the max N; scale="valid" does."""
    case = make_case("lipo_lambda", batch=4, n=6, seed=5, full=True)
    case.mask[2:, 4:] = False  # rows 2-3 have 4 valid responses
    a, b = case.rows(slice(0, 2)), case.rows(slice(2, 4))
    b_trim = type(b)(b.name, b.policy[:, :4], b.ref[:, :4], b.mask[:, :4], b.scores[:, :4])
    for scale, equal in (("padded", False), ("valid", True)):
        full = listwise_loss("lipo_lambda", case.policy, case.ref, mask=case.mask, scores=case.scores,
                             scale=scale)
        pa = listwise_loss("lipo_lambda", a.policy, a.ref, mask=a.mask, scores=a.scores, scale=scale)
        pb = listwise_loss("lipo_lambda", b_trim.policy, b_trim.ref, mask=b_trim.mask, scores=b_trim.scores,
                           scale=scale)
        same = math.isclose((pa.numerator + pb.numerator).item(), full.numerator.item(), rel_tol=1e-12)
        assert same is equal


# Padding invariance --------------------------------------------------------------------------------


def _pad_case(case, extra: int):
    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        shape = list(x.shape)
        shape[1] = extra
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], dim=1)

    score_pad = math.nan if case.name != "lambda_dpo" else 5.0
    out = type(case)(case.name, pad(case.policy, math.nan), pad(case.ref, 1e30), pad(case.mask, 0.0).bool(),
                     pad(case.scores, score_pad), case.lam, case.dispersion, dict(case.hparams))
    return out


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_padding_invariance(name: str) -> None:
    case = make_case(name, batch=4, n=5, seed=6)
    padded = _pad_case(case, 4)
    policy_a = torch.where(case.mask, case.policy, torch.zeros_like(case.policy)).requires_grad_(True)
    policy_b = torch.cat([policy_a.detach(), torch.full((4, 4), math.nan, dtype=D64)], 1).requires_grad_(True)
    out_a, out_b = case.call(policy_a), padded.call(policy_b)
    if name == "lipo_lambda":  # RAX's padded list-size factor: documented exception (identity 15)
        out_a = listwise_loss(name, policy_a, case.ref, **case.kwargs(), scale="valid")
        out_b = listwise_loss(name, policy_b, padded.ref, **padded.kwargs(), scale="valid")
    assert out_b.loss.item() == pytest.approx(out_a.loss.item(), rel=1e-12)
    assert out_b.denominator.item() == out_a.denominator.item()
    (ga,) = torch.autograd.grad(out_a.loss, policy_a)
    (gb,) = torch.autograd.grad(out_b.loss, policy_b)
    torch.testing.assert_close(gb[:, :5], ga, rtol=1e-10, atol=1e-14)
    assert (gb[:, 5:] == 0).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_fully_padded_rows_never_count(name: str) -> None:
    case = make_case(name, batch=3, n=4, seed=7)
    extra = make_case(name, batch=2, n=4, seed=8)
    extra.mask[:] = False
    both = type(case)(name, torch.cat([case.policy, extra.policy]), torch.cat([case.ref, extra.ref]),
                      torch.cat([case.mask, extra.mask]), torch.cat([case.scores, extra.scores]),
                      None if case.lam is None else torch.cat([case.lam, extra.lam]),
                      None if case.dispersion is None else torch.cat([case.dispersion, extra.dispersion]),
                      dict(case.hparams))
    a, b = case.call(), both.call()
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-12)
    assert b.denominator.item() == a.denominator.item()


# Skipped prompts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*PAIRWISE, "mpo", "wmpo"])
def test_tied_prompts_are_skipped_and_counted(name: str) -> None:
    case = make_case(name, batch=4, n=5, seed=9, full=True)
    case.scores[1] = 0.25  # all tied -> skipped
    out = case.call()
    sub = case.rows(slice(0, 1)).call(), case.rows(slice(2, 4)).call()
    assert out.metrics["num_skipped"].item() == 1
    assert out.denominator.item() == 3
    assert out.numerator.item() == pytest.approx(sum(s.numerator.item() for s in sub), rel=1e-12)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_all_skipped_batch_is_zero_without_nan(name: str) -> None:
    case = make_case(name, batch=2, n=3, seed=10, full=True)
    never_skip = ("lambda_dpo", "lipo_list_mle", "lipo_softmax", "lipo_point_mse", "lipo_point_sigmoid",
                  "infonca", "nca")
    if name in never_skip:
        case.mask[:] = False  # these never skip a list with a valid item: only empty rows are skipped
    else:
        case.scores[:] = 0.5
    policy = case.policy.clone().requires_grad_(True)
    out = case.call(policy)
    assert out.denominator.item() == 0
    assert out.loss.item() == 0.0
    assert out.metrics["all_skipped"].item() == 1.0
    out.loss.backward()
    assert torch.isfinite(policy.grad).all() and (policy.grad == 0).all()


def test_pairwise_n2_without_scores_uses_column_order() -> None:
    case = make_case("dpo", batch=3, n=2, seed=11, full=True)
    swapped = listwise_loss("dpo", case.policy.flip(1), case.ref.flip(1),
                            scores=torch.tensor([[0.0, 1.0]] * 3, dtype=D64))
    plain = listwise_loss("dpo", case.policy, case.ref)
    assert swapped.loss.item() == pytest.approx(plain.loss.item(), rel=1e-14)
    with pytest.raises(LossHyperparameterError, match="N = 2"):
        listwise_loss("dpo", torch.zeros(2, 3), torch.zeros(2, 3))


def test_pairwise_best_worst_first_occurrence() -> None:
    policy = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D64)
    ref = torch.zeros_like(policy)
    scores = torch.tensor([[0.1, 0.9, 0.9, 0.1]], dtype=D64)  # best = 1 (first max), worst = 0 (first min)
    out = listwise_loss("dpo", policy, ref, scores=scores, beta=1.0)
    want = listwise_loss("dpo", torch.tensor([[2.0, 1.0]], dtype=D64), torch.zeros(1, 2, dtype=D64), beta=1.0)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-14)


def test_list_mle_ties_keep_index_order_and_are_not_zero() -> None:
    policy = torch.tensor([[0.3, -0.2]], dtype=D64)
    ref = torch.zeros_like(policy)
    tied_psi, ordered_psi = torch.tensor([[0.5, 0.5]], dtype=D64), torch.tensor([[0.6, 0.5]], dtype=D64)
    tied = listwise_loss("lipo_list_mle", policy, ref, scores=tied_psi, beta=1.0)
    ordered = listwise_loss("lipo_list_mle", policy, ref, scores=ordered_psi, beta=1.0)
    assert tied.loss.item() > 0
    assert tied.loss.item() == pytest.approx(ordered.loss.item(), rel=1e-14)
    pair = listwise_loss("lipo_pair_logistic", policy, ref, scores=torch.tensor([[0.5, 0.5]], dtype=D64))
    assert pair.loss.item() == 0.0


# Extreme inputs, dtypes and list sizes ------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_differences_are_finite(name: str, dtype: torch.dtype) -> None:
    case = make_case(name, batch=3, n=4, seed=12, full=True, dtype=dtype)
    sign = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=dtype)
    for scale in (1e4, -1e4):
        policy = (case.ref + scale * sign).requires_grad_(True)
        out = case.call(policy)
        (grad,) = torch.autograd.grad(out.loss, policy)
        assert torch.isfinite(out.loss), (name, scale)
        assert torch.isfinite(grad).all(), (name, scale)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_float32_matches_float64(name: str) -> None:
    c64 = make_case(name, batch=4, n=6, seed=13, logp_scale=1.0)
    c32 = make_case(name, batch=4, n=6, seed=13, logp_scale=1.0, dtype=torch.float32)
    a, b = c64.call(), c32.call()
    assert b.loss.dtype == torch.float32 and b.numerator.dtype == torch.float32
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bfloat16_inputs_compute_in_float32(name: str) -> None:
    case = make_case(name, batch=2, n=4, seed=14, full=True)
    out = listwise_loss(name, case.policy.to(torch.bfloat16), case.ref.to(torch.bfloat16), **case.kwargs(),
                        **case.hparams)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


@pytest.mark.parametrize("n", [2, 3, 8, 16, 33])
@pytest.mark.parametrize("name", ["lipo_lambda", "lipo_list_mle", "lambda_dpo", "mpo", "nca", "dpo"])
def test_list_sizes(name: str, n: int) -> None:
    case = make_case(name, batch=3, n=n, seed=15)
    policy = torch.where(case.mask, case.policy, torch.zeros_like(case.policy)).requires_grad_(True)
    out = case.call(policy)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


# Hyperparameters and registry -----------------------------------------------------------------------


def test_unknown_hparam_names_loss_key_and_suggestion() -> None:
    case = make_case("dpo", batch=1, n=2, seed=0, full=True)
    with pytest.raises(LossHyperparameterError) as err:
        listwise_loss("dpo", case.policy, case.ref, bta=0.1)
    msg = str(err.value)
    assert "'dpo'" in msg and "'bta'" in msg and "did you mean 'beta'" in msg and "label_smoothing" in msg


def test_unknown_loss_name_suggests() -> None:
    with pytest.raises(LossHyperparameterError, match="did you mean 'lipo_lambda'"):
        get_loss_spec("lipo_lamda")


@pytest.mark.parametrize(("name", "kwargs", "pattern"), [
    ("dpo", {"beta": -1.0}, "beta"),
    ("lipo_pair_logistic", {"reduction": "mean"}, "reduction"),
    ("lipo_list_mle", {"reduction": "mean"}, "reduction"),
    ("nca", {"variant": "biasedNCA"}, "variant"),
    ("dpo", {"temperature": 0.0}, "temperature"),
    ("lipo_lambda", {"scale": "list"}, "scale"),
    ("lipo_lambda", {"topn": 0}, "topn"),
    ("wmpo", {}, "alpha"),
    ("wmpo", {"alpha": 0.0}, "alpha"),
    ("mallows_ipo", {"variant": "trl"}, "variant"),
])
def test_bad_hparams_raise(name: str, kwargs: dict, pattern: str) -> None:
    case = make_case(name, batch=2, n=3, seed=0, full=True)
    with pytest.raises(LossHyperparameterError, match=pattern):
        listwise_loss(name, case.policy, case.ref, **case.kwargs(), **kwargs)


def test_inputs_wrongly_given_raise() -> None:
    case = make_case("dpo", batch=2, n=2, seed=0, full=True)
    with pytest.raises(LossHyperparameterError, match="ref_logps"):
        listwise_loss("dpo", case.policy, None)
    disp = torch.ones(2, dtype=D64)
    assert torch.isfinite(listwise_loss("mallows_theta", case.policy, None, dispersion=disp).loss)
    with pytest.raises(LossHyperparameterError, match="ref_logps"):
        listwise_loss("mallows_theta", case.policy, None, dispersion=disp, reference_free=False)
    with pytest.raises(LossHyperparameterError, match="lam"):
        listwise_loss("dpo", case.policy, case.ref, lam=torch.ones(4) / 4)
    with pytest.raises(LossHyperparameterError, match="dispersion"):
        listwise_loss("mallows_theta", case.policy, case.ref)
    with pytest.raises(LossHyperparameterError, match="lam"):
        lc = make_case("lambda_dpo", batch=2, n=3, seed=0)
        listwise_loss("lambda_dpo", lc.policy, lc.ref, mask=lc.mask, scores=lc.scores)
    with pytest.raises(LossHyperparameterError, match="scores"):
        listwise_loss("lipo_softmax", case.policy, case.ref)
    with pytest.raises(LossHyperparameterError, match="mallows_phi"):
        listwise_loss("mallows_phi", case.policy, case.ref, dispersion=torch.tensor([1.0, -0.5]))


def test_registry_fields_and_defaults() -> None:
    expected_defaults = {
        "dpo": {"beta": 0.1, "label_smoothing": 0.0, "temperature": 1.0},
        "ultrafb_best_worst_dpo": {"beta": 0.1, "label_smoothing": 0.0, "temperature": 1.0},
        "ipo": {"beta": 0.1, "temperature": 1.0},
        "simpo": {"beta": 2.0, "gamma": None, "gamma_beta_ratio": None, "label_smoothing": 0.0,
                  "loss_type": "sigmoid", "temperature": 1.0},
        "lipo_lambda": {"beta": 0.05, "reduction": "rax", "scale": "padded", "normalize": False, "topn": None,
                        "log_base": 2.0, "weighting": "dcg"},
        "lambda_dpo": {"beta": 0.1, "temperature": 1.0, "default_rating": 1.0, "eps": 1e-10,
                       "scores_are_targets": False, "missing_ratings": "drop"},
        "mpo": {"beta": 0.05, "alpha": 0.0, "threshold": "mean", "weighting": "absolute",
                "reference_free": False, "length_normalization": None, "gamma": None,
                "gamma_beta_ratio": None, "selection": "threshold", "k": None},
        "wmpo": {"beta": 0.05, "alpha": None, "threshold": "mean", "weighting": "absolute",
                 "reference_free": False, "length_normalization": None, "gamma": None,
                 "gamma_beta_ratio": None, "selection": "threshold", "k": None},
        "infonca": {"beta": 0.01, "temperature_alpha": 1e-4, "first_bonus": 0.01},
        "nca": {"beta": 0.01, "temperature_alpha": 1e-4, "first_bonus": 0.01, "variant": "listwise"},
    }
    for name, defaults in expected_defaults.items():
        assert dict(LOSS_REGISTRY[name].defaults) == defaults
    theta = LOSS_REGISTRY["mallows_theta"]
    assert theta.defaults["beta"] == 10.0 and theta.defaults["reference_free"] is True
    assert theta.needs_dispersion and not theta.uses_reference() and theta.logp_reduction_for() == "mean"
    assert theta.uses_reference({"reference_free": False})
    assert theta.logp_reduction_for({"length_normalization": False}) == "sum"
    assert theta.defaults["dispersion_c"] == 0.29 and theta.defaults["missing_entropy"] == "error"
    phi = LOSS_REGISTRY["mallows_phi"]
    assert phi.defaults["link"] == "exact" and phi.defaults["poly_range_mode"] == "dispersion"
    mpo = LOSS_REGISTRY["mpo"]  # reference-free MPO: no reference, SimPO's per-token mean log-probs
    assert mpo.uses_reference() and mpo.logp_reduction_for() == "sum"
    assert not mpo.uses_reference({"reference_free": True})
    assert mpo.logp_reduction_for({"reference_free": True}) == "mean"
    assert mpo.logp_reduction_for({"reference_free": True, "length_normalization": False}) == "sum"
    assert LOSS_REGISTRY["simpo"].reference_free and not LOSS_REGISTRY["simpo"].uses_reference()
    assert LOSS_REGISTRY["lambda_dpo"].needs_lambda
    assert LOSS_REGISTRY["lambda_dpo"].labels == "per_dimension_scores"
    # docs/loss_reference.md §3.3: DPO on length-normalised log-probs
    ultrafb = LOSS_REGISTRY["ultrafb_best_worst_dpo"]
    assert ultrafb.fn is LOSS_REGISTRY["dpo"].fn and ultrafb.labels == "per_dimension_scores"
    assert ultrafb.logp_reduction == "mean" and not ultrafb.needs_lambda
    assert LOSS_REGISTRY["ipo"].logp_reduction == "mean" and LOSS_REGISTRY["dpo"].logp_reduction == "sum"
    assert LOSS_REGISTRY["lipo_lambda"].unit == "pair" and LOSS_REGISTRY["lipo_point_mse"].unit == "item"
    rows = registry_table()
    assert [r["name"] for r in rows] == ALL_LOSSES
    for row in rows:
        assert row["labels"] in ("pairwise_order", "scalar_scores", "per_dimension_scores")
        assert row["logp_reduction"] in ("sum", "mean")
        assert row["source"].startswith("docs/loss_reference.md §")


def test_every_loss_has_a_formula_docstring() -> None:
    for spec in LOSS_REGISTRY.values():
        doc = spec.fn.__doc__ or ""
        assert "loss_reference.md" in doc and "efault" in doc, spec.name


def test_simpo_gamma_resolution() -> None:
    avg = torch.tensor([[-1.0, -1.4]], dtype=D64)
    default = listwise_loss("simpo", avg, None).loss.item()
    absolute = listwise_loss("simpo", avg, None, gamma=0.5).loss.item()
    ratio = listwise_loss("simpo", avg, None, gamma_beta_ratio=0.25).loss.item()
    assert default == absolute == ratio
    scaled = listwise_loss("simpo", avg, None, beta=10.0).loss.item()  # gamma = 0.25 * 10
    assert scaled == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(10 * 0.4 - 2.5)).item())


def test_lambda_dpo_lambda_per_prompt_vs_shared() -> None:
    case = make_case("lambda_dpo", batch=3, n=4, seed=16)
    shared = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D64)
    a = listwise_loss("lambda_dpo", case.policy, case.ref, mask=case.mask, scores=case.scores, lam=shared)
    b = listwise_loss("lambda_dpo", case.policy, case.ref, mask=case.mask, scores=case.scores,
                      lam=shared.expand(3, 4))
    assert a.loss.item() == b.loss.item()
    # Per-dimension losses: lambda-weighted sum of L_k equals the loss for a shared lambda.
    assert a.loss.item() == pytest.approx((a.metrics["L_k_sum"] * shared).sum().item() / 3, rel=1e-12)


def test_lambda_dpo_missing_rating_uses_default() -> None:
    case = make_case("lambda_dpo", batch=1, n=4, seed=17, full=True)
    with_nan = case.scores.clone()
    with_nan[0, 2, 1] = math.nan
    with_one = case.scores.clone()
    with_one[0, 2, 1] = 1.0
    a = listwise_loss("lambda_dpo", case.policy, case.ref, scores=with_nan, lam=case.lam,
                      missing_ratings="impute")
    b = listwise_loss("lambda_dpo", case.policy, case.ref, scores=with_one, lam=case.lam,
                      missing_ratings="impute")
    assert a.loss.item() == b.loss.item()
    # The default drop rule leaves the response out of that dimension instead of rating it 1.0.
    c = listwise_loss("lambda_dpo", case.policy, case.ref, scores=with_nan, lam=case.lam)
    assert c.loss.item() != pytest.approx(b.loss.item(), rel=1e-6)


def test_lipo_psi_nan_marks_invalid() -> None:
    case = make_case("lipo_pair_logistic", batch=2, n=5, seed=18, full=True)
    scores = case.scores.clone()
    scores[:, 3:] = math.nan
    mask = case.mask.clone()
    mask[:, 3:] = False
    a = listwise_loss("lipo_pair_logistic", case.policy, case.ref, scores=scores)
    b = listwise_loss("lipo_pair_logistic", case.policy, case.ref, mask=mask, scores=case.scores)
    assert a.loss.item() == b.loss.item()


def test_nca_first_bonus_breaks_a_tie_with_response_zero() -> None:
    from raypo.losses.nca import nca_soft_labels

    q = nca_soft_labels(torch.tensor([[3.0, 3.0, 1.0, 2.0]], dtype=D64), torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(q, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=D64))  # exp(-100) ~ 0
    q0 = nca_soft_labels(torch.tensor([[3.0, 3.0]], dtype=D64), torch.ones(1, 2, dtype=torch.bool),
                         first_bonus=0.0)
    torch.testing.assert_close(q0, torch.tensor([[0.5, 0.5]], dtype=D64))


def test_mallows_theta_shipped_defaults_formula() -> None:
    """Defaults as shipped: beta = 10, reference-free: L = -log sigmoid(10 * phi * (th_w - th_l))."""
    policy = torch.tensor([[-1.10, -1.25], [-0.9, -0.7]], dtype=D64)
    ref = torch.tensor([[-5.0, -1.0], [-2.0, -3.0]], dtype=D64)  # ignored
    phi = torch.tensor([0.8, 1.3], dtype=D64)
    out = listwise_loss("mallows_theta", policy, ref, dispersion=phi)
    z = 10.0 * phi * (policy[:, 0] - policy[:, 1])
    want = -torch.nn.functional.logsigmoid(z).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-14)
    mixed = listwise_loss("mallows_theta", policy, ref, dispersion=phi, reference_free=False, beta=0.1,
                          if_mixing_alpha=True, mixing_alpha=0.5, home_advantage=0.2)
    logits = (policy[:, 0] - policy[:, 1]) - 0.5 * (ref[:, 0] - ref[:, 1]) - 0.5 * 0.2
    want_mixed = -torch.nn.functional.logsigmoid(0.1 * phi * logits).mean()
    assert mixed.loss.item() == pytest.approx(want_mixed.item(), rel=1e-14)


def test_dpo_label_smoothing_and_ipo_with_scores() -> None:
    policy = torch.tensor([[-10.0, -12.0, -11.0]], dtype=D64)
    ref = torch.tensor([[-11.0, -11.5, -10.0]], dtype=D64)
    scores = torch.tensor([[0.2, 0.9, 0.1]], dtype=D64)  # best = 1, worst = 2
    s = 0.1 * (policy - ref)
    d = s[0, 1] - s[0, 2]
    out = listwise_loss("dpo", policy, ref, scores=scores, label_smoothing=0.2)
    want = -0.8 * torch.nn.functional.logsigmoid(d) - 0.2 * torch.nn.functional.logsigmoid(-d)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-14)
    ipo = listwise_loss("ipo", policy, ref, scores=scores)
    big_d = (policy[0, 1] - policy[0, 2]) - (ref[0, 1] - ref[0, 2])
    assert ipo.loss.item() == pytest.approx(((big_d - 5.0) ** 2).item(), rel=1e-14)


# InfoNCA / NCA soft labels in float32 ------------------------------------------------------------


def test_nca_soft_labels_exact_in_float32_at_default_alpha() -> None:
    """temperature_alpha = 1e-4 turns integer ratings into logits of 1e4-1e6; the labels must still be
    exact in float32 (the row max is subtracted before dividing, in float64): ties at the top split 1/2,
    response 0's bonus wins its tie outright, and float32 losses match float64."""
    from raypo.losses.nca import nca_soft_labels

    ratings = torch.tensor([[3.0, 7.0, 42.0, 42.0], [42.0, 42.0, 7.0, 3.0], [7.0, 3.0, 7.0, 3.0],
                            [3.0, 42.0, 7.0, 3.0]], dtype=D64)
    mask = torch.ones(4, 4, dtype=torch.bool)
    want = torch.tensor([[0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                         [0.0, 1.0, 0.0, 0.0]], dtype=D64)
    for dtype in (torch.float32, D64):
        q = nca_soft_labels(ratings.to(dtype), mask)
        assert q.dtype == dtype
        torch.testing.assert_close(q, want.to(dtype), atol=1e-7, rtol=0)
    g = torch.Generator().manual_seed(31)
    ref = -150 + 20 * torch.randn(4, 4, generator=g, dtype=D64)
    policy = ref + 5 * torch.randn(4, 4, generator=g, dtype=D64)
    s = 0.01 * (policy - ref)
    direct_info = -(want * torch.log_softmax(s, -1)).sum(-1).mean()
    direct_nca = (-(want * F.logsigmoid(s)).sum(-1) - F.logsigmoid(-s).mean(-1)).mean()
    for name, direct in (("infonca", direct_info), ("nca", direct_nca)):
        a = listwise_loss(name, policy, ref, scores=ratings)
        b = listwise_loss(name, policy.float(), ref.float(), scores=ratings.float())
        assert a.loss.item() == pytest.approx(direct.item(), rel=1e-12)
        assert b.loss.item() == pytest.approx(direct.item(), rel=2e-6)


# LiPO reduction "sum" ----------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["lipo_pair_logistic", "lipo_pair_hinge", "lipo_point_mse",
                                  "lipo_point_sigmoid", "lipo_list_mle", "lipo_softmax", "lipo_lambda"])
def test_lipo_sum_reduction_is_the_plain_sum(loss: str) -> None:
    """reduction="sum": numerator as "paper" (sum over the batch's pairs / items / lists), denominator 1,
    so the value is the plain sum; a batch with nothing to sum has denominator 0."""
    case = make_case(loss, batch=4, n=6, seed=41)
    plain = listwise_loss(loss, case.policy, case.ref, mask=case.mask, scores=case.scores, reduction="sum")
    paper = listwise_loss(loss, case.policy, case.ref, mask=case.mask, scores=case.scores, reduction="paper")
    assert plain.denominator.item() == 1.0 and plain.metrics["all_skipped"].item() == 0.0
    assert plain.loss.item() == pytest.approx(paper.numerator.item(), rel=1e-14)
    if loss in ("lipo_pair_logistic", "lipo_pair_hinge", "lipo_lambda"):
        tied = listwise_loss(loss, case.policy, case.ref, mask=case.mask,
                             scores=torch.full_like(case.scores, 0.5), reduction="sum")
        assert tied.denominator.item() == 0.0 and tied.loss.item() == 0.0
        assert tied.metrics["all_skipped"].item() == 1.0


# SimPO gamma precedence ----------------------------------------------------------------------------


def test_simpo_explicit_gamma_wins_over_ratio() -> None:
    """docs/loss_reference.md §3.3 / 10.10: an absolute gamma (LLaMA-Factory's simpo_gamma) next to the
    official default ratio
    0.25 is not an error: the explicit gamma is used."""
    avg = torch.tensor([[-0.9, -1.3], [-1.1, -1.0]], dtype=D64)
    got = listwise_loss("simpo", avg, None, beta=2.5, gamma=0.5, gamma_beta_ratio=0.25)
    want = -F.logsigmoid(2.5 * (avg[:, 0] - avg[:, 1]) - 0.5).mean()
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-14)
    only_ratio = listwise_loss("simpo", avg, None, beta=2.5, gamma_beta_ratio=0.4)
    assert only_ratio.loss.item() == pytest.approx(
        -F.logsigmoid(2.5 * (avg[:, 0] - avg[:, 1]) - 1.0).mean().item(), rel=1e-14)
    with pytest.raises(LossHyperparameterError, match="gamma"):
        listwise_loss("simpo", avg, None, gamma=float("nan"))


# Pairwise losses on per-dimension ratings (docs/loss_reference.md §3.3) -------------------------------------


def _ultrafb_pick(ratings: list[list[list[float]]], valid: list[list[bool]], temperature: float
                  ) -> list[tuple[int, int]]:
    """docs/loss_reference.md §3.3 directly: aggregate = mean_k softmax_valid(R_k / T) (missing -> 1.0); best
    = argmax, worst =
    argmin, first occurrence."""
    picks = []
    for rows, ok in zip(ratings, valid):
        idx = [i for i in range(len(rows)) if ok[i]]
        m = len(rows[0])
        agg = {i: 0.0 for i in idx}
        for k in range(m):
            r = {i: (1.0 if math.isnan(rows[i][k]) else rows[i][k]) / temperature for i in idx}
            top = max(r.values())
            z = sum(math.exp(v - top) for v in r.values())
            for i in idx:
                agg[i] += math.exp(r[i] - top) / z / m
        best = max(idx, key=lambda i: (agg[i], -i))
        worst = min(idx, key=lambda i: (agg[i], i))
        picks.append((best, worst))
    return picks


@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_pairwise_losses_take_per_dimension_ratings(temperature: float) -> None:
    """[B, N, m] ratings: best / worst by the mean over dimensions of softmax(R_k / T), then DPO
    (docs/loss_reference.md §3.3,
    also registered as ultrafb_best_worst_dpo)."""
    nan = math.nan
    ratings = [
        # T = 1: response 0 wins (0.479 vs 0.468); T = 100: response 1 (mean rating 3.1 vs 3.0).
        [[5.0, 1.0], [3.0, 3.2], [1.0, 1.0], [9.0, 9.0]],
        # A missing rating counts as 1.0: response 2 is worst, response 1 best; response 3 is padding.
        [[2.0, 4.0], [4.0, 4.0], [nan, 1.0], [5.0, 5.0]],
        [[3.0, 3.0], [4.0, 2.0], [2.0, 4.0], [1.0, 5.0]],
    ]
    valid = [[True, True, True, False], [True, True, True, False], [True, True, True, True]]
    scores = torch.tensor(ratings, dtype=D64)
    mask = torch.tensor(valid)
    g = torch.Generator().manual_seed(43)
    ref = -2.0 + 0.3 * torch.randn(3, 4, generator=g, dtype=D64)
    policy = ref + 0.3 * torch.randn(3, 4, generator=g, dtype=D64)
    picks = _ultrafb_pick(ratings, valid, temperature)
    if temperature == 1.0:
        assert picks[0] == (0, 2) and picks[1] == (1, 2)
    else:
        assert picks[0] == (1, 2)
    beta = 0.1
    s = beta * (policy - ref)
    want = sum(-F.logsigmoid(s[b, w] - s[b, lo]).item() for b, (w, lo) in enumerate(picks)) / 3
    for name in ("dpo", "ultrafb_best_worst_dpo"):
        out = listwise_loss(name, policy, ref, mask=mask, scores=scores, beta=beta, temperature=temperature)
        assert out.loss.item() == pytest.approx(want, rel=1e-12)
        assert out.denominator.item() == 3


@pytest.mark.parametrize("name", [n for n in PAIRWISE if n != "ultrafb_best_worst_dpo"] + ["nca"])
def test_rated_pair_selection_equals_aggregated_scalar_scores(name: str) -> None:
    """Every pairwise loss (and NCA's pair variants) picks from [B, N, m] ratings exactly as from their
    aggregate_ratings scalar."""
    from raypo.losses import aggregate_ratings

    case = make_case(name, batch=4, n=5, seed=44)
    ratings = torch.randint(1, 6, (4, 5, 3), generator=torch.Generator().manual_seed(45)).to(D64)
    hp = {**case.hparams, **({"variant": "biased"} if name == "nca" else {})}
    rated = listwise_loss(name, case.policy, case.ref, mask=case.mask, scores=ratings,
                          dispersion=case.dispersion, **hp)
    aggregate = aggregate_ratings(ratings, case.mask)
    scalar = listwise_loss(name, case.policy, case.ref, mask=case.mask, scores=aggregate,
                           dispersion=case.dispersion, **hp)
    assert rated.loss.item() == pytest.approx(scalar.loss.item(), rel=1e-14)
    assert rated.denominator.item() == scalar.denominator.item()


# NCA pairwise variants (docs/loss_reference.md §6.1) --------------------------------------------------------


def test_nca_pair_and_biased_variants_formulas() -> None:
    g = torch.Generator().manual_seed(46)
    ref = -120 + 10 * torch.randn(3, 5, generator=g, dtype=D64)
    policy = ref + 4 * torch.randn(3, 5, generator=g, dtype=D64)
    scores = torch.tensor([[0.2, 0.9, 0.5, 0.1, 0.9], [3.0, 1.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]],
                          dtype=D64)
    beta = 0.05
    s = beta * (policy - ref)
    pairs = [(1, 3), (0, 4)]  # first occurrence of the max / min; prompt 2 is tied -> skipped
    sw = torch.stack([s[b, w] for b, (w, _) in enumerate(pairs)])
    sl = torch.stack([s[b, lo] for b, (_, lo) in enumerate(pairs)])
    want = {
        "pair": (-F.logsigmoid(sw) - 0.5 * F.logsigmoid(-sw) - 0.5 * F.logsigmoid(-sl)).mean(),
        "biased": (-F.logsigmoid(sw) - F.logsigmoid(-sl)).mean(),
    }
    for variant, value in want.items():
        out = listwise_loss("nca", policy, ref, scores=scores, beta=beta, variant=variant)
        assert out.loss.item() == pytest.approx(value.item(), rel=1e-12)
        assert out.denominator.item() == 2 and out.metrics["num_skipped"].item() == 1
        # N = 2 without scores: column 0 is the chosen response, as for every pairwise loss.
        two = listwise_loss("nca", policy[:, [1, 3]], ref[:, [1, 3]], beta=beta, variant=variant)
        sw2, sl2 = s[:, 1], s[:, 3]
        direct = (-F.logsigmoid(sw2) - F.logsigmoid(-sl2)) if variant == "biased" else (
            -F.logsigmoid(sw2) - 0.5 * F.logsigmoid(-sw2) - 0.5 * F.logsigmoid(-sl2))
        assert two.loss.item() == pytest.approx(direct.mean().item(), rel=1e-12)


@pytest.mark.parametrize("variant", ["pair", "biased"])
def test_nca_pair_variants_gradient_signs(variant: str) -> None:
    """docs/loss_reference.md §7 identity 17 for the pairwise forms: dL/dtheta_w < 0 < dL/dtheta_l at policy
    = reference."""
    ref = torch.tensor([[-50.0, -40.0]], dtype=D64)
    policy = ref.clone().requires_grad_(True)
    out = listwise_loss("nca", policy, ref, variant=variant)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert grad[0, 0] < 0 < grad[0, 1]
