"""The typed run configuration: one dataclass per YAML section (``model``, ``data``, ``loss``, ``lambdas``,
``optimizer``, ``deepspeed``, ``scaling``, ``train``, ``checkpoint``, ``logging``, ``tune``, ``ray``,
``plan``), each field with its default and meaning. Loading lives in :mod:`raypo.config.load`, the checks of
values in :mod:`raypo.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


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
    attention: str = "auto"  # auto | eager | sdpa | prefix_sdpa | cascade | flex | flash_attention_2
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
    # Missing ratings, one rule for every loss and metric (docs/losses.md "Missing ratings"): drop (a missing
    # rating leaves that response out of that dimension) | impute (missing = 1.0, official lambda-DPO code)
    missing_ratings: str = "drop"
    # Per-dimension ratings -> one score per response for the scalar-score losses (LiPO, MPO, NCA, best/worst
    # pairwise): mean of the available ratings | lambda (weighted by the prompt's lambda draw)
    score_reduction: str = "mean"
    # LiPO psi from the scores (docs/losses.md "LiPO labels"): win_rate (the paper's indicator rule) | raw |
    # minmax | ranks | bradley_terry | matrix (the data's win_probs column)
    lipo_labels: str = "win_rate"
    lipo_label_temperature: float = 1.0  # bradley_terry: Psi_ki = sigmoid((S_k - S_i) / T)
    # MallowsPO: c in phi(x) = -c log Hbar(x). auto: calibrated from the reference entropies so that the
    # dataset mean of phi is 1 (the paper's rule; raypo/train/dispersion.py); a number overrides it
    dispersion_c: Union[float, int, str] = "auto"


@dataclass
class LearnedLambdaConfig:
    """The learned (polynomial) lambda scheduler of the lambda-DPO paper (Sun et al., arXiv 2506.19780,
    Appendix D; docs/loss_reference.md §3.5): fit degree-p monomials of lambda to (lambda, score) probe
    results, take K candidate lambdas, sample one with probability softmax(tau * f(candidate))."""

    results_path: Optional[str] = None  # CSV of (lambda, score) rows, e.g. a raypo tune results table
    score_column: str = "eval/pairwise_accuracy"
    lambda_columns: Optional[list[str]] = None  # default lambda_0 .. lambda_{m-1}
    degree: int = 2  # p
    # tau multiplies the predicted scores: p_j ∝ exp(tau * f_j) (an inverse temperature; the paper's 100, with
    # accuracy-scale scores candidates 0.01 apart differ in probability by a factor of about e)
    tau: float = 100.0
    candidates: str = "dirichlet"  # dirichlet: num_candidates draws of Dirichlet(dirichlet_alpha) | grid
    num_candidates: int = 10  # K (dirichlet)
    dirichlet_alpha: Optional[list[float]] = None  # one value or one per dimension; default 1 = uniform
    grid_resolution: int = 4  # grid: every lambda with coordinates in multiples of 1/grid_resolution
    seed: int = 0  # seed of the Dirichlet candidates (the same on every rank; draws among them: lambdas.seed)
    points: Optional[list[Any]] = None  # inline probe results [[lambda, score], ...] instead of results_path
    # Refused (softmax(f / temperature), the inverse of tau); kept so the error can give the tau to write.
    temperature: Optional[float] = None


@dataclass
class LambdaConfig:
    """Where each prompt's lambda (a point of the simplex, one weight per preference dimension) comes from;
    the one lambda-schedule config, read by :func:`raypo.train.lambda_schedules.build_lambda_schedule`.
    Only the fields of the chosen ``schedule`` are read."""

    # fixed | uniform | dirichlet | normalized_uniform | gaussian | onehot | cycle | table | learned
    schedule: str = "uniform"
    weights: Optional[list[float]] = None  # fixed (default 1/m each)
    alpha: Optional[list[float]] = None  # dirichlet concentration, one per dimension (default 1 = uniform)
    # clip | abs | softmax | project (Euclidean projection): how a Gaussian draw is mapped to the simplex
    gaussian_negatives: str = "clip"
    gaussian_mean: Optional[list[float]] = None  # default 1/m each ([0, ..., 0] + std 1: standard normal)
    gaussian_std: Optional[float] = None  # default 1/m
    onehot_index: Optional[int] = None  # onehot: a fixed dimension k (0-based); None = random k per draw
    table: Optional[list[list[float]]] = None  # rows of lambdas (default: the official table)
    table_probs: Optional[list[float]] = None
    per: str = "prompt"  # prompt: one draw per prompt | batch: one draw shared by the batch (official code)
    seed: int = 0
    learned: LearnedLambdaConfig = field(default_factory=LearnedLambdaConfig)
    # Steering (docs/steering.md): none | prompt (the policy sees each prompt's lambda, written into the
    # conversation as a system message by the template below; the reference scores the plain prompt)
    condition: str = "none"
    condition_template: str = "Preference weights: {weights}."  # {weights}: "helpfulness 0.40, ..."
    condition_weight_format: str = "%.2f"  # printf format of each weight


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
    # precomputed only: how the reference stage and the policy's forwards hold the prompt groups.
    # per_group: one group per forward in both, so a group's values do not depend on the other groups of the
    # batch and step-0 rewards are exactly 0; costs B forwards per micro-batch of B groups (each regathers the
    # ZeRO-3 parameters). batched: one forward per stage batch / per micro-batch, as online; step-0 rewards
    # are 0 only to float rounding (fp32 ~1e-6; docs/performance.md)
    reference_batching: str = "per_group"  # per_group | batched
    response_chunk_size: int = 0  # 0: all N responses at once; k: response chunks of k
    # 0: every forward holds one micro-batch (micro_batch_size groups), as read. T > 0: each step's groups
    # (still read micro_batch_size * grad_accum_steps per rank) are packed across ranks into bins of at most
    # T padded tokens (rows x longest row), balanced so every rank runs the same number of bins
    # (raypo.train.token_budget); a group larger than T gets a bin of its own. Same gradient as 0; e.g.
    # 16384 for an 8B model on A100-80GB
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
    # worker-group starts that may time out (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by
    # default, for room for every worker) before the run stops with an error; -1: wait as long as it takes
    # (an autoscaler adding nodes, a lost node coming back). Ray Train's controller_failure_limit
    max_start_timeouts: int = -1
    export_path: Optional[str] = None  # write a Hugging Face export here at the end
    # a damaged latest checkpoint (docs/training.md, "Damaged checkpoints"): fallback = set it aside and
    # resume from the newest good one; fail = refuse to start, naming the bad file
    on_corrupt: str = "fallback"


@dataclass
class LoggingConfig:
    """Where the metrics go besides ``<run dir>/metrics.jsonl`` (:mod:`raypo.train.trackers`)."""

    log_every: int = 1
    # Ray Train gets a report at checkpoints, evaluations, Tune's metric and at most this often besides
    # (0: never by time); metrics.jsonl and the trackers get every logged step from rank 0 regardless.
    report_interval_s: float = 5.0
    tensorboard: bool = True  # false drops tensorboard from ``backends``
    level: str = "INFO"
    backends: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard | mlflow | wandb
    group: Optional[str] = None  # tracker group of this run (a sweep sets its name for every trial)
    mlflow_tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db
    mlflow_experiment: Optional[str] = None  # None: "raypo"
    wandb_project: Optional[str] = None  # None: "raypo"
    wandb_entity: Optional[str] = None  # None: the W&B default entity of the API key


@dataclass
class TuneConfig:
    """``raypo tune``: a Ray Tune sweep whose trials are training runs (see
    :mod:`raypo.tune.sweep`, docs/tune.md).

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
    """Inputs of ``raypo plan`` (per-GPU memory estimate, see :mod:`raypo.launch.plan`); training ignores
    them.

    ``model`` names a known architecture (``raypo.launch.catalog.KNOWN_MODELS``: llama-3-8b, qwen2.5-32b,
    ...); None
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


