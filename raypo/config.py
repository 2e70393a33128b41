"""Typed run configuration: dataclass schemas, YAML loading, composition, overrides and validation.

A raypo config is plain YAML whose top-level sections mirror the dataclasses below (``model``, ``data``,
``loss``, ``lambdas``, ``optimizer``, ``deepspeed``, ``scaling``, ``train``, ``checkpoint``, ``logging``,
``tune``, ``ray``, ``plan``).

Composition
    A config may start with a ``defaults:`` list of other YAML files. They are merged in order, then the
    file's own keys on top, then ``key=value`` overrides from the command line (OmegaConf dotlist syntax,
    e.g. ``loss.beta=0.1 scaling.num_workers=4``). Paths in ``defaults`` are relative to the file that
    names them; a name without a ``.yaml`` suffix is looked up as ``<name>.yaml`` there too, so
    ``defaults: [model/tiny, loss/lipo_lambda]`` works from ``configs/``. Included files may have their
    own ``defaults``.

Validation
    Everything is checked before any cluster work starts: unknown keys (with a "did you mean"), wrong
    types, and impossible values (``beta <= 0``, a lambda not on the simplex, ``num_workers < 1``, ...).
    Every problem is reported in one :class:`ConfigError` that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# ----------------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    """Policy and reference model.

    ``path`` is a local directory, an ``s3://`` URI (copied to local disk on each node), a Hugging Face
    model id, or ``tiny://llama`` for a tiny random Llama built locally (tests and the quickstart).
    """

    path: str = "tiny://llama"
    reference_path: Optional[str] = None  # None: the reference is a frozen copy of ``path``
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attention: str = "auto"  # auto | eager | sdpa | prefix_sdpa | flex | flash_attention_2
    prefix_sharing: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class S3Config:
    """S3 settings. Credentials are read from the environment (AWS_ACCESS_KEY_ID, ...), never from here."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None


@dataclass
class DataConfig:
    train_path: str = "synthetic://default"
    eval_path: Optional[str] = None  # None: split ``eval_fraction`` off the train data by prompt_id hash
    format: str = "listwise"  # listwise | ultrafeedback | ranked | pairwise | scored
    dimensions: list[str] = field(default_factory=list)  # empty: taken from the dataset's schema metadata
    eval_fraction: float = 0.1
    split_seed: int = 0
    shuffle_seed: int = 0
    max_prompt_length: int = 512
    max_response_length: int = 512
    overlong: str = "truncate"  # truncate | drop
    max_reject_fraction: float = 0.01
    quarantine_path: Optional[str] = None
    merge_pairs: bool = True  # pairwise: merge a prompt's pairs into one ranked list when consistent
    keep_system_prompt: bool = False  # ultrafeedback: keep completions' custom_system_prompt in metadata
    tokenize_concurrency: int = 1  # tokenizer actors (Ray Data map_batches concurrency)
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class LossConfig:
    """Which loss of :mod:`raypo.losses` and its hyperparameters.

    ``beta`` is the implicit-reward scale (None: the loss's own default). Other hyperparameters of the
    loss (alpha, gamma, label_smoothing, temperature, reduction, scale, ...) go in ``params``.
    """

    name: str = "lambda_dpo"
    beta: Optional[float] = None
    params: dict[str, Any] = field(default_factory=dict)
    dispersion_c: float = 0.29  # MallowsPO: phi(x) = -c log Hbar(x); calibrate so the dataset mean is 1


@dataclass
class LearnedLambdaConfig:
    results_path: Optional[str] = None  # CSV of (lambda, score) rows, e.g. a raypo tune results table
    score_column: str = "eval/pairwise_accuracy"
    degree: int = 2
    num_candidates: int = 10
    temperature: float = 0.1


