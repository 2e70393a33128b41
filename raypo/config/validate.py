"""Checks of a typed config's values, section by section: impossible values (beta <= 0, a lambda off the
simplex, num_workers < 1, ...), each reported as a message naming the key, the value and the fix.

Checks that need another component's knowledge stay with it and are called by the entry points that need
them: the sweep's search-space syntax (:func:`raypo.tune.space.search_space_problems`, called by ``raypo
tune`` and ``raypo submit``). The loss hyperparameters are checked against the loss registry
(:mod:`raypo.losses`, a lower layer than this one).
"""

from __future__ import annotations

import math
from typing import Optional

from raypo.config.schema import LambdaConfig, LearnedLambdaConfig, LossConfig, RaypoConfig
from raypo.errors import did_you_mean

LAMBDA_SCHEDULES = ("fixed", "uniform", "dirichlet", "normalized_uniform", "gaussian", "onehot", "cycle",
                    "table", "learned")
GAUSSIAN_NEGATIVES = ("clip", "abs", "softmax", "project")
DATA_FORMATS = ("listwise", "ultrafeedback", "ranked", "pairwise", "scored")
SIMPLEX_TOL = 1e-3  # published lambda tables are rounded to 3 decimals (row sums 0.999-1.001)


def _choice(problems: list[str], key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        problems.append(f"{key}={value!r} is not one of {', '.join(options)}: "
                        f"{did_you_mean(value, list(options))}")


def _on_simplex(problems: list[str], key: str, weights: list[float], what: str = "lambda") -> None:
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1.0) > SIMPLEX_TOL:
        problems.append(f"{key}={list(weights)} is not on the simplex: a {what} needs non-negative entries "
                        f"summing to 1 (sum is {sum(weights):.4g}); divide by the sum")


def _positive(problems: list[str], key: str, value: float | int | None, fix: str = "") -> None:
    if value is not None and not value > 0:
        problems.append(f"{key}={value} must be > 0{'; ' + fix if fix else ''}")


def _at_least(problems: list[str], key: str, value: int, low: int) -> None:
    if value < low:
        problems.append(f"{key}={value} must be >= {low}")


def loss_names() -> tuple[str, ...]:
    """The registered losses (:data:`raypo.losses.LOSS_REGISTRY`), the one list of loss names."""
    from raypo.losses.registry import LOSS_REGISTRY  # torch: imported when a config is validated, not before

    return tuple(LOSS_REGISTRY)


def _loss_param_problems(lo: LossConfig) -> list[str]:
    """Hyperparameters the chosen loss does not accept, checked against the loss registry."""
    from raypo.losses.registry import get_loss_spec

    accepted = sorted(k for k in get_loss_spec(lo.name).defaults if k != "beta")
    return [f"unknown key 'loss.params.{key}' for loss {lo.name}: {did_you_mean(key, accepted)}"
            for key in lo.params if key not in accepted]


def _model_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    m = cfg.model
    _choice(p, "model.dtype", m.dtype, ("auto", "float32", "bfloat16", "float16"))
    _choice(p, "model.attention", m.attention, ("auto", "eager", "sdpa", "prefix_sdpa", "cascade", "flex",
                                                "flash_attention_2"))
    if m.lora.enabled:
        _positive(p, "model.lora.r", m.lora.r)
    return p


def _data_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    d = cfg.data
    _choice(p, "data.format", d.format, DATA_FORMATS)
    _choice(p, "data.overlong", d.overlong, ("truncate", "drop"))
    if not 0.0 <= d.eval_fraction < 1.0:
        p.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1); e.g. 0.1 holds out 10% of prompts")
    if not 0.0 <= d.max_reject_fraction <= 1.0:
        p.append(f"data.max_reject_fraction={d.max_reject_fraction} must be in [0, 1]; e.g. 0.01 for 1%")
    _positive(p, "data.max_prompt_length", d.max_prompt_length)
    _positive(p, "data.max_response_length", d.max_response_length)
    _at_least(p, "data.tokenize_concurrency", d.tokenize_concurrency, 1)
    return p


