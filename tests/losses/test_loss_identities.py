"""The identities of spec section 7, one test (or more) each, in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_cases import ALL_LOSSES, PAIRWISE, make_case

from raypo.losses import (
    lipo_psi_from_ranks,
    listwise_loss,
    mallows_phi_link,
)

D64 = torch.float64


def _pairs(seed: int, n_draws: int = 20) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """Random (beta, policy [1, 2], ref [1, 2]) draws, as the reference's 20-draw checks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_draws):
        beta = float(0.01 + torch.rand((), generator=g, dtype=D64) * 0.5)
        ref = -150 + 30 * torch.randn(1, 2, generator=g, dtype=D64)
        policy = ref + 10 * torch.randn(1, 2, generator=g, dtype=D64)
        out.append((beta, policy, ref))
    return out


def _dpo(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> float:
    return listwise_loss("dpo", policy, ref, beta=beta).loss.item()


PSI_WL = torch.tensor([[0.9, 0.2]], dtype=D64)


# 1, 2, 3 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["lipo_pair_logistic", "lipo_list_mle"])
def test_identity_1_3_lipo_n2_is_dpo(loss: str) -> None:
    for beta, policy, ref in _pairs(1):
        got = listwise_loss(loss, policy, ref, scores=PSI_WL, beta=beta).loss.item()
        assert got == pytest.approx(_dpo(policy, ref, beta), rel=1e-12)


def test_identity_2_pair_hinge_n2_is_trl_hinge() -> None:
    for beta, policy, ref in _pairs(2):
        got = listwise_loss("lipo_pair_hinge", policy, ref, scores=PSI_WL, beta=beta).loss.item()
        want = listwise_loss("slic", policy, ref, beta=beta).loss.item()
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


# 4 -----------------------------------------------------------------------------------------------


def test_identity_4_softmax_ce_one_hot_n2_is_dpo() -> None:
    one_hot = torch.tensor([[1.0, 0.0]], dtype=D64)
    for beta, policy, ref in _pairs(4):
        dpo = _dpo(policy, ref, beta)
        lipo = listwise_loss("lipo_softmax", policy, ref, scores=one_hot, beta=beta).loss.item()
        lipo_raw = listwise_loss("lipo_softmax", policy, ref, scores=one_hot, beta=beta,
                                 normalize_labels=False).loss.item()
        # InfoNCA: temperature_alpha -> 0 makes q one-hot on the best reward (exp(-1e4) == 0 in float64).
        info = listwise_loss("infonca", policy, ref, scores=torch.tensor([[1.0, 0.0]], dtype=D64), beta=beta,
                             temperature_alpha=1e-4).loss.item()
        # lambda-DPO with every dimension one-hot, eps = 0, any lambda in the simplex.
        targets = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]], dtype=D64)
        lam = torch.tensor([0.2, 0.3, 0.5], dtype=D64)
        ldpo = listwise_loss("lambda_dpo", policy, ref, scores=targets, lam=lam, beta=beta, eps=0.0,
                             scores_are_targets=True).loss.item()
        for got in (lipo, lipo_raw, info, ldpo):
            assert got == pytest.approx(dpo, rel=1e-12)


def test_softmax_n2_soft_labels_is_cdpo() -> None:
    """docs/loss_reference.md §2.5: psi = (a, b) gives cDPO with eps = b / (a + b)."""
    a, b = 0.7, 0.2
    for beta, policy, ref in _pairs(41, 5):
        got = listwise_loss("lipo_softmax", policy, ref, scores=torch.tensor([[a, b]], dtype=D64),
                            beta=beta).loss.item()
        want = listwise_loss("dpo", policy, ref, beta=beta, label_smoothing=b / (a + b)).loss.item()
        assert got == pytest.approx(want, rel=1e-12)


# 5 -----------------------------------------------------------------------------------------------


def test_identity_5_lambda_dpo_is_ce_of_mixture_target() -> None:
    case = make_case("lambda_dpo", batch=4, n=5, seed=5, full=True)
    beta = 0.1
    s = beta * (case.policy - case.ref)
    log_p = torch.log_softmax(s, dim=-1)
    from raypo.losses import targets_from_ratings

    # The case has a missing rating: the identity is about the official targets (missing = 1.0).
    p_star = targets_from_ratings(case.scores, missing="impute")  # [B, N, m]
    mixture = (p_star * case.lam.unsqueeze(1)).sum(-1)  # [B, N]
    ce = -(mixture * log_p).sum(-1).mean()
    out = listwise_loss("lambda_dpo", case.policy, case.ref, scores=case.scores, lam=case.lam, beta=beta,
                        eps=0.0, missing_ratings="impute")
    assert out.loss.item() == pytest.approx(ce.item(), rel=1e-12)
    # 5b: the official eps adds eps * sum(lambda) * sum_i(-log P_theta(i)).
    eps = 1e-10
    out_eps = listwise_loss("lambda_dpo", case.policy, case.ref, scores=case.scores, lam=case.lam, beta=beta,
                            eps=eps, missing_ratings="impute")
    extra = (eps * case.lam.sum(-1) * (-log_p).sum(-1)).mean()
    assert out_eps.loss.item() == pytest.approx((ce + extra).item(), rel=1e-14)