@dataclass
class LambdaConfig:
    """Lambda schedule for multi-dimension losses (lambda_dpo); see :mod:`raypo.lambdas`."""

    # fixed | uniform | dirichlet | normalized_uniform | gaussian | onehot | cycle | table | learned
    schedule: str = "uniform"
    weights: Optional[list[float]] = None  # fixed
    alpha: Optional[list[float]] = None  # dirichlet concentration (one per dimension)
    gaussian_negatives: str = "clip"  # clip | abs | softmax
    table: Optional[list[list[float]]] = None  # rows of lambdas
    table_probs: Optional[list[float]] = None
    per: str = "prompt"  # prompt | batch
    seed: int = 0
    learned: LearnedLambdaConfig = field(default_factory=LearnedLambdaConfig)


@dataclass
class OptimizerConfig:
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    placement_strategy: str = "PACK"


@dataclass
class TrainConfig:
    """The per-worker loop. Batch sizes count prompts (whole listwise groups), not responses."""

    micro_batch_size: int = 2  # prompts per rank per forward/backward
    grad_accum_steps: int = 1
    max_steps: int = 100
    epochs: int = 1
    seed: int = 0
    reference: str = "online"  # online | precomputed
    # precomputed only: cache directory (local or s3://) of reference log-probs keyed by the reference model's
    # files, the tokenised rows and the stage settings (raypo.train.reference_cache); None: no cache
    reference_cache: Optional[str] = None
    response_chunk_size: int = 0  # 0: all N responses at once; k: listwise micro-batching in chunks of k
    # 0: every micro-batch holds micro_batch_size groups, as read. T > 0: each step's groups (still read
    # micro_batch_size * grad_accum_steps per rank) are packed across ranks into micro-batches of at most T
    # padded tokens (rows x longest row), balanced so every rank runs the same number (raypo.balance); a group
    # larger than T gets a micro-batch of its own. Same gradient as 0; e.g. 16384 for an 8B model on A100-80GB
    token_budget: int = 0
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 0  # 0: the whole eval split


@dataclass
class CheckpointConfig:
    storage_path: str = "~/raypo_runs"
    run_name: Optional[str] = None  # None: derived from the config file name and loss
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 2
    max_failures: int = 0
    export_path: Optional[str] = None  # write a Hugging Face export here at the end


@dataclass
class LoggingConfig:
    log_every: int = 1
    tensorboard: bool = True
    level: str = "INFO"


@dataclass
class TuneConfig:
    """``raypo tune``: a Ray Tune sweep whose trials are training runs (see :mod:`raypo.tune`, docs/tune.md).

    ``search_space`` maps dotted config keys to samplers, e.g. ``loss.beta: {loguniform: [0.01, 0.5]}``.
    ASHA compares trials at the optimizer step (``grace_period`` and the rungs count steps).
    """

    search_space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 4
    metric: str = "eval/pairwise_accuracy"
    mode: str = "max"
    scheduler: str = "asha"  # asha | fifo
    search_alg: str = "random"  # random | grid | optuna | hyperopt
    max_concurrent_trials: int = 0  # 0: derived from cluster resources
    grace_period: int = 1  # ASHA: optimizer steps before a trial can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor of the trials at each rung
    share_reference: bool = True  # precompute reference log-probs once for all trials (same model/data)
    storage_path: Optional[str] = None  # None: checkpoint.storage_path


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start (or reuse) a local cluster
    num_cpus: Optional[int] = None


@dataclass
class PlanConfig:
    """Inputs of ``raypo plan`` (per-GPU memory estimate, see :mod:`raypo.plan`); training ignores them.

    ``model`` names a known architecture (``raypo.plan.KNOWN_MODELS``: llama-3-8b, qwen2.5-32b, ...); None
    reads ``model.path``/config.json when it is a local directory. The architecture numbers override it.
    ``node_type`` names a known instance (p4de.24xlarge, a2-ultragpu-8g, ...); the hardware numbers
    override it. GPUs = ``scaling.num_workers``; nodes = ceil(GPUs / gpus_per_node).
    """

    model: Optional[str] = None
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    vocab_size: Optional[int] = None
    node_type: Optional[str] = None
    gpus_per_node: Optional[int] = None
    gpu_memory_gib: Optional[float] = None
    cpu_memory_gib: Optional[float] = None  # host RAM per node
    responses_per_prompt: int = 4  # N, the list size activations are sized for


