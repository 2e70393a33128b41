"""Properties every loss must have: gradients, additivity across micro-batches, padding invariance,
skipped prompts, extreme inputs, float32, hyperparameter checking and the registry."""

from __future__ import annotations

import math

import pytest
import torch
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
    assert set(NAMES) | {"mallows_ipo"} == set(ALL_LOSSES)


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
    ("lipo_softmax", {"normalize_labels": False}),
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
    sum(num) / sum(den) (and its gradient) equals the full-batch loss."""
    case = _with(make_case(name, batch=7, n=6, seed=4), hp)
    full = case.call()
    parts = [case.rows(slice(0, 2)).call(), case.rows(slice(2, 3)).call(), case.rows(slice(3, 7)).call()]
    num = sum(p.numerator for p in parts)
    den = sum(p.denominator for p in parts)
    torch.testing.assert_close(num, full.numerator, rtol=1e-12, atol=1e-12)
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
    ("lipo_pair_logistic", {"reduction": "sum"}, "reduction"),
    ("lipo_lambda", {"scale": "list"}, "scale"),
    ("lipo_lambda", {"topn": 0}, "topn"),
    ("wmpo", {}, "alpha"),
    ("wmpo", {"alpha": 0.0}, "alpha"),
    ("simpo", {"gamma": 0.7, "gamma_beta_ratio": 0.25}, "disagree"),
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
        "dpo": {"beta": 0.1, "label_smoothing": 0.0},
        "ipo": {"beta": 0.1},
        "simpo": {"beta": 2.0, "gamma": None, "gamma_beta_ratio": None, "label_smoothing": 0.0,
                  "loss_type": "sigmoid"},
        "lipo_lambda": {"beta": 0.05, "reduction": "rax", "scale": "padded", "normalize": False, "topn": None,
                        "log_base": 2.0, "weighting": "dcg"},
        "lambda_dpo": {"beta": 0.1, "temperature": 1.0, "default_rating": 1.0, "eps": 1e-10,
                       "scores_are_targets": False},
        "mpo": {"beta": 0.05, "alpha": 0.0},
        "wmpo": {"beta": 0.05, "alpha": None},
        "infonca": {"beta": 0.01, "temperature_alpha": 1e-4, "first_bonus": 0.01},
        "nca": {"beta": 0.01, "temperature_alpha": 1e-4, "first_bonus": 0.01},
    }
    for name, defaults in expected_defaults.items():
        assert dict(LOSS_REGISTRY[name].defaults) == defaults
    theta = LOSS_REGISTRY["mallows_theta"]
    assert theta.defaults["beta"] == 10.0 and theta.defaults["reference_free"] is True
    assert theta.needs_dispersion and not theta.uses_reference() and theta.logp_reduction_for() == "mean"
    assert theta.uses_reference({"reference_free": False})
    assert theta.logp_reduction_for({"length_normalization": False}) == "sum"
    assert LOSS_REGISTRY["simpo"].reference_free and not LOSS_REGISTRY["simpo"].uses_reference()
    assert LOSS_REGISTRY["lambda_dpo"].needs_lambda
    assert LOSS_REGISTRY["lambda_dpo"].labels == "per_dimension_scores"
    assert LOSS_REGISTRY["ipo"].logp_reduction == "mean" and LOSS_REGISTRY["dpo"].logp_reduction == "sum"
    assert LOSS_REGISTRY["lipo_lambda"].unit == "pair" and LOSS_REGISTRY["lipo_point_mse"].unit == "item"
    rows = registry_table()
    assert [r["name"] for r in rows] == ALL_LOSSES
    for row in rows:
        assert row["labels"] in ("pairwise_order", "scalar_scores", "per_dimension_scores")
        assert row["logp_reduction"] in ("sum", "mean")
        assert row["source"].startswith("spec")


def test_every_loss_has_a_formula_docstring() -> None:
    for spec in LOSS_REGISTRY.values():
        doc = spec.fn.__doc__ or ""
        assert "spec" in doc and "efault" in doc, spec.name


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
    a = listwise_loss("lambda_dpo", case.policy, case.ref, scores=with_nan, lam=case.lam)
    b = listwise_loss("lambda_dpo", case.policy, case.ref, scores=with_one, lam=case.lam)
    assert a.loss.item() == b.loss.item()


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