def _loss_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    lo = cfg.loss
    names = loss_names()
    _choice(p, "loss.name", lo.name, names)
    _positive(p, "loss.beta", lo.beta, "beta scales the implicit reward; typical values are 0.01-0.5")
    p += _dispersion_problems(lo)
    if lo.name == "wmpo" and not float(lo.params.get("alpha", 0.0)) > 0:
        p.append(f"loss.params.alpha={lo.params.get('alpha', 0.0)} must be > 0 for wmpo (alpha = 0 is plain "
                 "mpo); set loss.params.alpha, e.g. 0.1, or use loss.name=mpo")
    p += _label_rule_problems(lo)
    if "beta" in lo.params:
        p.append("loss.params.beta: beta has its own key; move it to loss.beta")
    elif "missing_ratings" in lo.params:
        p.append("loss.params.missing_ratings: the missing-rating rule has its own key, shared by every loss "
                 "and metric; move it to loss.missing_ratings")
    elif lo.name in names:
        p += _loss_param_problems(lo)
    return p


def _dispersion_problems(lo: LossConfig) -> list[str]:
    """MallowsPO's ``loss.dispersion_c`` and dispersion options (docs/losses.md "MallowsPO dispersion")."""
    p: list[str] = []
    c = lo.dispersion_c
    if c != "auto" and not (isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                            and c > 0):
        p.append(f"loss.dispersion_c={c!r} must be auto (calibrated so the dataset mean of phi is 1) or a "
                 "number > 0, e.g. 0.29")
    if "dispersion_c" in lo.params:
        p.append("loss.params.dispersion_c: MallowsPO's scale has its own key; move it to loss.dispersion_c "
                 "(auto or a number)")
    if lo.name.startswith("mallows_"):
        from raypo.losses.mallows import MISSING_ENTROPY
        from raypo.losses.mallows_link import LINKS, POLY_RANGE_MODES

        for key, options in (("missing_entropy", MISSING_ENTROPY), ("link", LINKS),
                             ("poly_range_mode", POLY_RANGE_MODES)):
            if key in lo.params:
                _choice(p, f"loss.params.{key}", lo.params[key], options)
        degree = lo.params.get("poly_degree", 5)
        if not (isinstance(degree, int) and not isinstance(degree, bool) and degree >= 1 and degree % 2):
            p.append(f"loss.params.poly_degree={degree!r} must be an odd integer >= 1 (the polynomial link "
                     "is odd around g(0) = 1/2), e.g. 5")
        for key in ("sigmoid_scale", "poly_range"):
            if key in lo.params:
                _positive(p, f"loss.params.{key}", lo.params[key])
    return p


def _mpo_selection_problems(lo: LossConfig) -> list[str]:
    """MPO's ``selection`` / ``k`` (top-k against bottom-k, docs/losses.md "MPO") and the margin."""
    from raypo.losses.labels import MPO_SELECTIONS

    p: list[str] = []
    selection = lo.params.get("selection", "threshold")
    _choice(p, "loss.params.selection", selection, MPO_SELECTIONS)
    k = lo.params.get("k")
    if k is not None:
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            p.append(f"loss.params.k={k!r} must be an integer >= 1 (the best and the worst k responses "
                     "kept), or left out for n // 2")
        elif selection != "top_bottom":
            p.append(f"loss.params.k={k} is only read with loss.params.selection=top_bottom; set that or "
                     "drop k")
    gamma = lo.params.get("gamma")
    if gamma is not None and not (isinstance(gamma, (int, float)) and gamma >= 0):
        p.append(f"loss.params.gamma={gamma!r} must be a number >= 0 (SimPO's margin, e.g. 0.5)")
    return p


def _label_rule_problems(lo: LossConfig) -> list[str]:
    """The label rules of docs/losses.md (missing ratings, score reduction, LiPO labels, Lambda weight)."""
    from raypo.losses.label_rules import LIPO_LABEL_RULES, MISSING_RULES, SCORE_REDUCTIONS
    from raypo.losses.lipo import LAMBDA_WEIGHTINGS

    p: list[str] = []
    _choice(p, "loss.missing_ratings", lo.missing_ratings, MISSING_RULES)
    _choice(p, "loss.score_reduction", lo.score_reduction, SCORE_REDUCTIONS)
    _choice(p, "loss.lipo_labels", lo.lipo_labels, LIPO_LABEL_RULES)
    _positive(p, "loss.lipo_label_temperature", lo.lipo_label_temperature,
              "T divides the score gaps of the bradley_terry rule, e.g. 1.0")
    if lo.name == "lipo_lambda" and "weighting" in lo.params:
        _choice(p, "loss.params.weighting", lo.params["weighting"], LAMBDA_WEIGHTINGS)
    if lo.name in ("mpo", "wmpo"):  # the MPO paper's Table 7 statistics; W-MPO Eq. 6-7 or Appendix D
        from raypo.losses.labels import MPO_THRESHOLDS
        from raypo.losses.mpo import WEIGHTINGS

        if "threshold" in lo.params:
            _choice(p, "loss.params.threshold", lo.params["threshold"], MPO_THRESHOLDS)
        if "weighting" in lo.params:
            _choice(p, "loss.params.weighting", lo.params["weighting"], WEIGHTINGS)
        p += _mpo_selection_problems(lo)
    return p