@dataclass
class RaypoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lambdas: LambdaConfig = field(default_factory=LambdaConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


class RunError(RuntimeError):
    """A problem with the data or the run (not the config's syntax) found before any training starts; the
    message says what is wrong and what to do. ``raypo`` prints it and exits with status 1."""


class ConfigError(ValueError):
    """One or more configuration problems; each names the key, the value and the fix."""

    def __init__(self, problems: list[str], source: Optional[str] = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid raypo config{where}:\n{lines}")


# Free-form mappings: their keys belong to another component (the loss registry, the DeepSpeed config,
# Ray resources, a search space) and are checked there.
_FREE_FORM = {"loss.params", "deepspeed.overrides", "scaling.resources_per_worker", "tune.search_space"}


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known keys: " + ", ".join(sorted(options))


def _unknown_keys(raw: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys in ``raw`` that the dataclass ``schema`` does not define, recursively."""
    if not isinstance(raw, dict):
        return []
    problems = []
    hints = get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            problems.append(f"unknown key '{dotted}': {_did_you_mean(str(key), names)}")
            continue
        sub = _dataclass_of(hints[key])
        if sub is not None and dotted not in _FREE_FORM:
            problems += _unknown_keys(value, sub, dotted + ".")
    return problems


def _dataclass_of(tp: Any) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) is Union:
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


# ----------------------------------------------------------------------------------------------------
# Loading and composition
# ----------------------------------------------------------------------------------------------------


def _resolve_include(name: str, base_dir: Path) -> Path:
    candidates = [base_dir / name]
    if not name.endswith((".yaml", ".yml")):
        candidates.append(base_dir / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError([f"defaults entry '{name}' not found (looked for {', '.join(map(str, candidates))}); "
                       "fix the path, relative to the file that lists it"])


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file and the files its ``defaults:`` list names, merged in order."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError([f"defaults form a cycle: {chain}; remove one of the includes"])
    if not path.is_file():
        raise ConfigError([f"config file '{path}' does not exist; give the path to a YAML file"])
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and OmegaConf parse errors differ across versions
        raise ConfigError([f"cannot parse YAML: {exc}"], source=str(path)) from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(["the top level must be a mapping of sections (model:, data:, loss:, ...)"],
                          source=str(path))
    raw = OmegaConf.to_container(node, resolve=False)
    includes = raw.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise ConfigError([f"'defaults' must be a list of YAML paths, got {includes!r}"], source=str(path))
    merged: dict[str, Any] = {}
    for name in includes:
        merged = _deep_merge(merged, _read_yaml(_resolve_include(str(name), path.parent), (*seen, path)))
    return _deep_merge(merged, raw)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    problems = [f"override '{o}' is not key=value; write e.g. loss.beta=0.1"
                for o in overrides if "=" not in o]
    if problems:
        raise ConfigError(problems, source="command line")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError([f"cannot parse overrides {overrides}: {exc}"], source="command line") from exc


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RaypoConfig:
    """Load ``path`` (with its ``defaults``), apply ``key=value`` overrides, and validate.

    Returns a typed :class:`RaypoConfig`; raises :class:`ConfigError` listing every problem found.
    """
    raw = _read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else None
    if overrides:
        raw = _deep_merge(raw, _parse_overrides(overrides))
    return config_from_dict(raw, source=source)


def config_from_dict(raw: dict[str, Any], source: Optional[str] = None) -> RaypoConfig:
    """Build and validate a :class:`RaypoConfig` from a plain (possibly partial) mapping."""
    problems = _unknown_keys(raw, RaypoConfig)
    if problems:
        raise ConfigError(problems, source=source)
    schema = OmegaConf.structured(RaypoConfig)
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as exc:
        raise ConfigError([_type_error_message(exc)], source=source) from exc
    cfg: RaypoConfig = OmegaConf.to_object(merged)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _type_error_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    value = getattr(exc, "value", None)
    detail = str(exc).splitlines()[0]
    return (f"'{key}' has the wrong type: got {value!r} ({type(value).__name__}), "
            f"expected {_expected_type(key)} ({detail})")


def _expected_type(dotted: str) -> str:
    """The schema's type annotation for a dotted key, for error messages."""
    schema: Any = RaypoConfig
    hint: Any = None
    for part in re.sub(r"\[\d+\]", "", dotted).split("."):
        if not dataclasses.is_dataclass(schema):
            break
        hint = get_type_hints(schema).get(part)
        schema = _dataclass_of(hint) if hint is not None else None
    if hint is None:
        return "a value of the schema's type"
    if get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def to_dict(cfg: RaypoConfig) -> dict[str, Any]:
    """The config as plain Python containers (for Ray train_loop_config, YAML dumps, Tune)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RaypoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


# ----------------------------------------------------------------------------------------------------
# Semantic validation
# ----------------------------------------------------------------------------------------------------

LOSS_NAMES = (
    "dpo", "ipo", "slic", "simpo", "lipo_pair_logistic", "lipo_pair_hinge", "lipo_list_mle", "lipo_softmax",
    "lipo_point_mse", "lipo_point_sigmoid", "lipo_lambda", "lambda_dpo", "mallows_theta", "mallows_phi",
    "mallows_ipo", "mpo", "wmpo", "infonca", "nca", "ultrafb_best_worst_dpo",
)
LAMBDA_SCHEDULES = ("fixed", "uniform", "dirichlet", "normalized_uniform", "gaussian", "onehot", "cycle",
                    "table", "learned")
DATA_FORMATS = ("listwise", "ultrafeedback", "ranked", "pairwise", "scored")
SIMPLEX_TOL = 1e-3  # published lambda tables are rounded to 3 decimals (row sums 0.999-1.001)


def _choice(problems: list[str], key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        problems.append(f"{key}={value!r} is not one of {', '.join(options)}: "
                        f"{_did_you_mean(value, list(options))}")


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


def _loss_param_problems(lo: LossConfig) -> list[str]:
    """Hyperparameters the chosen loss does not accept, checked against the loss registry."""
    from raypo.losses.registry import get_loss_spec

    accepted = sorted(k for k in get_loss_spec(lo.name).defaults if k != "beta")
    return [f"unknown key 'loss.params.{key}' for loss {lo.name}: {_did_you_mean(key, accepted)}"
            for key in lo.params if key not in accepted]


def validate(cfg: RaypoConfig) -> list[str]:
    """Impossible values, each as a message naming the key, the value and the fix."""
    p: list[str] = []
    m, d, lo, la, o = cfg.model, cfg.data, cfg.loss, cfg.lambdas, cfg.optimizer
    _choice(p, "model.dtype", m.dtype, ("auto", "float32", "bfloat16", "float16"))
    _choice(p, "model.attention", m.attention, ("auto", "eager", "sdpa", "prefix_sdpa", "flex",
                                                "flash_attention_2"))
    if m.lora.enabled:
        _positive(p, "model.lora.r", m.lora.r)

    _choice(p, "data.format", d.format, DATA_FORMATS)
    _choice(p, "data.overlong", d.overlong, ("truncate", "drop"))
    if not 0.0 <= d.eval_fraction < 1.0:
        p.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1); e.g. 0.1 holds out 10% of prompts")
    if not 0.0 <= d.max_reject_fraction <= 1.0:
        p.append(f"data.max_reject_fraction={d.max_reject_fraction} must be in [0, 1]; e.g. 0.01 for 1%")
    _positive(p, "data.max_prompt_length", d.max_prompt_length)
    _positive(p, "data.max_response_length", d.max_response_length)
    _at_least(p, "data.tokenize_concurrency", d.tokenize_concurrency, 1)

    _choice(p, "loss.name", lo.name, LOSS_NAMES)
    _positive(p, "loss.beta", lo.beta, "beta scales the implicit reward; typical values are 0.01-0.5")
    _positive(p, "loss.dispersion_c", lo.dispersion_c)
    if lo.name == "wmpo" and not float(lo.params.get("alpha", 0.0)) > 0:
        p.append(f"loss.params.alpha={lo.params.get('alpha', 0.0)} must be > 0 for wmpo (alpha = 0 is plain "
                 "mpo); set loss.params.alpha, e.g. 0.1, or use loss.name=mpo")
    if "beta" in lo.params:
        p.append("loss.params.beta: beta has its own key; move it to loss.beta")
    elif lo.name in LOSS_NAMES:
        p += _loss_param_problems(lo)

    _choice(p, "lambdas.schedule", la.schedule, LAMBDA_SCHEDULES)
    _choice(p, "lambdas.per", la.per, ("prompt", "batch"))
    _choice(p, "lambdas.gaussian_negatives", la.gaussian_negatives, ("clip", "abs", "softmax"))
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
    if la.schedule == "learned":
        if not la.learned.results_path:
            p.append("lambdas.learned.results_path is required when lambdas.schedule=learned: the CSV of "
                     "(lambda, score) rows written by raypo tune")
        _at_least(p, "lambdas.learned.degree", la.learned.degree, 1)
        _at_least(p, "lambdas.learned.num_candidates", la.learned.num_candidates, 1)
        _positive(p, "lambdas.learned.temperature", la.learned.temperature)
    if la.weights is not None and d.dimensions and len(la.weights) != len(d.dimensions):
        p.append(f"lambdas.weights has {len(la.weights)} entries but data.dimensions has "
                 f"{len(d.dimensions)} ({', '.join(d.dimensions)}); give one weight per dimension")

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

    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        p.append(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} must be 0, 1, 2 or 3")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        p.append("deepspeed.offload_params=true needs deepspeed.zero_stage=3")

    _at_least(p, "scaling.num_workers", cfg.scaling.num_workers, 1)
    _choice(p, "scaling.placement_strategy", cfg.scaling.placement_strategy,
            ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    for res, amount in cfg.scaling.resources_per_worker.items():
        if not isinstance(amount, (int, float)) or amount < 0:
            p.append(f"scaling.resources_per_worker.{res}={amount!r} must be a non-negative number")

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
    if t.reference_cache and t.reference != "precomputed":
        p.append(f"train.reference_cache={t.reference_cache!r} is only used with "
                 "train.reference=precomputed; set train.reference=precomputed or drop train.reference_cache")

    c = cfg.checkpoint
    _at_least(p, "checkpoint.every_steps", c.every_steps, 0)
    _at_least(p, "checkpoint.keep_last", c.keep_last, 1)
    _at_least(p, "checkpoint.max_failures", c.max_failures, -1)

    _at_least(p, "logging.log_every", cfg.logging.log_every, 1)
    _choice(p, "logging.level", cfg.logging.level, ("DEBUG", "INFO", "WARNING", "ERROR"))

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
    if tu.search_space:
        from raypo.tune import search_space_problems  # the sampler syntax lives with the sweep code

        p += search_space_problems(cfg)

    pl = cfg.plan
    _at_least(p, "plan.responses_per_prompt", pl.responses_per_prompt, 2)
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                "gpus_per_node"):
        if getattr(pl, key) is not None:
            _at_least(p, f"plan.{key}", getattr(pl, key), 1)
    _positive(p, "plan.gpu_memory_gib", pl.gpu_memory_gib, "e.g. 80 for an A100-80GB")
    _positive(p, "plan.cpu_memory_gib", pl.cpu_memory_gib, "host RAM per node, e.g. 1152 for p4de.24xlarge")
    return p
