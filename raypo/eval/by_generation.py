"""Evaluation by generation (``raypo eval MODEL --generate --prompts HELDOUT.jsonl``): do the trained
policy's own generations score better than its reference model's, per dimension, and are they longer?

For every held-out prompt x_p (p = 1..P) the policy generates one response y_p(lambda) at each lambda (a
lambda-conditioned policy sees the conditioned prompt, :mod:`raypo.eval.generation`; an unconditioned
policy is generated once, reported with ``lambda: null``) and the reference model (the model record's
``reference``, or ``--reference``) generates y_p^ref once from the plain prompt. Both use the same decoding
(:class:`raypo.data.generate.GeneratorWorker`: greedy at temperature 0, else seeded per prompt with the
same seed) and are rated by the same scorers ``fn(response, task) -> float`` (:mod:`raypo.data.scoring`;
default: the four task scorers of :mod:`raypo.data.tasks`, as ``raypo data score``). Per dimension d::

    mean_score_d   = mean over rated p of s_d(y_p)                      (the reference: of s_d(y_p^ref))
    win_rate_d     = mean over compared p of w(s_d(y_p), s_d(y_p^ref)),
                     w(a, b) = 1 if a > b, 0.5 if a == b, 0 if a < b     (ties count half)

"compared" are the prompts where both responses got a rating on d (a scorer that raised, or returned no
finite number, leaves that rating missing: counted in ``failed_ratings``, the run goes on). A policy that
generates exactly what the reference does has win rate 0.5; above 0.5 it is better more often than worse.
Lengths, the length-bias check: ``mean_words`` (whitespace-separated words, as the task scorers count) and
``mean_tokens`` (the response text re-tokenised by the policy's tokenizer, no special tokens: the same
count for both models, which can differ from the number of tokens generated when decoding and
re-encoding do not round-trip) over all P responses, for both models.

The result (:func:`evaluate_by_generation`) is the ``"generation"`` object of ``raypo eval --json``::

    {"prompts": PATH, "num_prompts": P, "rejected_rows": R, "rejected": {REASON: n}, "quarantine": PATH|null,
     "scorers": [SPEC, ...], "dimensions": [DIM, ...], "win_rule": "...",
     "settings": {"max_new_tokens": K, "temperature": T, "seed": S},
     "reference": {"source": SRC, "mean_score": {DIM: v}, "mean_words": w, "mean_tokens": t,
                   "failed_ratings": {DIM: n}},
     "results": [{"lambda": [w_1..w_m] | null, "mean_score": {DIM: v}, "reference_mean_score": {DIM: v},
                  "win_rate": {DIM: v}, "wins": {DIM: n}, "ties": {DIM: n}, "losses": {DIM: n},
                  "compared": {DIM: n}, "mean_words": w, "mean_tokens": t, "failed_ratings": {DIM: n}}, ...]}

``reference_mean_score`` is the reference's mean over the same compared prompts (it differs from
``reference.mean_score`` only when some ratings are missing). A dimension with no rated response has
``null`` means and win rate. Generation runs on a Ray Data actor pool (``concurrency`` actors, as
``raypo data generate``) unless ``local``; rating runs in this process (the scorers are plain functions).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from raypo.eval.models import EvalModel

COMPARE_KEYS = ("mean_score", "reference_mean_score", "win_rate", "wins", "ties", "losses", "compared")
WIN_RULE = "per prompt and dimension: 1 if the model's score > the reference's, 0.5 if equal, 0 if lower"


class GenerationEvalError(ValueError):
    """Input the generation evaluation cannot use (no prompt file, no usable row, no reference, a scorer)."""


@dataclass(frozen=True)
class GenerationEvalSettings:
    """Decoding (the same for the policy and the reference) and how generation is spread."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8
    concurrency: int = 1
    dtype: str = "float32"

    def problems(self) -> list[str]:
        p = [f"--max-new-tokens={self.max_new_tokens} must be >= 1"] if self.max_new_tokens < 1 else []
        if self.temperature < 0:
            p.append(f"--temperature={self.temperature} must be >= 0 (0 = greedy)")
        p += [f"--{k.replace('_', '-')}={getattr(self, k)} must be >= 1"
              for k in ("batch_size", "concurrency") if getattr(self, k) < 1]
        return p


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------