def _lambdas_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    la, d = cfg.lambdas, cfg.data
    _choice(p, "lambdas.schedule", la.schedule, LAMBDA_SCHEDULES)
    _choice(p, "lambdas.per", la.per, ("prompt", "batch"))
    _choice(p, "lambdas.gaussian_negatives", la.gaussian_negatives, GAUSSIAN_NEGATIVES)
    if la.schedule == "fixed":
        if la.weights is None:
            p.append("lambdas.weights is required when lambdas.schedule=fixed; e.g. [0.25, 0.25, 0.25, 0.25]")
        else:
            _on_simplex(p, "lambdas.weights", la.weights)
    if la.schedule == "dirichlet":
        if not la.alpha or any(not a > 0 for a in la.alpha):
            p.append(f"lambdas.alpha={la.alpha} must be a list of positive concentrations when "
                     "lambdas.schedule=dirichlet; e.g. [1, 1, 1, 1]")
    if la.schedule == "table":
        if not la.table:
            p.append("lambdas.table is required when lambdas.schedule=table: a list of lambda rows")
        else:
            for i, row in enumerate(la.table):
                _on_simplex(p, f"lambdas.table[{i}]", row)
            if la.table_probs is not None and len(la.table_probs) != len(la.table):
                p.append(f"lambdas.table_probs has {len(la.table_probs)} entries but lambdas.table has "
                         f"{len(la.table)} rows; give one probability per row")
    m = len(d.dimensions) if d.dimensions else None
    if la.schedule == "gaussian":
        _gaussian_problems(p, la, m)
    if la.onehot_index is not None and (la.onehot_index < 0 or (m is not None and la.onehot_index >= m)):
        p.append(f"lambdas.onehot_index={la.onehot_index} must be a 0-based dimension index in "
                 f"[0, {m if m is not None else 'm'})")
    if la.learned.temperature is not None:
        p.append(temperature_problem(la.learned.temperature))
    if la.schedule == "learned":
        p += _learned_problems(la.learned)
    if la.weights is not None and d.dimensions and len(la.weights) != len(d.dimensions):
        p.append(f"lambdas.weights has {len(la.weights)} entries but data.dimensions has "
                 f"{len(d.dimensions)} ({', '.join(d.dimensions)}); give one weight per dimension")
    p += _condition_problems(cfg)
    return p


def check_condition_template(template: str) -> Optional[str]:
    """None when ``template`` is usable, else why not (one ``{weights}`` and no other braces)."""
    if not isinstance(template, str) or template.count("{weights}") != 1:
        return f"must contain '{{weights}}' exactly once, got {template!r}"
    rest = template.replace("{weights}", "")
    if "{" in rest or "}" in rest:
        return f"may hold no braces besides '{{weights}}', got {template!r}"
    return None


def check_weight_format(weight_format: str) -> Optional[str]:
    """None when ``weight_format`` is a printf format of one float (``%.2f``, ``%.3g``), else why not."""
    try:
        text = weight_format % 0.25
    except (TypeError, ValueError):
        text = None
    if not text or "%" in text:
        return f"must be a printf format of one number such as '%.2f', got {weight_format!r}"
    return None


def _condition_problems(cfg: RaypoConfig) -> list[str]:
    """``lambdas.condition``: the policy sees lambda (docs/steering.md)."""
    la, p = cfg.lambdas, []
    _choice(p, "lambdas.condition", la.condition, ("none", "prompt"))
    if la.condition != "prompt":
        return p
    for key, problem in (("condition_template", check_condition_template(la.condition_template)),
                         ("condition_weight_format", check_weight_format(la.condition_weight_format))):
        if problem:
            p.append(f"lambdas.{key} {problem}")
    from raypo.losses.registry import LOSS_REGISTRY  # torch: imported when a config is validated

    spec = LOSS_REGISTRY.get(cfg.loss.name)
    if spec is None:
        return p  # the unknown loss is reported on its own
    if not (spec.needs_lambda or cfg.loss.score_reduction == "lambda"):
        p.append(f"lambdas.condition=prompt but loss.name={cfg.loss.name!r} does not weight dimensions by "
                 "lambda, so a model conditioned on lambda could not learn what lambda means; use a loss "
                 "that does (lambda_dpo) or set loss.score_reduction=lambda, or lambdas.condition=none")
    return p


