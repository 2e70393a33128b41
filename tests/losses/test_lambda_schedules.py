"""Lambda schedules (raypo.train.lambda_schedules): simplex, seeding, per-prompt vs per-batch, resume, the
official table and the learned polynomial scheduler."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raypo.config import LambdaConfig, LearnedLambdaConfig
from raypo.train.lambda_schedules import (
    OFFICIAL_TABLE_HEAD,
    SCHEDULES,
    PolynomialLambdaScheduler,
    build_lambda_schedule,
    from_results_table,
)
from raypo.train.learned_lambda import fit_poly_scheduler, monomial_exponents, poly_features

# The lambda-DPO paper's probe results (Appendix D.5): the four one-hot lambdas and the uniform one with their
# average benchmark accuracy. The worked example itself (D.5-D.6) is tests/train/test_learned_lambda.py.
PAPER_POINTS = [
    ([1.0, 0.0, 0.0, 0.0], 0.4593),
    ([0.0, 1.0, 0.0, 0.0], 0.4598),
    ([0.0, 0.0, 1.0, 0.0], 0.4543),
    ([0.0, 0.0, 0.0, 1.0], 0.4548),
    ([0.25, 0.25, 0.25, 0.25], 0.4612),
]


LEARNED_KEYS = ("points", "degree", "num_candidates", "tau", "results_path", "score_column")


def _cfg(schedule: str, **kw) -> LambdaConfig:
    learned = {k: kw.pop(k) for k in LEARNED_KEYS if k in kw}
    if schedule == "learned":
        learned.setdefault("points", PAPER_POINTS)
    return LambdaConfig(schedule=schedule, learned=LearnedLambdaConfig(**learned), **kw)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("per", ["prompt", "batch"])
def test_samples_on_simplex_seeded_and_shaped(schedule: str, per: str) -> None:
    a = build_lambda_schedule(_cfg(schedule, per=per, seed=3))
    b = build_lambda_schedule(_cfg(schedule, per=per, seed=3))
    xa = torch.cat([a.sample(5, dtype=torch.float64) for _ in range(4)])
    xb = torch.cat([b.sample(5, dtype=torch.float64) for _ in range(4)])
    assert xa.shape == (20, 4)
    torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    assert (xa >= 0).all()
    tol = 2e-3 if schedule == "table" else 1e-12  # the official table is rounded to 3 decimals
    torch.testing.assert_close(xa.sum(-1), torch.ones(20, dtype=torch.float64), atol=tol, rtol=0)
    if per == "batch":
        for chunk in xa.split(5):
            assert (chunk == chunk[0]).all()


RANDOM_SCHEDULES = ["uniform", "dirichlet", "normalized_uniform", "gaussian", "onehot", "table", "learned"]


@pytest.mark.parametrize("schedule", RANDOM_SCHEDULES)
def test_seeds_differ(schedule: str) -> None:
    a = build_lambda_schedule(_cfg(schedule, seed=1)).sample(16)
    b = build_lambda_schedule(_cfg(schedule, seed=2)).sample(16)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("per", ["prompt", "batch"])
def test_resume_continues_the_sequence(schedule: str, per: str) -> None:
    sched = build_lambda_schedule(_cfg(schedule, seed=7, per=per))
    for _ in range(3):
        sched.sample(4)
    state = json.loads(json.dumps(sched.state_dict()))  # checkpoints store plain values
    expected = [sched.sample(4) for _ in range(3)]
    fresh = build_lambda_schedule(_cfg(schedule, seed=999, per=per))
    fresh.load_state_dict(state)
    got = [fresh.sample(4) for _ in range(3)]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_fixed_onehot_cycle() -> None:
    assert build_lambda_schedule(_cfg("fixed")).sample(2).tolist() == [[0.25] * 4] * 2
    fixed = build_lambda_schedule(_cfg("fixed", weights=[0.1, 0.2, 0.3, 0.4])).sample(1, dtype=torch.float64)
    assert fixed.tolist() == [[0.1, 0.2, 0.3, 0.4]]
    assert build_lambda_schedule(_cfg("onehot", onehot_index=2)).sample(3)[:, 2].tolist() == [1.0] * 3
    cyc = build_lambda_schedule(_cfg("cycle", per="prompt"))
    assert cyc.sample(6).argmax(-1).tolist() == [0, 1, 2, 3, 0, 1]
    cyc_b = build_lambda_schedule(_cfg("cycle", per="batch"))
    assert [cyc_b.sample(3)[0].argmax().item() for _ in range(5)] == [0, 1, 2, 3, 0]


def test_dirichlet_uniform_vs_normalized_uniform_statistics() -> None:
    """docs/loss_reference.md §3.4: for m = 4, Var(lambda_1) = 0.0375 (Dirichlet(1)) vs 0.0196 (normalised
    torch.rand)."""
    dirichlet = build_lambda_schedule(_cfg("uniform", seed=0)).sample(40000, dtype=torch.float64)
    norm_u = build_lambda_schedule(_cfg("normalized_uniform", seed=0)).sample(40000, dtype=torch.float64)
    assert dirichlet[:, 0].var().item() == pytest.approx(0.0375, abs=0.0015)
    assert norm_u[:, 0].var().item() == pytest.approx(0.0196, abs=0.001)
    assert (dirichlet.max(-1).values > 0.5).double().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (norm_u.max(-1).values > 0.5).double().mean().item() == pytest.approx(0.167, abs=0.02)
    conc = build_lambda_schedule(_cfg("dirichlet", alpha=[50.0, 50.0, 50.0, 50.0], seed=0)).sample(2000)
    assert conc.std(0).max().item() < 0.05


@pytest.mark.parametrize("rule", ["clip", "abs", "softmax", "project"])
def test_gaussian_negative_rules(rule: str) -> None:
    x = build_lambda_schedule(_cfg("gaussian", gaussian_negatives=rule, gaussian_std=1.0, seed=0)).sample(
        500, dtype=torch.float64)
    assert (x >= 0).all()
    torch.testing.assert_close(x.sum(-1), torch.ones(500, dtype=torch.float64))
    if rule in ("clip", "project"):
        assert (x == 0).any()  # negatives were clipped / projected to a face of the simplex
    else:
        assert (x > 0).all()


def test_table_default_is_official_head_table_and_per_batch_draws_once() -> None:
    sched = build_lambda_schedule(_cfg("table", seed=42, per="batch"))
    rows = torch.tensor([r for r, _ in OFFICIAL_TABLE_HEAD])
    got = [sched.sample(8)[0] for _ in range(5)]
    expected_idx = [6, 0, 2, 2, 7]  # the official first five indices for seed 42
    for g, i in zip(got, expected_idx):
        torch.testing.assert_close(g, rows[i])


# Learned polynomial scheduler ------------------------------------------------------------------------


def test_monomial_order_and_count() -> None:
    exps = monomial_exponents(4, 2)
    assert len(exps) == 15
    assert exps[:6] == [(), (0,), (1,), (2,), (3,), (0, 0)]
    assert exps[5:] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]
    assert len(monomial_exponents(4, 3)) == 35
    phi = poly_features([[0.1, 0.2, 0.3, 0.4]], 2)
    assert phi.shape == (1, 15)
    assert phi[0, 0] == 1.0 and phi[0, 2] == 0.2 and phi[0, 6] == pytest.approx(0.1 * 0.2)


def test_learned_scheduler_samples_by_the_fitted_scores() -> None:
    """Degree 2 with 15 features and 5 points is under-determined: the minimum-norm fit interpolates the
    points, and the softmax over Dirichlet candidates favours the best region."""
    lam = np.array([p[0] for p in PAPER_POINTS])
    acc = np.array([p[1] for p in PAPER_POINTS])
    sched = PolynomialLambdaScheduler(_cfg("learned", num_candidates=2000, tau=1000.0, seed=0))
    np.testing.assert_allclose(sched.predict(lam), acc, atol=1e-12)
    np.testing.assert_allclose(sched.weights, fit_poly_scheduler(lam, acc, degree=2), atol=1e-15)
    assert sched.probs.shape == (2000,) and sched.probs.sum() == pytest.approx(1.0)
    # pi is increasing in a_hat, and sampling concentrates on good candidates.
    order = np.argsort(sched.a_hat)
    assert (np.diff(sched.probs[order]) >= 0).all()
    assert (sched.probs * sched.a_hat).sum() > sched.a_hat.mean()
    draws = sched.sample(4000, dtype=torch.float64).numpy()
    assert sched.predict(draws).mean() > sched.a_hat.mean()
    # More weight on the best one-hot dimension (1: 0.4598) than on the worst (2: 0.4543).
    mean_lam = (sched.probs[:, None] * sched.candidates).sum(0)
    assert mean_lam[1] > mean_lam[2]
    # A larger tau (it multiplies the scores) concentrates more; tau = 0 is uniform.
    hot = PolynomialLambdaScheduler(_cfg("learned", num_candidates=2000, tau=10000.0, seed=0))
    assert hot.probs.max() > sched.probs.max()
    flat = PolynomialLambdaScheduler(_cfg("learned", num_candidates=2000, tau=0.0, seed=0))
    np.testing.assert_allclose(flat.probs, 1 / 2000)


def test_learned_scheduler_default_tau_is_the_papers() -> None:
    """tau = 100 (Appendix D.4): with accuracy-scale scores p stays within a factor of a few of 1/K while
    favouring the better candidates, as in the paper's table (p from 0.067 to 0.185)."""
    assert LambdaConfig().learned.tau == 100.0
    for seed in range(5):
        sched = PolynomialLambdaScheduler(LambdaConfig(
            schedule="learned", learned=LearnedLambdaConfig(points=PAPER_POINTS, seed=seed)))
        assert sched.probs.shape == (10,)
        np.testing.assert_allclose(np.log(sched.probs / sched.probs[0]), 100 * (sched.a_hat - sched.a_hat[0]),
                                   atol=1e-9)
        assert sched.probs.min() > 0.03 and sched.probs.max() < 0.3
        assert np.argmax(sched.probs) == np.argmax(sched.a_hat)


