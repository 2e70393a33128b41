"""The run configuration: typed sections (:mod:`~raypo.config.schema`), YAML loading with composition and
overrides (:mod:`~raypo.config.load`) and the checks of values (:mod:`~raypo.config.validate`).

A raypo config is plain YAML whose top-level sections mirror the dataclasses of the schema; every problem
found while loading is reported in one :class:`~raypo.errors.ConfigError` naming the key, the value and the
fix (docs: README "Configuration").
"""

from raypo.config.load import config_from_dict, load_config, to_dict, to_yaml
from raypo.config.schema import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LambdaConfig,
    LearnedLambdaConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    PlanConfig,
    RayConfig,
    RaypoConfig,
    S3Config,
    ScalingConfig,
    TrainConfig,
    TuneConfig,
)
from raypo.config.validate import DATA_FORMATS, LAMBDA_SCHEDULES, loss_names, validate
from raypo.errors import ConfigError, RunError

__all__ = [
    "DATA_FORMATS", "LAMBDA_SCHEDULES", "CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedConfig",
    "LambdaConfig", "LearnedLambdaConfig", "LoggingConfig", "LoraConfig", "LossConfig", "ModelConfig",
    "OptimizerConfig", "PlanConfig", "RayConfig", "RaypoConfig", "RunError", "S3Config", "ScalingConfig",
    "TrainConfig", "TuneConfig", "config_from_dict", "load_config", "loss_names", "to_dict", "to_yaml",
    "validate",
]
