"""The learned lambda scheduler as the lambda-DPO paper defines it (Appendix D; docs/loss_reference.md §3.5):
its worked example (D.5-D.6), tau multiplying the scores, both candidate sets of D.3, the refusal of the
old ``temperature`` key, ``raypo lambdas fit``, and the Gaussian / one-hot schedule options set from YAML."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raypo.cli import main
from raypo.config import LambdaConfig, LearnedLambdaConfig, config_from_dict, load_config
from raypo.errors import ConfigError
from raypo.train.lambda_schedules import build_lambda_schedule, project_to_simplex
from raypo.train.learned_lambda import (
    candidate_set,
    fit_poly_scheduler,
    poly_features,
    simplex_grid,
    softmax_scores,
)

# Appendix D.5: five probe runs (the four one-hot lambdas and the uniform one), average benchmark accuracy.
PROBES = [
    ([1.0, 0.0, 0.0, 0.0], 0.4593),
    ([0.0, 1.0, 0.0, 0.0], 0.4598),
    ([0.0, 0.0, 1.0, 0.0], 0.4543),
    ([0.0, 0.0, 0.0, 1.0], 0.4548),
    ([0.25, 0.25, 0.25, 0.25], 0.4612),
]

# Appendix D.6: the ten Dirichlet(1, 1, 1, 1) candidates with the paper's predicted score f and probability p.
PAPER_TABLE = [  # l1, l2, l3, l4, f, p
    (0.212, 0.334, 0.245, 0.209, 0.452, 0.095),
    (0.126, 0.237, 0.131, 0.507, 0.450, 0.075),
    (0.542, 0.079, 0.256, 0.123, 0.455, 0.117),
    (0.233, 0.721, 0.020, 0.025, 0.459, 0.185),
    (0.004, 0.334, 0.281, 0.381, 0.449, 0.067),
    (0.320, 0.069, 0.513, 0.099, 0.451, 0.082),
    (0.236, 0.155, 0.358, 0.251, 0.452, 0.093),
    (0.141, 0.110, 0.701, 0.048, 0.454, 0.110),
    (0.070, 0.198, 0.388, 0.344, 0.451, 0.081),
    (0.090, 0.139, 0.306, 0.465, 0.450, 0.095),
]


def _learned(**kw) -> LambdaConfig:
    return LambdaConfig(schedule="learned", learned=LearnedLambdaConfig(points=PROBES, **kw))


# The paper's worked example ---------------------------------------------------------------------------------


def test_degree_2_fit_of_the_five_probes_has_15_features_and_interpolates_them() -> None:
    lam = np.array([p[0] for p in PROBES])
    y = np.array([p[1] for p in PROBES])
    phi = poly_features(lam, 2)
    assert phi.shape == (5, 15)  # C(4 + 2, 2) monomials, constant included
    w = fit_poly_scheduler(lam, y, degree=2)
    assert w.shape == (15,)
    np.testing.assert_allclose(phi @ w, y, atol=1e-9, rtol=0)
    # minimum norm: w lies in the row space of phi (what gradient descent from w = 0 converges to)
    _, _, vt = np.linalg.svd(phi)
    np.testing.assert_allclose(vt[np.linalg.matrix_rank(phi):] @ w, 0.0, atol=1e-12)
    # the paper's rounded print of its polynomial: constant 0.35, linear 0.09 each, quadratic 0.00-0.04
    assert w[0] == pytest.approx(0.35, abs=0.01)
    np.testing.assert_allclose(w[1:5], 0.09, atol=0.005)
    assert (w[5:] >= 0).all() and (w[5:] <= 0.04).all()
    # the paper's f column is not this fit at the table's lambdas (every printed f is lower, by 0.002-0.011):
    # its table cannot come from these five points, so the method is tested step by step instead
    f_fit = poly_features(np.array([r[:4] for r in PAPER_TABLE]), 2) @ w
    assert f_fit.min() > 0.458 and f_fit.max() < 0.462
    assert (np.array([r[4] for r in PAPER_TABLE]) < f_fit - 0.002).all()
    # the scheduler fits the same polynomial
    sched = build_lambda_schedule(_learned(), num_dims=4)
    np.testing.assert_allclose(sched.weights, w, atol=1e-15)
    np.testing.assert_allclose(sched.fit.residuals, 0.0, atol=1e-9)


def test_softmax_of_100_f_gives_the_papers_p_column_except_its_row_10_typo() -> None:
    f = np.array([r[4] for r in PAPER_TABLE])
    p_paper = np.array([r[5] for r in PAPER_TABLE])
    p = softmax_scores(f, 100.0)
    assert LearnedLambdaConfig().tau == 100.0  # the paper's tau is the default
    # rows 1-9: within 0.01 (f is printed to 3 decimals, which alone moves p by about 5 %)
    np.testing.assert_allclose(p[:9], p_paper[:9], atol=0.01, rtol=0)
    # row 10 has f = 0.450 like row 2 (p = 0.075), so it must get row 2's p, about 0.076; the paper's
    # 0.095 is a typo in the paper, not a different rule.
    assert p[9] == pytest.approx(0.076, abs=0.001) and p[9] == pytest.approx(p[1], abs=1e-12)
    assert abs(p[9] - p_paper[9]) > 0.015
    # tau multiplies the scores: candidates 0.01 apart differ by a factor of e
    two = softmax_scores(np.array([0.45, 0.46]), 100.0)
    assert two[1] / two[0] == pytest.approx(math.e)


# Candidate sets (D.3) --------------------------------------------------------------------------------------


def test_simplex_grid_is_every_composition_of_the_resolution() -> None:
    grid = simplex_grid(4, 4)
    assert grid.shape == (math.comb(4 + 3, 3), 4) == (35, 4)
    np.testing.assert_allclose(grid.sum(1), 1.0)
    np.testing.assert_allclose(grid * 4, np.round(grid * 4), atol=1e-12)  # multiples of 1/4
    assert len({tuple(r) for r in grid}) == 35  # distinct, hence all of them
    assert [0.25] * 4 in grid.tolist() and [1.0, 0, 0, 0] in grid.tolist()
    sched = build_lambda_schedule(_learned(candidates="grid", grid_resolution=2), num_dims=4)
    np.testing.assert_array_equal(sched.candidates, simplex_grid(4, 2))
    assert sched.probs.shape == (10,)


def test_dirichlet_candidates_take_any_alpha_and_their_own_seed() -> None:
    def cands(**kw):
        return candidate_set(LearnedLambdaConfig(num_candidates=4000, **kw), 4)

    uniform, concentrated, sparse = cands(), cands(dirichlet_alpha=[50.0]), cands(dirichlet_alpha=[0.1])
    assert uniform[:, 0].var() == pytest.approx(0.0375, abs=0.003)  # Dirichlet(1): uniform on the simplex
    assert concentrated.std(0).max() < 0.05 and (sparse.max(1) > 0.9).mean() > 0.5
    skewed = cands(dirichlet_alpha=[8.0, 1.0, 1.0, 1.0])
    assert skewed[:, 0].mean() == pytest.approx(8 / 11, abs=0.01)
    np.testing.assert_array_equal(cands(seed=3), cands(seed=3))
    assert not np.array_equal(cands(seed=3), cands(seed=4))
    # the candidates depend on learned.seed only, not on the lambda stream's seed (it differs per rank)
    a = build_lambda_schedule(LambdaConfig(schedule="learned", seed=0,
                                           learned=LearnedLambdaConfig(points=PROBES)))
    b = build_lambda_schedule(LambdaConfig(schedule="learned", seed=1000,
                                           learned=LearnedLambdaConfig(points=PROBES)))
    np.testing.assert_array_equal(a.candidates, b.candidates)


def test_candidate_options_and_tau_are_read_from_yaml_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "learned.yaml"
    path.write_text("lambdas:\n  schedule: learned\n  learned:\n    points: "
                    + json.dumps([[lam, y] for lam, y in PROBES])
                    + "\n    candidates: dirichlet\n    dirichlet_alpha: [0.5]\n    num_candidates: 7\n"
                      "    tau: 50\n    seed: 2\n")
    cfg = load_config(path)
    sched = build_lambda_schedule(cfg.lambdas, num_dims=4)
    np.testing.assert_array_equal(
        sched.candidates, np.random.Generator(np.random.PCG64(2)).dirichlet([0.5] * 4, size=7))
    np.testing.assert_allclose(sched.probs, softmax_scores(sched.a_hat, 50.0))
    bad = {"lambdas": {"schedule": "learned", "learned": {"points": [], "candidates": "sobol", "tau": -1.0,
                                                          "dirichlet_alpha": [0.0], "grid_resolution": 0}}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(bad)
    text = str(exc.value)
    for key in ("lambdas.learned.candidates='sobol'", "lambdas.learned.tau=-1.0",
                "lambdas.learned.dirichlet_alpha=[0.0]", "lambdas.learned.results_path is required"):
        assert key in text, key


def test_old_temperature_key_is_refused_with_the_equivalent_tau() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"lambdas": {"schedule": "learned", "learned": {"results_path": "r.csv",
                                                                         "temperature": 0.1}}})
    text = str(exc.value)
    assert "lambdas.learned.temperature=0.1" in text and "lambdas.learned.tau=10" in text
    assert "tau = 1/temperature" in text and "'tau: 10'" in text
    with pytest.raises(ValueError, match="tau=100 "):  # code that builds the config directly
        build_lambda_schedule(_learned(temperature=0.01), num_dims=4)


# raypo lambdas fit -----------------------------------------------------------------------------------------


def _write_probes(path: Path, score_column: str = "acc") -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lambda_0", "lambda_1", "lambda_2", "lambda_3", score_column, "trial_id"])
        for i, (lam, y) in enumerate(PROBES):
            w.writerow([*lam, y, f"t{i}"])
    return path


def test_lambdas_fit_json_on_the_papers_five_points(tmp_path: Path, capsys) -> None:
    path = _write_probes(tmp_path / "probes.csv")
    assert main(["lambdas", "fit", str(path), "--score-column", "acc", "--json", "--seed", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"weights", "features", "residuals", "candidates"} <= set(out)
    assert len(out["features"]) == len(out["weights"]) == 15 and out["features"][:2] == ["1", "l0"]
    assert max(abs(r["residual"]) for r in out["residuals"]) < 1e-9
    assert [r["lambda"] for r in out["residuals"]] == [lam for lam, _ in PROBES]
    cands = out["candidates"]
    assert len(cands) == 10 and sum(c["p"] for c in cands) == pytest.approx(1.0)
    # the same table as the training schedule with these options
    sched = build_lambda_schedule(LambdaConfig(schedule="learned", learned=LearnedLambdaConfig(
        results_path=str(path), score_column="acc", seed=5)), num_dims=4)
    np.testing.assert_allclose([c["lambda"] for c in cands], sched.candidates, rtol=0, atol=0)
    np.testing.assert_allclose([c["p"] for c in cands], sched.probs, rtol=0, atol=0)
    np.testing.assert_allclose([c["f"] for c in cands], sched.a_hat, rtol=0, atol=0)
    # a grid, named columns, and the text form
    assert main(["lambdas", "fit", str(path), "--score-column", "acc", "--candidates", "grid:2", "--tau", "0",
                 "--degree", "1", "--lambda-columns", "lambda_0,lambda_1,lambda_2,lambda_3"]) == 0
    text = capsys.readouterr().out
    assert "polynomial (degree 1, 5 features)" in text and "p = softmax(0 * f)" in text
    assert text.count(" p 0.1000") == 10  # tau = 0: uniform over the 10 grid points


def test_lambdas_fit_errors_exit_2_and_say_why(tmp_path: Path, capsys) -> None:
    path = _write_probes(tmp_path / "probes.csv")
    assert main(["lambdas", "fit", str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["lambdas", "fit", str(path)]) == 2  # default score column eval/pairwise_accuracy
    err = capsys.readouterr().err
    assert "['eval/pairwise_accuracy']" in err and "columns found" in err and "'acc'" in err
    assert main(["lambdas", "fit", str(path), "--score-column", "acc", "--lambda-columns", "a,b"]) == 2
    assert "['a', 'b']" in capsys.readouterr().err
    one = tmp_path / "one.csv"
    one.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    assert main(["lambdas", "fit", str(one), "--score-column", "acc"]) == 2
    assert "too few rows" in capsys.readouterr().err
    assert main(["lambdas", "fit", str(path), "--score-column", "acc", "--candidates", "sobol:3"]) == 2
    assert "dirichlet:K[:ALPHA] or grid:R" in capsys.readouterr().err


# Gaussian and one-hot options from YAML --------------------------------------------------------------------


def test_gaussian_mean_std_projection_and_onehot_index_from_yaml(tmp_path: Path) -> None:
    """The paper's "standard normal, projected to the simplex": mean 0, std 1, ``project``."""
    path = tmp_path / "gauss.yaml"
    path.write_text("lambdas:\n  schedule: gaussian\n  gaussian_mean: [0, 0, 0, 0]\n  gaussian_std: 1.0\n"
                    "  gaussian_negatives: project\n  seed: 4\n  onehot_index: 2\n")
    cfg = load_config(path)
    draws = build_lambda_schedule(cfg.lambdas, num_dims=4).sample(6, dtype=torch.float64)
    z = np.random.Generator(np.random.PCG64(4)).normal(np.zeros(4), 1.0, size=(6, 4))
    np.testing.assert_allclose(draws.numpy(), project_to_simplex(z), atol=1e-12)
    shifted = tmp_path / "shifted.yaml"
    shifted.write_text(path.read_text().replace("[0, 0, 0, 0]", "[3, 0, 0, 0]").replace("1.0", "0.1"))
    lam = build_lambda_schedule(load_config(shifted).lambdas, num_dims=4).sample(50)
    assert (lam[:, 0] == 1.0).all()  # a mean far along e_1 with a small std projects onto that vertex
    onehot = load_config(path, ["lambdas.schedule=onehot"])
    assert build_lambda_schedule(onehot.lambdas, num_dims=4).sample(3)[:, 2].tolist() == [1.0] * 3
    with pytest.raises(ConfigError, match="onehot_index=7"):
        load_config(path, ["lambdas.onehot_index=7", "data.dimensions=[a,b,c,d]"])
    with pytest.raises(ConfigError, match="gaussian_std=0"):
        load_config(path, ["lambdas.gaussian_std=0"])


def test_projection_onto_the_simplex_is_the_nearest_point() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, size=(200, 4))
    x = project_to_simplex(z)
    np.testing.assert_allclose(x.sum(1), 1.0, atol=1e-12)
    assert (x >= 0).all()
    np.testing.assert_allclose(project_to_simplex([[0.1, 0.2, 0.3, 0.4]]), [[0.1, 0.2, 0.3, 0.4]], atol=1e-15)
    # no simplex point is nearer: compare with many random simplex points
    others = rng.dirichlet(np.ones(4), size=2000)
    for zi, xi in zip(z[:20], x[:20]):
        assert np.linalg.norm(zi - xi) <= np.linalg.norm(zi - others, axis=1).min() + 1e-12
