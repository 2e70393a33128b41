"""What ``raypo plan`` knows of models and machines: published model shapes, cloud GPU node types, and
where a config's model shape and cluster come from (``plan.*``, a ``config.json``, a ``tiny://`` URI).

Torch-free (``raypo plan`` runs on a laptop): shapes are :class:`raypo.model.shape.ModelShape`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raypo.config import RaypoConfig
from raypo.errors import ConfigError, did_you_mean
from raypo.model.shape import ModelShape


def _shape(name, h, layers, heads, kv, inter, vocab, tied=False, bias=False) -> ModelShape:
    return ModelShape(hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                      intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied,
                      attention_bias=bias, name=name)


# Numbers from each model's config.json on the Hugging Face Hub.
KNOWN_MODELS: dict[str, ModelShape] = {a.name: a for a in (
    _shape("llama-3-8b", 4096, 32, 32, 8, 14336, 128256),  # Llama-3 / 3.1 8B (and -Instruct)
    _shape("llama-3-70b", 8192, 80, 64, 8, 28672, 128256),
    _shape("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, tied=True),
    _shape("llama-3.2-3b", 3072, 28, 24, 8, 8192, 128256, tied=True),
    _shape("mistral-7b", 4096, 32, 32, 8, 14336, 32768),  # v0.3
    _shape("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, bias=True),
    _shape("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, bias=True),
    _shape("qwen2.5-32b", 5120, 64, 40, 8, 27648, 152064, bias=True),
    _shape("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, bias=True),
    _shape("smollm2-135m", 576, 30, 9, 3, 1536, 49152, tied=True),
)}
_MODEL_ALIASES = {"llama-3.1-8b": "llama-3-8b", "llama-3.1-70b": "llama-3-70b",
                  "llama-3.3-70b": "llama-3-70b"}


@dataclass(frozen=True)
class NodeType:
    name: str
    gpu: str
    gpus_per_node: int
    gpu_memory_gib: float
    cpu_memory_gib: float  # host RAM


KNOWN_NODE_TYPES: dict[str, NodeType] = {n.name: n for n in (
    NodeType("p4de.24xlarge", "A100-80GB", 8, 80.0, 1152.0),  # AWS; p4d.24xlarge is the 40 GB part
    NodeType("p4d.24xlarge", "A100-40GB", 8, 40.0, 1152.0),
    NodeType("p5.48xlarge", "H100-80GB", 8, 79.6, 2048.0),
    NodeType("a2-ultragpu-8g", "A100-80GB", 8, 80.0, 1360.0),  # GCP; a2-highgpu-8g is the 40 GB part
    NodeType("a2-highgpu-8g", "A100-40GB", 8, 40.0, 680.0),
    NodeType("a3-highgpu-8g", "H100-80GB", 8, 79.6, 1872.0),
)}


def known_model(name: str) -> ModelShape:
    key = _normalise_model_name(name)
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    raise ConfigError([f"plan.model={name!r} is not a known model: {did_you_mean(key, list(KNOWN_MODELS))}; "
                       "or give the numbers (plan.hidden_size, plan.num_layers, plan.num_heads, "
                       "plan.num_kv_heads, plan.intermediate_size, plan.vocab_size)"])


def _normalise_model_name(name: str) -> str:
    key = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in ("-instruct", "-chat", "-hf", "-base"):
        key = key.removesuffix(suffix)
    key = key.removeprefix("meta-")
    return _MODEL_ALIASES.get(key, key)


#: plan.* keys that set (or override) a shape field of the same name
SHAPE_OVERRIDES = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                   "vocab_size")


def _base_shape(cfg: RaypoConfig) -> tuple[Optional[ModelShape], str]:
    """The shape named by plan.model or model.path (a tiny:// URI, a local config.json, a known name)."""
    pl, path = cfg.plan, cfg.model.path
    if pl.model:
        return known_model(pl.model), "plan.model"
    if path.startswith("tiny://"):
        from raypo.model.tiny import parse_tiny_spec  # parsing the URI needs no torch

        return dataclasses.replace(parse_tiny_spec(path).shape, name=f"tiny ({path})"), "model.path (tiny)"
    config_json = Path(path).expanduser() / "config.json"
    if config_json.is_file():
        return ModelShape.from_hf_config(json.loads(config_json.read_text()), Path(path).name), \
            f"{path}/config.json"
    if _normalise_model_name(path) in KNOWN_MODELS:
        return KNOWN_MODELS[_normalise_model_name(path)], "model.path"
    return None, ""


def resolve_architecture(cfg: RaypoConfig) -> tuple[ModelShape, str]:
    """The model's shape and where it came from (plan.model, a config.json, a tiny:// URI, plan.* numbers)."""
    base, source = _base_shape(cfg)
    given = {f: getattr(cfg.plan, f) for f in SHAPE_OVERRIDES if getattr(cfg.plan, f) is not None}
    if base is None:
        missing = [f"plan.{f}" for f in SHAPE_OVERRIDES if f not in given]
        if missing:
            raise ConfigError([
                f"raypo plan cannot tell the model's size: model.path={cfg.model.path!r} is not a local "
                f"directory with a config.json and names no known model; set plan.model (one of "
                f"{', '.join(KNOWN_MODELS)}) or give {', '.join(missing)}"])
        return ModelShape(name="custom", **given), "plan.* numbers"
    if given:
        base = dataclasses.replace(base, **given)
        source += " + plan.* numbers"
    return base, source


@dataclass(frozen=True)
class Hardware:
    name: str
    gpus_per_node: int
    gpu_memory_gib: Optional[float]
    cpu_memory_gib: Optional[float]


def resolve_hardware(cfg: RaypoConfig) -> Hardware:
    pl = cfg.plan
    node: Optional[NodeType] = None
    if pl.node_type:
        node = KNOWN_NODE_TYPES.get(pl.node_type)
        if node is None:
            raise ConfigError([f"plan.node_type={pl.node_type!r} is not a known instance type: "
                               f"{did_you_mean(pl.node_type, list(KNOWN_NODE_TYPES))}; or give "
                               "plan.gpus_per_node, plan.gpu_memory_gib and plan.cpu_memory_gib"])
    name = f"{node.name} ({node.gpus_per_node} x {node.gpu})" if node else "custom"
    return Hardware(
        name=name,
        gpus_per_node=pl.gpus_per_node or (node.gpus_per_node if node else 8),
        gpu_memory_gib=pl.gpu_memory_gib or (node.gpu_memory_gib if node else None),
        cpu_memory_gib=pl.cpu_memory_gib or (node.cpu_memory_gib if node else None),
    )