def temperature_problem(temperature: float) -> str:
    """The refusal of the old ``lambdas.learned.temperature`` (softmax(f / temperature)), giving the tau of
    the same distribution: the scheduler now follows the lambda-DPO paper (Appendix D.4), p ∝ exp(tau * f)."""
    tau = f"{1.0 / temperature:g}" if temperature > 0 else "(a temperature must be > 0)"
    return (f"lambdas.learned.temperature={temperature} is no longer accepted: the learned scheduler samples "
            f"p ∝ exp(tau * f) as in the lambda-DPO paper (Appendix D.4), tau multiplying the scores; the "
            f"same distribution is lambdas.learned.tau={tau} (tau = 1/temperature). Replace the key with "
            f"'tau: {tau}' (the paper uses tau: 100)")


def _learned_problems(le: LearnedLambdaConfig) -> list[str]:
    p: list[str] = []
    if not le.results_path and not le.points:
        p.append("lambdas.learned.results_path is required when lambdas.schedule=learned: the CSV of "
                 "(lambda, score) rows written by raypo tune (or give inline lambdas.learned.points)")
    _at_least(p, "lambdas.learned.degree", le.degree, 1)
    if not (math.isfinite(le.tau) and le.tau >= 0):
        p.append(f"lambdas.learned.tau={le.tau} must be a finite number >= 0 (the paper's 100; 0: uniform)")
    _choice(p, "lambdas.learned.candidates", le.candidates, ("dirichlet", "grid"))
    if le.candidates == "grid":
        _at_least(p, "lambdas.learned.grid_resolution", le.grid_resolution, 1)
    else:
        _at_least(p, "lambdas.learned.num_candidates", le.num_candidates, 1)
    alpha = le.dirichlet_alpha
    if alpha is not None and (not alpha or any(not a > 0 for a in alpha)):
        p.append(f"lambdas.learned.dirichlet_alpha={le.dirichlet_alpha} must be one or m positive "
                 "concentrations; e.g. [1] (uniform on the simplex, the paper's example)")
    return p


def _gaussian_problems(p: list[str], la: LambdaConfig, m: Optional[int]) -> None:
    if la.gaussian_std is not None:
        _positive(p, "lambdas.gaussian_std", la.gaussian_std)
    if la.gaussian_mean is not None and m is not None and len(la.gaussian_mean) != m:
        p.append(f"lambdas.gaussian_mean has {len(la.gaussian_mean)} entries but data.dimensions has {m}; "
                 "give one mean per dimension")