def test_from_results_table_csv_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    cols = ["config/lambda_0", "config/lambda_1", "config/lambda_2", "config/lambda_3"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*cols, "eval/pairwise_accuracy", "trial_id"])
        writer.writeheader()
        for i, (lam, acc) in enumerate(PAPER_POINTS):
            writer.writerow({**dict(zip(cols, lam)), "eval/pairwise_accuracy": acc, "trial_id": i})
        writer.writerow({**dict(zip(cols, [0.5, 0.5, 0, 0])), "eval/pairwise_accuracy": "", "trial_id": 9})
    sched = from_results_table(path, cols, "eval/pairwise_accuracy", seed=1)
    assert len(sched.points_score) == 5  # the row without a score is skipped
    np.testing.assert_allclose(sched.predict([p[0] for p in PAPER_POINTS]),
                               [p[1] for p in PAPER_POINTS], atol=1e-12)
    rows = [{**dict(zip(cols, lam)), "acc": acc} for lam, acc in PAPER_POINTS]
    again = from_results_table(rows, cols, "acc", seed=1)
    np.testing.assert_allclose(again.probs, sched.probs)
    with pytest.raises(ValueError, match="not in the table"):
        from_results_table(rows, cols, "missing")
    # Through the config path (results_path + default lambda_{k} columns).
    path2 = tmp_path / "plain.csv"
    with path2.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lambda_0", "lambda_1", "lambda_2", "lambda_3", "eval/pairwise_accuracy"])
        for lam, acc in PAPER_POINTS:
            writer.writerow([*lam, acc])
    built = build_lambda_schedule({"schedule": "learned", "learned": {"results_path": str(path2)}, "seed": 1})
    np.testing.assert_allclose(built.probs, sched.probs)


def test_build_from_project_config_object() -> None:
    cfg = LambdaConfig(schedule="table", per="batch", seed=42)
    sched = build_lambda_schedule(cfg, num_dims=4)
    assert sched.cfg.per == "batch" and sched.cfg.seed == 42
    assert sched.sample(2).shape == (2, 4)


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError, match="schedule"):
        build_lambda_schedule(LambdaConfig(schedule="beta"))
    with pytest.raises(ValueError, match="per"):
        build_lambda_schedule(LambdaConfig(per="step"))
    with pytest.raises(ValueError, match="points"):
        build_lambda_schedule(LambdaConfig(schedule="learned"))
    with pytest.raises(ValueError, match="not 'uniform'"):
        build_lambda_schedule(_cfg("uniform")).load_state_dict(build_lambda_schedule(_cfg("fixed")).state_dict())