# 6 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.1, 10.0])
def test_identity_6_mpo_n2_is_dpo(alpha: float) -> None:
    scores = torch.tensor([[3.0, 1.0]], dtype=D64)
    for beta, policy, ref in _pairs(6):
        got = listwise_loss("mpo", policy, ref, scores=scores, beta=beta, alpha=alpha).loss.item()
        assert got == pytest.approx(_dpo(policy, ref, beta), rel=1e-12)


def test_identity_6b_mpo_single_positive_is_listwise_ce() -> None:
    case = make_case("mpo", batch=1, n=5, seed=66, full=True)
    scores = torch.tensor([[10.0, 1.0, 2.0, 3.0, 2.5]], dtype=D64)  # mean 3.7: only response 0 is above
    out = listwise_loss("mpo", case.policy, case.ref, scores=scores, beta=0.05, alpha=0.0)
    s = 0.05 * (case.policy - case.ref)
    assert out.loss.item() == pytest.approx(-torch.log_softmax(s, -1)[0, 0].item(), rel=1e-12)


# 7 -----------------------------------------------------------------------------------------------


def test_identity_7_mallows() -> None:
    for beta, policy, ref in _pairs(7):
        one = torch.ones(1, dtype=D64)
        theta1 = listwise_loss("mallows_theta", policy, ref, dispersion=one, beta=beta,
                               reference_free=False).loss.item()
        assert theta1 == pytest.approx(_dpo(policy, ref, beta), rel=1e-12)
        phi = torch.tensor([0.37], dtype=D64)
        theta = listwise_loss("mallows_theta", policy, ref, dispersion=phi, beta=beta,
                              reference_free=False).loss.item()
        assert theta == pytest.approx(_dpo(policy, ref, beta * 0.37), rel=1e-12)
        # Length-normalised scale for IPO.
        pol_ln, ref_ln = policy / 100, ref / 100
        ipo = listwise_loss("ipo", pol_ln, ref_ln, beta=beta).loss.item()
        m_ipo = listwise_loss("mallows_ipo", pol_ln, ref_ln, dispersion=one, beta=beta,
                              variant="mallowspo").loss.item()
        assert m_ipo == pytest.approx(ipo, rel=1e-12)
        rainbow = listwise_loss("mallows_ipo", pol_ln, ref_ln, dispersion=phi, beta=beta,
                                variant="rainbowpo").loss.item()
        mallowspo = listwise_loss("mallows_ipo", pol_ln, ref_ln, dispersion=phi, beta=beta,
                                  variant="mallowspo").loss.item()
        assert rainbow == pytest.approx(beta**2 * mallowspo, rel=1e-12)


# 8 -----------------------------------------------------------------------------------------------


def test_identity_8_nca_one_hot_k2_is_pairwise_nca() -> None:
    for beta, policy, ref in _pairs(8):
        got = listwise_loss("nca", policy, ref, scores=torch.tensor([[1.0, 0.0]], dtype=D64), beta=beta,
                            temperature_alpha=1e-4).loss.item()
        s = beta * (policy - ref)
        sw, sl = s[0, 0], s[0, 1]
        want = -F.logsigmoid(sw) - 0.5 * F.logsigmoid(-sw) - 0.5 * F.logsigmoid(-sl)
        assert got == pytest.approx(want.item(), rel=1e-12)
        # The pairwise NCA itself (preference_trainer.py loss_type="NCA"), column 0 chosen or by score.
        pair = listwise_loss("nca", policy, ref, beta=beta, variant="pair").loss.item()
        flipped = torch.tensor([[0.0, 1.0]], dtype=D64)
        by_score = listwise_loss("nca", policy.flip(1), ref.flip(1), scores=flipped, beta=beta,
                                 variant="pair").loss.item()
        assert pair == pytest.approx(got, rel=1e-12) and by_score == pytest.approx(got, rel=1e-12)


# 9 -----------------------------------------------------------------------------------------------