def _optimizer_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    o = cfg.optimizer
    _positive(p, "optimizer.lr", o.lr, "e.g. 5e-7 for 8B full fine-tuning")
    if o.weight_decay < 0:
        p.append(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optimizer.betas={list(o.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    _choice(p, "optimizer.lr_scheduler", o.lr_scheduler, ("cosine", "linear", "constant"))
    if o.warmup_steps < 0:
        p.append(f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        p.append(f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.grad_clip < 0:
        p.append(f"optimizer.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    return p


def _deepspeed_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        p.append(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} must be 0, 1, 2 or 3")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        p.append("deepspeed.offload_params=true needs deepspeed.zero_stage=3")
    return p


def _scaling_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    _at_least(p, "scaling.num_workers", cfg.scaling.num_workers, 1)
    _choice(p, "scaling.placement_strategy", cfg.scaling.placement_strategy,
            ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    for res, amount in cfg.scaling.resources_per_worker.items():
        if not isinstance(amount, (int, float)) or amount < 0:
            p.append(f"scaling.resources_per_worker.{res}={amount!r} must be a non-negative number")
    return p


def _train_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    t = cfg.train
    _at_least(p, "train.micro_batch_size", t.micro_batch_size, 1)
    _at_least(p, "train.grad_accum_steps", t.grad_accum_steps, 1)
    _at_least(p, "train.max_steps", t.max_steps, 1)
    _at_least(p, "train.epochs", t.epochs, 1)
    _at_least(p, "train.response_chunk_size", t.response_chunk_size, 0)
    if t.token_budget < 0:
        p.append(f"train.token_budget={t.token_budget} must be >= 0: 0 keeps train.micro_batch_size groups "
                 "per micro-batch; a positive value packs whole groups into micro-batches of at most that "
                 "many tokens, e.g. train.token_budget=16384")
    _at_least(p, "train.eval_every", t.eval_every, 0)
    _choice(p, "train.reference", t.reference, ("online", "precomputed"))
    _choice(p, "train.reference_batching", t.reference_batching, ("per_group", "batched"))
    if t.reference_cache and t.reference != "precomputed":
        p.append(f"train.reference_cache={t.reference_cache!r} is only used with "
                 "train.reference=precomputed; set train.reference=precomputed or drop train.reference_cache")
    return p


def _checkpoint_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    c = cfg.checkpoint
    _at_least(p, "checkpoint.every_steps", c.every_steps, 0)
    _at_least(p, "checkpoint.keep_last", c.keep_last, 1)
    _at_least(p, "checkpoint.max_failures", c.max_failures, -1)
    _at_least(p, "checkpoint.max_start_timeouts", c.max_start_timeouts, -1)
    _choice(p, "checkpoint.on_corrupt", c.on_corrupt, ("fallback", "fail"))
    return p


def _logging_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    _at_least(p, "logging.log_every", cfg.logging.log_every, 1)
    if not isinstance(cfg.logging.report_interval_s, (int, float)) or cfg.logging.report_interval_s < 0:
        p.append(f"logging.report_interval_s={cfg.logging.report_interval_s!r} must be a number of seconds "
                 ">= 0 (0: report to Ray only at checkpoints, evaluations and Tune's metric), e.g. 5")
    _choice(p, "logging.level", cfg.logging.level, ("DEBUG", "INFO", "WARNING", "ERROR"))
    for backend in cfg.logging.backends:  # raypo.train.trackers.BACKENDS
        _choice(p, "logging.backends", backend, ("tensorboard", "mlflow", "wandb"))
    return p


def _tune_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    tu = cfg.tune
    _at_least(p, "tune.num_samples", tu.num_samples, 1)
    _choice(p, "tune.mode", tu.mode, ("max", "min"))
    _choice(p, "tune.scheduler", tu.scheduler, ("asha", "fifo"))
    _choice(p, "tune.search_alg", tu.search_alg, ("random", "grid", "optuna", "hyperopt"))
    _at_least(p, "tune.max_concurrent_trials", tu.max_concurrent_trials, 0)
    _at_least(p, "tune.grace_period", tu.grace_period, 1)
    _at_least(p, "tune.reduction_factor", tu.reduction_factor, 2)
    if not tu.metric.startswith(("eval/", "train/")):
        p.append(f"tune.metric={tu.metric!r} is not a reported metric: use an eval/ or train/ metric, e.g. "
                 "eval/pairwise_accuracy (mode max) or eval/loss (mode min)")
    return p


def _plan_problems(cfg: RaypoConfig) -> list[str]:
    p: list[str] = []
    pl = cfg.plan
    _at_least(p, "plan.responses_per_prompt", pl.responses_per_prompt, 2)
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                "gpus_per_node"):
        if getattr(pl, key) is not None:
            _at_least(p, f"plan.{key}", getattr(pl, key), 1)
    _positive(p, "plan.gpu_memory_gib", pl.gpu_memory_gib, "e.g. 80 for an A100-80GB")
    _positive(p, "plan.cpu_memory_gib", pl.cpu_memory_gib, "host RAM per node, e.g. 1152 for p4de.24xlarge")
    return p


#: One check per config section, in the order the sections appear in the YAML.
SECTION_CHECKS = (_model_problems, _data_problems, _loss_problems, _lambdas_problems, _optimizer_problems,
                  _deepspeed_problems, _scaling_problems, _train_problems, _checkpoint_problems,
                  _logging_problems, _tune_problems, _plan_problems)


def validate(cfg: RaypoConfig) -> list[str]:
    """Impossible values, section by section, each as a message naming the key, the value and the fix."""
    return [problem for check in SECTION_CHECKS for problem in check(cfg)]