def load_prompt_rows(path: str, *, quarantine: Optional[str] = None, s3_cfg: Any = None, log=None
                     ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The usable prompt rows of ``path`` (:func:`raypo.data.generate.read_prompts`) and the rejected rows
    counted by reason; rejected rows are written to ``quarantine`` (JSONL) when given."""
    log = log if log is not None else sys.stderr
    from raypo.data.generate import read_prompts
    from raypo.data.validate import quarantine_row, write_quarantine

    try:
        rows, rejected, report = read_prompts(path, s3_cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise GenerationEvalError(f"--prompts {path!r}: {exc}") from None
    if rejected:
        print(report.format(), file=log, flush=True)
    if quarantine and rejected:
        from raypo.storage import s3_options_of

        options = s3_options_of(s3_cfg) if quarantine.startswith("s3://") else None
        n = write_quarantine((quarantine_row(o, "eval generate") for o in rejected), quarantine, options)
        print(f"raypo eval: wrote {n} rejected prompt rows to {quarantine}", file=log, flush=True)
    if not rows:
        raise GenerationEvalError(f"--prompts {path!r} holds no usable prompt row "
                                  f"({report.rejected_rows} rejected: {dict(report.rejected)})")
    return rows, dict(sorted(report.rejected.items()))


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


def _sampling(settings: GenerationEvalSettings) -> dict[str, Any]:
    return {"num_responses": 1, "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "seed": settings.seed, "dtype": settings.dtype}


class LocalGenerator:
    """One :class:`~raypo.data.generate.GeneratorWorker` per model source, kept for every lambda."""

    def __init__(self, settings: GenerationEvalSettings):
        self.settings = settings
        self.workers: dict[str, Any] = {}

    def __call__(self, source: str, rows: Sequence[dict[str, Any]]) -> list[str]:
        from raypo.data.generate import GeneratorWorker

        if source not in self.workers:
            self.workers[source] = GeneratorWorker(source, _sampling(self.settings))
        worker, bs = self.workers[source], self.settings.batch_size
        out: list[str] = []
        for start in range(0, len(rows), bs):
            texts, _ = worker.sample(list(rows[start:start + bs]))
            out += [t[0] for t in texts]
        return out


class RayGenerator:
    """Generation as ``raypo data generate`` does it: a Ray Data actor pool per model and lambda."""

    def __init__(self, settings: GenerationEvalSettings):
        self.settings = settings

    def __call__(self, source: str, rows: Sequence[dict[str, Any]]) -> list[str]:
        import ray

        from raypo.data.generate import GenerateSettings, generate_table
        from raypo.progress import ray_data_stage

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        s = self.settings
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        with ray_data_stage(f"eval generate ({len(rows)} prompts)", unit="prompts") as stage:
            table = generate_table(list(rows), source, GenerateSettings(**_sampling(s)),
                                   batch_size=s.batch_size, concurrency=s.concurrency, num_gpus=gpus)
            stage.done = table.num_rows
        return [r[0] for r in table.column("responses").to_pylist()]


# ----------------------------------------------------------------------------------------------------
# Rating and comparing (pure Python)
# ----------------------------------------------------------------------------------------------------


def rate_responses(rows: Sequence[dict[str, Any]], responses: Sequence[str], scorers: Sequence[tuple]
                   ) -> tuple[list[list[Optional[float]]], Counter, list[str]]:
    """Ratings ``[P][m]`` (None: the scorer failed), failed ratings per dimension and a few examples;
    each scorer sees the row's ``task`` plus the last user message, as in ``raypo data score``."""
    from raypo.data.scoring import MAX_EXAMPLES, score_row

    out, failed, examples = [], Counter(), []
    for row, text in zip(rows, responses):
        listwise = {"prompt_id": row["prompt_id"], "prompt": row["prompt"], "responses": [text],
                    "metadata": json.dumps({"task": row.get("task")})}
        scored, errors = score_row(listwise, scorers)
        out.append(scored["scores"][0])
        for e in errors:
            name, _, detail = e.partition("\t")
            failed[name] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{name}: {detail}")
    return out, failed, examples


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def compare(policy: Sequence[Sequence[Optional[float]]], reference: Sequence[Sequence[Optional[float]]],
            dims: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per dimension, over the prompts where both ratings exist: the means, the win rate (ties 0.5) and
    the wins / ties / losses / compared counts; ``policy`` and ``reference`` are ``[P][m]`` ratings."""
    out: dict[str, dict[str, Any]] = {k: {} for k in COMPARE_KEYS}
    for k, d in enumerate(dims):
        pairs = [(p[k], r[k]) for p, r in zip(policy, reference) if p[k] is not None and r[k] is not None]
        wins = sum(a > b for a, b in pairs)
        ties = sum(a == b for a, b in pairs)
        out["mean_score"][d] = _mean([p[k] for p in policy if p[k] is not None])
        out["reference_mean_score"][d] = _mean([b for _, b in pairs])
        out["win_rate"][d] = (wins + 0.5 * ties) / len(pairs) if pairs else None
        out["wins"][d], out["ties"][d] = wins, ties
        out["losses"][d], out["compared"][d] = len(pairs) - wins - ties, len(pairs)
    return out


def length_stats(responses: Sequence[str], tokenizer: Any = None) -> dict[str, Optional[float]]:
    """``{"mean_words", "mean_tokens"}`` over ``responses`` (tokens: None without a tokenizer)."""
    from raypo.data.tasks import word_count

    words = _mean([word_count(t) for t in responses])
    tokens = None
    if tokenizer is not None:
        tokens = _mean([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in responses])
    return {"mean_words": words, "mean_tokens": tokens}


def mean_scores(ratings: Sequence[Sequence[Optional[float]]], dims: Sequence[str]) -> dict[str, Any]:
    return {d: _mean([r[k] for r in ratings if r[k] is not None]) for k, d in enumerate(dims)}


# ----------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------


def load_scorers(specs: Optional[Sequence[str]]) -> tuple[list[str], list[tuple]]:
    """(specs, [(dimension, fn)]) -- default: the task scorers; GenerationEvalError for a bad spec."""
    from raypo.data.scoring import dimension_names, load_scorer
    from raypo.data.tasks import SCORERS

    specs = list(specs or SCORERS)
    try:
        dimension_names(specs)
        return specs, [load_scorer(s) for s in specs]
    except ValueError as exc:
        raise GenerationEvalError(str(exc)) from None


def evaluate_by_generation(model: EvalModel, prompts: str,
                           lambdas: Optional[Sequence[Sequence[float]]] = None, *,
                           scorers: Optional[Sequence[str]] = None, reference: Optional[str] = None,
                           settings: GenerationEvalSettings = GenerationEvalSettings(), local: bool = False,
                           quarantine: Optional[str] = None, responses_out: Optional[str] = None,
                           generator: Any = None, log=None) -> dict[str, Any]:
    """Generate with ``model`` (at each lambda) and with its reference, rate both, compare: the
    ``"generation"`` object of the module docstring. ``lambdas`` default to each one-hot and the uniform
    lambda for a conditioned model; an unconditioned model is generated once. ``responses_out`` (JSONL)
    keeps every prompt's responses and ratings. ``generator(source, rows) -> [text]`` replaces the
    default (:class:`LocalGenerator` or :class:`RayGenerator`)."""
    log = log if log is not None else sys.stderr
    from raypo.eval.generation import conditioned_rows
    from raypo.eval.steering import default_lambdas
    from raypo.model.loading import load_tokenizer

    problems = settings.problems()
    if problems:
        raise GenerationEvalError("; ".join(problems))
    specs, fns = load_scorers(scorers)
    dims = [name for name, _ in fns]
    ref_source = reference or model.card.get("reference")
    if not ref_source:
        raise GenerationEvalError(f"{model.path}'s record names no reference model; pass --reference SOURCE")
    rows, rejected = load_prompt_rows(prompts, quarantine=quarantine, log=log)
    if model.conditioning is None:
        if lambdas:
            print("raypo eval: the model is not lambda-conditioned; generating once, --lambda has no effect "
                  "on generation", file=log, flush=True)
        points: list[Optional[list[float]]] = [None]
    else:
        points = [list(lam) for lam in (lambdas or default_lambdas(model.dimensions))]
    generate = generator or (LocalGenerator(settings) if local else RayGenerator(settings))
    tokenizer = load_tokenizer(model.path)

    ref_texts = generate(ref_source, rows)
    ref_scores, ref_failed, examples = rate_responses(rows, ref_texts, fns)
    out = {"prompts": prompts, "num_prompts": len(rows), "rejected_rows": sum(rejected.values()),
           "rejected": rejected, "quarantine": quarantine if rejected else None, "scorers": specs,
           "dimensions": dims, "win_rule": WIN_RULE,
           "settings": {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                        "seed": settings.seed},
           "reference": {"source": ref_source, "mean_score": mean_scores(ref_scores, dims),
                         **length_stats(ref_texts, tokenizer),
                         "failed_ratings": {d: ref_failed[d] for d in dims}},
           "results": []}
    kept = [{"model": "reference", "lambda": None, "texts": ref_texts, "scores": ref_scores}]
    for lam in points:
        texts = generate(model.path, conditioned_rows(model, rows, lam))
        scores, failed, more = rate_responses(rows, texts, fns)
        examples += more
        failed_ratings = {d: failed[d] for d in dims}
        out["results"].append({"lambda": lam, **compare(scores, ref_scores, dims),
                               **length_stats(texts, tokenizer), "failed_ratings": failed_ratings})
        kept.append({"model": "policy", "lambda": lam, "texts": texts, "scores": scores})
    for e in examples[:5]:
        print(f"raypo eval: a scorer failed (the rating is missing): {e}", file=log, flush=True)
    if responses_out:
        _write_responses(responses_out, rows, kept, dims)
    return _finite(out)


def _write_responses(path: str, rows: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]],
                     dims: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            for k in kept:
                f.write(json.dumps({"prompt_id": row["prompt_id"], "model": k["model"], "lambda": k["lambda"],
                                    "response": k["texts"][i], "scores": dict(zip(dims, k["scores"][i]))},
                                   ensure_ascii=False) + "\n")


def _finite(value: Any) -> Any:
    """NaN/inf -> None, so the object is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(v: Optional[float], spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_generation_table(gen: dict[str, Any]) -> str:
    """Per lambda and dimension: the model's mean score, the reference's, the win rate; then lengths."""
    dims, ref = gen["dimensions"], gen["reference"]
    width = max(12, *(len(d) for d in dims))
    lines = [f"generation on {gen['num_prompts']} prompts ({gen['rejected_rows']} rejected rows); "
             f"reference {ref['source']}; win rate: ties count 0.5",
             "lambda".ljust(24) + "dimension".ljust(width + 2) + "model   reference   win rate   (w/t/l)"]
    for r in gen["results"]:
        lam = "-" if r["lambda"] is None else ",".join(f"{w:.2f}" for w in r["lambda"])
        for d in dims:
            lines.append(f"{lam:<24}{d:<{width + 2}}{_fmt(r['mean_score'][d]):>5}   "
                         f"{_fmt(r['reference_mean_score'][d]):>9}   {_fmt(r['win_rate'][d]):>8}   "
                         f"({r['wins'][d]}/{r['ties'][d]}/{r['losses'][d]})")
        lines.append(f"{lam:<24}{'length':<{width + 2}}model {_fmt(r['mean_words'], '.1f')} words / "
                     f"{_fmt(r['mean_tokens'], '.1f')} tokens; reference {_fmt(ref['mean_words'], '.1f')} / "
                     f"{_fmt(ref['mean_tokens'], '.1f')}")
    return "\n".join(lines) + "\n"