def test_identity_9_simpo_gamma0_is_refree_dpo() -> None:
    for beta, policy, _ in _pairs(9):
        avg = policy / 120  # length-normalised log-probs
        got = listwise_loss("simpo", avg, None, beta=beta, gamma=0.0).loss.item()
        want = _dpo(avg, torch.zeros_like(avg), beta)
        assert got == pytest.approx(want, rel=1e-12)


# 10, 11, 12 --------------------------------------------------------------------------------------


def test_identity_10_lipo_lambda_n2() -> None:
    psi = torch.tensor([[0.8, 0.3]], dtype=D64)
    factor = 2 * abs(2**0.8 - 2**0.3) * (1 - 1 / math.log2(3))
    for beta, policy, ref in _pairs(10):
        got = listwise_loss("lipo_lambda", policy, ref, scores=psi, beta=beta).loss.item()
        assert got == pytest.approx(factor * _dpo(policy, ref, beta), rel=1e-12)
    # psi = (1, 0), C = 2: 0.738140 x DPO.
    assert 2 * 1 * (1 - 1 / math.log2(3)) == pytest.approx(0.738140, abs=1e-6)


def test_identity_11_constant_weight_is_pair_logistic() -> None:
    case = make_case("lipo_lambda", batch=4, n=6, seed=11)
    got = listwise_loss("lipo_lambda", case.policy, case.ref, mask=case.mask, scores=case.scores,
                        weighting="constant")
    want = listwise_loss("lipo_pair_logistic", case.policy, case.ref, mask=case.mask, scores=case.scores)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-12)


def test_identity_12_natural_log_discount() -> None:
    case = make_case("lipo_lambda", batch=3, n=5, seed=12)
    base = listwise_loss("lipo_lambda", case.policy, case.ref, mask=case.mask, scores=case.scores).loss.item()
    nat = listwise_loss("lipo_lambda", case.policy, case.ref, mask=case.mask, scores=case.scores,
                        log_base=math.e).loss.item()
    assert nat == pytest.approx(base / math.log(2), rel=1e-12)


# 13 ----------------------------------------------------------------------------------------------


LIPO = ["lipo_pair_logistic", "lipo_pair_hinge", "lipo_list_mle", "lipo_softmax", "lipo_point_mse",
        "lipo_point_sigmoid", "lipo_lambda"]


@pytest.mark.parametrize("loss", LIPO)
def test_identity_13_rax_equals_per_list_mean_for_b1(loss: str) -> None:
    case = make_case(loss, batch=1, n=7, seed=13)
    rax = listwise_loss(loss, case.policy, case.ref, mask=case.mask, scores=case.scores, reduction="rax")
    plm = listwise_loss(loss, case.policy, case.ref, mask=case.mask, scores=case.scores,
                        reduction="per_list_mean")
    assert rax.loss.item() == pytest.approx(plm.loss.item(), rel=1e-12)


# 14 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["lipo_pair_logistic", "lipo_pair_hinge", "lipo_lambda"])
def test_identity_14_all_psi_tied_gives_zero(loss: str) -> None:
    case = make_case(loss, batch=3, n=4, seed=14)
    tied = torch.full_like(case.scores, 0.5)
    out = listwise_loss(loss, case.policy, case.ref, mask=case.mask, scores=tied)
    assert out.loss.item() == 0.0
    assert out.denominator.item() == 0.0
    assert out.metrics["all_skipped"].item() == 1.0


def test_identity_14_mpo_all_equal_skipped() -> None:
    case = make_case("mpo", batch=2, n=4, seed=14, full=True)
    scores = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.1, 0.1, 0.1, 0.1]], dtype=D64)
    out = listwise_loss("mpo", case.policy, case.ref, scores=scores)
    assert out.denominator.item() == 0.0
    assert out.metrics["num_skipped"].item() == 2.0
    assert out.loss.item() == 0.0


def test_identity_14_psi_from_ranks_k3() -> None:
    psi = lipo_psi_from_ranks(torch.tensor([1, 2, 3]))
    torch.testing.assert_close(psi, torch.tensor([2.5 / 3, 0.5, 0.5 / 3], dtype=D64))


def test_identity_14_ipo_zero_at_optimum() -> None:
    beta = 0.1
    ref = torch.tensor([[-1.3, -1.1]], dtype=D64)
    policy = ref + torch.tensor([[1.0 / (2 * beta), 0.0]], dtype=D64)  # D = 1/(2 tau)
    policy.requires_grad_(True)
    out = listwise_loss("ipo", policy, ref, beta=beta)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-20)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert grad.abs().max().item() == pytest.approx(0.0, abs=1e-12)


