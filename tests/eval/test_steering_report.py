"""raypo.eval.steering's lambdas and report: the one-hot matrix, the diagonal check and edge monotonicity."""

from __future__ import annotations

import pytest

from raypo.eval.steering import format_steering, simplex_edges, steering_lambdas, steering_report

DIMS = ["a", "b", "c"]


def _result(accuracy) -> dict:
    """An evaluation at steering_lambdas(3, 3) whose accuracy on dimension j is accuracy(lam, j)."""
    lambdas = steering_lambdas(3, points=3)
    return {"dimensions": DIMS, "results": [
        {"lambda": lam, "metrics": {"pairwise_accuracy": {d: accuracy(lam, j) for j, d in enumerate(DIMS)}}}
        for lam in lambdas]}


def test_the_lambdas_cover_every_one_hot_the_uniform_and_every_edge_once():
    lambdas = steering_lambdas(3, points=5)
    assert lambdas[:4] == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3] * 3]
    assert len(lambdas) == 4 + 3 * 3 and len({tuple(x) for x in lambdas}) == len(lambdas)
    edges = simplex_edges(3, points=5)
    assert [(k, j) for k, j, _ in edges] == [(0, 1), (0, 2), (1, 2)]
    assert edges[1][2] == [[1, 0, 0], [0.75, 0, 0.25], [0.5, 0, 0.5], [0.25, 0, 0.75], [0, 0, 1]]
    assert all(lam in lambdas for _, _, path in edges for lam in path)


def test_a_model_that_follows_lambda_steers_and_is_monotone():
    report = steering_report(_result(lambda lam, j: 0.5 + 0.5 * lam[j]), points=3)
    assert report["matrix"] == [[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]]
    assert report["steers"] and report["monotone"] and len(report["edges"]) == 6
    assert report["edges"][0] == {"from": "a", "to": "b", "values": [0.5, 0.75, 1.0], "monotone": True}
    text = format_steering(report)
    assert "| e(a) | **1.000** | 0.500 | 0.500 |" in text and "NOT" not in text


def test_a_model_blind_to_lambda_does_not_steer():
    report = steering_report(_result(lambda lam, j: [0.7, 0.4, 0.6][j]), points=3)
    assert all(row == [0.7, 0.4, 0.6] for row in report["matrix"])
    assert all(x["ties"] and not x["strict"] for x in report["diagonal"]) and not report["steers"]
    assert "tied" in format_steering(report)


def test_a_dip_along_an_edge_beyond_the_tolerance_is_not_monotone():
    def accuracy(lam, j):  # dimension a dips at the middle of the edge a-b
        return 0.5 + 0.5 * lam[j] - (0.3 if j == 0 and lam == [0.5, 0.5, 0.0] else 0.0)

    report = steering_report(_result(accuracy), points=3, tolerance=0.02)
    bad = [e for e in report["edges"] if not e["monotone"]]
    assert [(e["from"], e["to"]) for e in bad] == [("b", "a")] and not report["monotone"]
    assert report["steers"]  # the one-hots are unaffected
    assert steering_report(_result(accuracy), points=3, tolerance=0.5)["monotone"]


def test_the_report_needs_every_one_hot():
    result = _result(lambda lam, j: 0.5)
    result["results"] = result["results"][1:]
    with pytest.raises(ValueError, match="every one-hot"):
        steering_report(result, points=3)
