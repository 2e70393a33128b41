"""``raypo eval``: a trained policy's ranking metrics per dimension at several lambdas, and the trade-off
picture along the simplex between one-hots (docs/steering.md).

The lambdas: those given, else each one-hot e_k and the uniform lambda; with a plot and no lambdas, the
path e_1 -> e_2 -> ... -> e_m in ``points`` steps per edge. The result (:func:`evaluate_model`) is one JSON
object::

    {"model": ..., "data": ..., "num_prompts": P, "conditioned": true, "dimensions": [...],
     "results": [{"lambda": [...], "metrics": {"pairwise_accuracy": {DIM: v, ...}, "ndcg": {...},
                                               "kendall_tau": {...}}}, ...]}
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional

from raypo.config import DataConfig
from raypo.eval.listwise import ListScorer, ScorerSpec, lambda_metrics
from raypo.eval.models import EvalModel


class EvalDataError(ValueError):
    """Evaluation data that does not fit the model (its dimensions)."""


def default_lambdas(dims: Sequence[str]) -> list[list[float]]:
    """Each one-hot e_k, then the uniform lambda."""
    m = len(dims)
    return [[1.0 if i == k else 0.0 for i in range(m)] for k in range(m)] + [[1.0 / m] * m]


def edge_lambdas(dims: Sequence[str], points: int = 5) -> list[list[float]]:
    """The path e_1 -> e_2 -> ... -> e_m, ``points`` lambdas per edge (shared corners once)."""
    m = len(dims)
    if m < 2 or points < 2:
        raise ValueError("the trade-off path needs >= 2 dimensions and >= 2 points per edge")
    path: list[list[float]] = []
    for k in range(m - 1):
        for i in range(0 if k == 0 else 1, points):
            t = i / (points - 1)
            lam = [0.0] * m
            lam[k], lam[k + 1] = 1.0 - t, t
            path.append(lam)
    return path


def _data_config(data: str, data_format: str, base: Optional[DataConfig]) -> DataConfig:
    cfg = base if base is not None else DataConfig()
    return replace(cfg, train_path=data, eval_path=None, format=data_format, eval_fraction=0.0,
                   quarantine_path=None, dimensions=[])


def _check_dimensions(data_dims: Sequence[str], model: EvalModel, data: str) -> None:
    if model.dimensions and list(data_dims) != model.dimensions:
        raise EvalDataError(f"the data at {data} is rated on ({', '.join(data_dims) or 'no dimensions'}) but "
                            f"the model was trained on ({', '.join(model.dimensions)}); evaluate on data "
                            "rated on the model's dimensions, in the same order")


def score_rows_local(spec: ScorerSpec, rows: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """:class:`ListScorer` in this process, ``batch_size`` lists per forward."""
    import pyarrow as pa

    scorer = ListScorer(spec)
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        out += scorer(pa.Table.from_pylist(rows[start:start + batch_size])).to_pylist()
    return out


def score_rows_ray(spec: ScorerSpec, ds, batch_size: int) -> list[dict[str, Any]]:
    """:class:`ListScorer` as a Ray Data stage on one actor (a GPU when the cluster has one)."""
    import ray
    import ray.data

    from raypo.progress import ray_data_stage

    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    with ray_data_stage("eval scoring", unit="prompts") as stage:
        scored = ds.map_batches(ListScorer, fn_constructor_args=(spec,), batch_size=batch_size,
                                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
                                num_cpus=1, num_gpus=gpus)
        batches = scored.iter_batches(batch_format="pyarrow", batch_size=None)
        rows = [r for b in batches for r in b.to_pylist()]
        stage.done = len(rows)
    return rows


def evaluate_model(model: EvalModel, data: str, lambdas: Optional[list[list[float]]], *, local: bool = False,
                   data_format: str = "listwise", batch_size: int = 8, data_cfg: Optional[DataConfig] = None,
                   log=None) -> dict[str, Any]:
    """Score ``data`` with ``model`` at every lambda; the JSON object of the module docstring. Progress
    and the data report go to ``log`` (default: the sys.stderr of the call)."""
    log = log if log is not None else sys.stderr
    cfg = _data_config(data, data_format, data_cfg)
    lambdas = lambdas or default_lambdas(model.dimensions)
    spec = ScorerSpec(model_path=model.path, reference=model.reference,
                      conditioning=model.conditioning.to_dict() if model.conditioning else None,
                      lambdas=tuple(tuple(lam) for lam in lambdas))
    if local:
        from raypo.data.pipeline import build_rows

        rows, _, report = build_rows(cfg, model.path, check=True)
        print(report.format(), file=log, flush=True)
        _check_dimensions(report.dimensions or [], model, data)
        scored = score_rows_local(spec, rows, batch_size)
    else:
        import ray

        from raypo.data.pipeline import build_datasets

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ds, _, report = build_datasets(cfg, tokenizer_path=model.path, check=True)
        print(report.format(), file=log, flush=True)
        _check_dimensions(report.dimensions or [], model, data)
        scored = score_rows_ray(spec, ds, batch_size)
    if not scored:
        raise EvalDataError(f"no list of {data} survived validation; nothing to evaluate")
    dims = model.dimensions or list(report.dimensions or [])
    metrics = lambda_metrics(scored, num_lambdas=len(lambdas), dimensions=dims, beta=model.beta,
                             reduction=model.card.get("logp_reduction", "sum"))
    return {"model": model.path, "data": data, "num_prompts": len(scored),
            "conditioned": model.conditioning is not None, "dimensions": dims,
            "results": [{"lambda": list(lam), "metrics": m} for lam, m in zip(lambdas, metrics)]}


def format_table(result: dict[str, Any], metric: str = "pairwise_accuracy") -> str:
    """One line per lambda: the lambda and ``metric`` per dimension."""
    dims = result["dimensions"]
    width = max(len(d) for d in dims)
    out = io.StringIO()
    kind = "lambda-conditioned" if result["conditioned"] else "not conditioned: the same at every lambda"
    out.write(f"{result['num_prompts']} prompts; {metric} per dimension ({kind})\n")
    out.write("lambda".ljust(8 * len(dims)) + "  " + "  ".join(d.rjust(width) for d in dims) + "\n")
    for r in result["results"]:
        lam = " ".join(f"{w:.2f}".rjust(7) for w in r["lambda"])
        out.write(lam.ljust(8 * len(dims)) + "  "
                  + "  ".join(f"{r['metrics'][metric][d]:.3f}".rjust(width) for d in dims) + "\n")
    return out.getvalue()


def steering_plot(result: dict[str, Any], out_png: str, metric: str = "pairwise_accuracy") -> str:
    """A PNG of ``metric`` per dimension against the position of lambda along its results' path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims, results = result["dimensions"], result["results"]
    xs = list(range(len(results)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(xs)), 4.0))
    for d in dims:
        ax.plot(xs, [r["metrics"][metric][d] for r in results], marker="o", label=d)
    ticks = [(i, dims[r["lambda"].index(1.0)]) for i, r in enumerate(results) if max(r["lambda"]) == 1.0]
    ax.set_xticks([i for i, _ in ticks], [f"e({name})" for _, name in ticks])
    ax.set_xlabel("lambda along the simplex")
    ax.set_ylabel(f"held-out {metric.replace('_', ' ')}")
    ax.set_title("Steering: each dimension's accuracy as lambda moves between one-hots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def simplex_edges(m: int, points: int = 5) -> list[tuple[int, int, list[list[float]]]]:
    """Every edge of the simplex, e_k -> e_j for k < j, as ``points`` equally spaced lambdas (k, j, path)."""
    if m < 2 or points < 2:
        raise ValueError("the simplex's edges need >= 2 dimensions and >= 2 points per edge")
    edges = []
    for k in range(m):
        for j in range(k + 1, m):
            path = []
            for i in range(points):
                t = i / (points - 1)
                lam = [0.0] * m
                lam[k], lam[j] = 1.0 - t, t
                path.append(lam)
            edges.append((k, j, path))
    return edges


def steering_lambdas(m: int, points: int = 5) -> list[list[float]]:
    """Each one-hot, the uniform lambda, and the inner points of every edge (:func:`simplex_edges`): what
    :func:`steering_report` needs."""
    out = [[1.0 if i == k else 0.0 for i in range(m)] for k in range(m)] + [[1.0 / m] * m]
    for _, _, path in simplex_edges(m, points):
        out += [lam for lam in path[1:-1] if lam not in out]
    return out


def along_path(result: dict[str, Any], points: int = 5) -> dict[str, Any]:
    """``result`` restricted to the path e_1 -> e_2 -> ... -> e_m (:func:`edge_lambdas`), in path order: what
    :func:`steering_plot` draws from an evaluation at :func:`steering_lambdas`."""
    by_lambda = {tuple(r["lambda"]): r for r in result["results"]}
    path = [by_lambda[tuple(lam)] for lam in edge_lambdas(result["dimensions"], points=points)]
    return {**result, "results": path}


def steering_report(result: dict[str, Any], metric: str = "pairwise_accuracy", points: int = 5,
                    tolerance: float = 0.02) -> dict[str, Any]:
    """Whether an evaluation (:func:`evaluate_model` at :func:`steering_lambdas`) shows a model that steers.

    ``matrix[k][j]`` = ``metric`` on dimension j when evaluated at lambda = e_k. Dimension j *steers* when
    it is ranked best at its own one-hot, A[j][j] > A[k][j] for every k != j (``strict``; ``ties`` when
    only >=). Along each edge e_k -> e_j (both directions, ``points`` lambdas) the accuracy on the
    dimension moved towards is *monotone* when no point falls more than ``tolerance`` below the one before
    it (the noise of a finite eval set). Edges whose points were not all evaluated are left out."""
    dims = result["dimensions"]
    m = len(dims)
    by_lambda = {tuple(round(w, 6) for w in r["lambda"]): r["metrics"][metric] for r in result["results"]}

    def at(lam: Sequence[float]) -> Optional[dict[str, float]]:
        return by_lambda.get(tuple(round(w, 6) for w in lam))

    onehots = [at([1.0 if i == k else 0.0 for i in range(m)]) for k in range(m)]
    if any(row is None for row in onehots):
        raise ValueError("steering_report needs the evaluation at every one-hot lambda")
    matrix = [[float(row[d]) for d in dims] for row in onehots]
    diagonal = []
    for j, d in enumerate(dims):
        others = [matrix[k][j] for k in range(m) if k != j]
        best = max(others) if others else float("-inf")
        diagonal.append({"dimension": d, "own": matrix[j][j], "best_other": best,
                         "ties": matrix[j][j] >= best, "strict": matrix[j][j] > best})
    edges = []
    for k, j, path in simplex_edges(m, points):
        rows = [at(lam) for lam in path]
        if any(r is None for r in rows):
            continue
        for src, dst, seq in ((k, j, rows), (j, k, rows[::-1])):
            values = [float(r[dims[dst]]) for r in seq]
            drops = [b - a for a, b in zip(values, values[1:])]
            edges.append({"from": dims[src], "to": dims[dst], "values": values,
                          "monotone": all(x >= -tolerance for x in drops)})
    return {"metric": metric, "dimensions": dims, "matrix": matrix, "diagonal": diagonal, "edges": edges,
            "tolerance": tolerance, "steers": all(x["strict"] for x in diagonal),
            "monotone": bool(edges) and all(e["monotone"] for e in edges)}


def format_steering(report: dict[str, Any]) -> str:
    """A :func:`steering_report` as markdown: the matrix, the diagonal check and each edge's values."""
    dims, metric = report["dimensions"], report["metric"].replace("_", " ")
    lines = [f"Held-out {metric}, A[k][j]: evaluated at lambda = e_k (rows), on dimension j (columns).", "",
             "| lambda | " + " | ".join(dims) + " |", "|---|" + "---|" * len(dims)]
    for k, row in enumerate(report["matrix"]):
        cells = [f"**{v:.3f}**" if j == k else f"{v:.3f}" for j, v in enumerate(row)]
        lines.append(f"| e({dims[k]}) | " + " | ".join(cells) + " |")
    lines.append("")
    for x in report["diagonal"]:
        verdict = "best at its own one-hot" if x["strict"] else ("tied" if x["ties"] else "NOT best")
        lines.append(f"* {x['dimension']}: {x['own']:.3f} at its own one-hot, at most {x['best_other']:.3f} "
                     f"at the others: {verdict}")
    if report["edges"]:
        lines += ["", f"Along each edge (tolerance {report['tolerance']}), the accuracy on the dimension "
                  "moved towards:", ""]
        for e in report["edges"]:
            values = " -> ".join(f"{v:.3f}" for v in e["values"])
            lines.append(f"* e({e['from']}) -> e({e['to']}), {e['to']}: {values} "
                         f"({'monotone' if e['monotone'] else 'NOT monotone'})")
    return "\n".join(lines) + "\n"