# 15 ----------------------------------------------------------------------------------------------


def _pad(x: torch.Tensor, extra: int, value: float) -> torch.Tensor:
    return torch.cat([x, torch.full((x.shape[0], extra), value, dtype=x.dtype)], dim=1)


@pytest.mark.parametrize("loss", LIPO)
@pytest.mark.parametrize("reduction", ["rax", "paper", "sum"])
def test_identity_15_padding(loss: str, reduction: str) -> None:
    case = make_case(loss, batch=1, n=5, seed=15, full=True)
    kw = {"reduction": reduction}
    base = listwise_loss(loss, case.policy, case.ref, scores=case.scores, **kw).loss.item()
    extra = 3
    mask = _pad(torch.ones(1, 5), extra, 0.0).bool()
    padded = listwise_loss(loss, _pad(case.policy, extra, 7.0), _pad(case.ref, extra, -3.0), mask=mask,
                           scores=_pad(case.scores, extra, 0.99), **kw).loss.item()
    if loss == "lipo_lambda":
        assert padded == pytest.approx(base * 8 / 5, rel=1e-12)
        valid = listwise_loss(loss, _pad(case.policy, extra, 7.0), _pad(case.ref, extra, -3.0), mask=mask,
                              scores=_pad(case.scores, extra, 0.99), scale="valid", **kw).loss.item()
        base_valid = listwise_loss(loss, case.policy, case.ref, scores=case.scores, scale="valid", **kw)
        assert valid == pytest.approx(base_valid.loss.item(), rel=1e-12)
    else:
        assert padded == pytest.approx(base, rel=1e-12)


# 16 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", [0.05, 0.2, 0.5, 0.9, 0.999])
def test_identity_16_mallows_link(phi: float) -> None:
    one = mallows_phi_link(torch.tensor([1.0], dtype=D64), phi)
    assert one.item() == pytest.approx(1 / (1 + phi), rel=1e-13)
    d = torch.linspace(-12, 12, 97, dtype=D64)
    g = mallows_phi_link(d, phi)
    torch.testing.assert_close(g + mallows_phi_link(-d, phi), torch.ones_like(d), atol=1e-14, rtol=0)
    assert bool((g[1:] >= g[:-1]).all())
    # Exact at integers (closed form, direct evaluation in float64 for moderate d).
    for k in range(1, 6):
        want = (k + 1) / (1 - phi ** (k + 1)) - k / (1 - phi**k)
        got = mallows_phi_link(torch.tensor([float(k)], dtype=D64), phi).item()
        assert got == pytest.approx(want, rel=1e-10)


# 17 ----------------------------------------------------------------------------------------------

LISTWISE = [n for n in ALL_LOSSES if n not in PAIRWISE]


@pytest.mark.parametrize("loss", LISTWISE)
@pytest.mark.parametrize("perturb", [0.0, 0.5])
def test_identity_17_listwise_gradient_signs(loss: str, perturb: float) -> None:
    """dL/dlogp[best] < 0 and dL/dlogp[best] < dL/dlogp[worst], at and near policy = reference."""
    case = make_case(loss, batch=1, n=5, seed=17, full=True)
    g = torch.Generator().manual_seed(170)
    policy = (case.ref + perturb * torch.randn(case.ref.shape, generator=g, dtype=D64)).requires_grad_(True)
    if loss == "lambda_dpo":
        scores = torch.tensor([[[5.0] * 4, [4.0] * 4, [3.0] * 4, [2.0] * 4, [1.0] * 4]], dtype=D64)
        best, worst = 0, 4
    else:
        scores = torch.tensor([[0.2, 0.9, 0.5, 0.1, 0.4]], dtype=D64)
        best, worst = 1, 3
    out = listwise_loss(loss, policy, case.ref, scores=scores, lam=case.lam, dispersion=case.dispersion,
                        **case.hparams)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert grad[0, best] < 0
    assert grad[0, best] < grad[0, worst]


@pytest.mark.parametrize("loss", PAIRWISE)
@pytest.mark.parametrize("perturb", [0.0, 0.01])
def test_identity_17_pairwise_gradient_signs(loss: str, perturb: float) -> None:
    """dL/dtheta_w < 0 < dL/dtheta_l at and near policy = reference (N = 2, column 0 chosen)."""
    case = make_case(loss, batch=1, n=2, seed=171, full=True)
    policy = (case.ref + torch.tensor([[perturb, -perturb]], dtype=D64)).requires_grad_(True)
    out = listwise_loss(loss, policy, case.ref, dispersion=case.dispersion, **case.hparams)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert grad[0, 0] < 0 < grad[0, 1]
