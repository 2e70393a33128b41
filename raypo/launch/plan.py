"""``raypo plan``: per-GPU memory of a run under DeepSpeed ZeRO-3, and whether it fits its cluster.

Every number is printed with the arithmetic that produced it. Symbols: P = parameters, P_L = parameters of
the largest single module (DeepSpeed's "largest layer": for Llama/Qwen the V x h embedding), W = GPUs
(= ``scaling.num_workers``, one Ray Train worker per GPU), h = hidden size, h_kv = key/value width
(kv_heads x head_dim), I = MLP width, L = layers, V = vocabulary, e = bytes per activation element
(2 for bfloat16).

Model states, ZeRO-3 (exactly DeepSpeed's ``estimate_zero3_model_states_mem_needs``, zero_init=True)
    no offload                 18 B x P / W + 4 B x P_L    18 = 2 (bf16 weights) + 4 (fp32 gradients)
                                                               + 12 (fp32 master weights, Adam m and v)
    optimizer -> CPU           2 B x P / W + 4 B x P_L     gradients and optimizer states live on the host
    optimizer + params -> CPU  4 B x P_L                   only the gathered working layers stay on the GPU
    host RAM per node          16 (or 18 with params) B x P / nodes x 1.5 with offload, 4 B x P_L x GPUs
                               x 1.5 without, plus 2 B x P on rank 0's node while the bf16 checkpoint loads.
Reference model (``train.reference=online``; none when precomputed or with LoRA, whose reference is the
base model with the adapters disabled)
    2 B x P / W + 2 B x P_L    a bf16 ZeRO-3 inference engine (params on the host when offload_params)
Activations (one micro-batch of B prompts; a forward holds the prompt and n responses, n = N or
``train.response_chunk_size``)
    tokens per forward         T = B x (Lp + n x Lr) with prefix sharing, B x n x (Lp + Lr) without
    saved per token and layer  a = 8h + e x (7h + 3h_kv + 4I) bytes: two RMSNorms (fp32 input copy + normed
                               output), q/k/v input, q and k before RoPE, q, k, v and output kept by SDPA
                               (flash / memory-efficient: no L x L score matrix), MLP input, gate, up,
                               silu(gate) and their product.
    without checkpointing      T x L x a
    with checkpointing         T x (L x e x h + a): each layer's input, plus one layer recomputed in backward
Log-prob head (``raypo.model.logprobs``: only response positions, chunked, recomputed in backward)
    chunk x V x 10 B + 4 B x V x h    fp32 logits + fp32 softmax/grad + bf16 grad per chunk row, and the
                                      fp32 gradient buffer of the gathered lm_head weight
    (a naive head would hold T_resp x V x (e + 4 + 4) B of logits, fp32 copy and gradient.)
Fixed costs: ZeRO-3 buckets 4 B x h^2 (reduce) + 2 B x 0.9 h^2 (prefetch), and 2 GiB for the CUDA context,
NCCL buffers and cuBLAS workspaces. A run fits when the total is at most 90 % of the GPU's memory (the
rest is allocator fragmentation headroom).

The estimate is an engineering approximation (about +-20 % for activations, which depend on the attention
kernel and on what autograd keeps); the model-state lines are DeepSpeed's own numbers, checked against its
estimator in tests/launch/test_plan.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from raypo.config import RaypoConfig, load_config
from raypo.errors import ConfigError, did_you_mean

GIB = 2**30
HEAD_CHUNK_ROWS = 1024  # raypo.model.logprobs.DEFAULT_HEAD_CHUNK_SIZE (kept here so planning needs no torch)
RUNTIME_OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, cuBLAS workspaces
USABLE_FRACTION = 0.90  # leave 10 % of GPU memory for allocator fragmentation
HOST_USABLE_FRACTION = 0.90
DS_HOST_BUFFER_FACTOR = 1.5  # DeepSpeed estimator's additional_buffer_factor


# ----------------------------------------------------------------------------------------------------
# Models and hardware
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer in the Llama / Qwen2 family (GQA attention, SwiGLU MLP, RMSNorm)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k and v

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_params(self) -> dict[str, int]:
        """Parameters of each module of one decoder layer (recurse=False, as DeepSpeed counts layers)."""
        h, kv, inter = self.hidden_size, self.kv_size, self.intermediate_size
        bias = 1 if self.attention_bias else 0
        return {
            "q_proj": h * h + bias * h, "k_proj": h * kv + bias * kv, "v_proj": h * kv + bias * kv,
            "o_proj": h * h, "gate_proj": h * inter, "up_proj": h * inter, "down_proj": inter * h,
            "input_layernorm": h, "post_attention_layernorm": h,
        }

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.embedding_params + self.num_layers * sum(self.module_params().values()) + \
            self.hidden_size

    @property
    def largest_layer_params(self) -> int:
        return max(self.embedding_params, *self.module_params().values())

    def describe(self) -> str:
        tied = ", tied embeddings" if self.tie_word_embeddings else ""
        return (f"h={self.hidden_size}, L={self.num_layers}, heads {self.num_heads} ({self.num_kv_heads} kv, "
                f"head_dim {self.head_dim}), I={self.intermediate_size}, V={self.vocab_size}{tied}")


def _arch(name, h, layers, heads, kv, inter, vocab, tied=False, bias=False) -> Architecture:
    return Architecture(name, h, layers, heads, kv, inter, vocab, tied, bias)


# Numbers from each model's config.json on the Hugging Face Hub.
KNOWN_MODELS: dict[str, Architecture] = {a.name: a for a in (
    _arch("llama-3-8b", 4096, 32, 32, 8, 14336, 128256),  # Llama-3 / 3.1 8B (and -Instruct)
    _arch("llama-3-70b", 8192, 80, 64, 8, 28672, 128256),
    _arch("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, tied=True),
    _arch("llama-3.2-3b", 3072, 28, 24, 8, 8192, 128256, tied=True),
    _arch("mistral-7b", 4096, 32, 32, 8, 14336, 32768),  # v0.3
    _arch("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, bias=True),
    _arch("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, bias=True),
    _arch("qwen2.5-32b", 5120, 64, 40, 8, 27648, 152064, bias=True),
    _arch("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, bias=True),
    _arch("smollm2-135m", 576, 30, 9, 3, 1536, 49152, tied=True),
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


def known_model(name: str) -> Architecture:
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


def architecture_from_hf_config(hf: dict[str, Any], name: str) -> Architecture:
    """An :class:`Architecture` from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2 families)."""
    heads = int(hf["num_attention_heads"])
    return Architecture(
        name=name, hidden_size=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        intermediate_size=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")),
    )


_ARCH_OVERRIDES = {"hidden_size": "hidden_size", "num_layers": "num_layers", "num_heads": "num_heads",
                   "num_kv_heads": "num_kv_heads", "intermediate_size": "intermediate_size",
                   "vocab_size": "vocab_size"}


def resolve_architecture(cfg: RaypoConfig) -> tuple[Architecture, str]:
    """The model's architecture and where it came from (plan.model, a config.json, a tiny:// URI, ...)."""
    pl, path = cfg.plan, cfg.model.path
    base: Optional[Architecture] = None
    source = ""
    if pl.model:
        base, source = known_model(pl.model), "plan.model"
    elif path.startswith("tiny://"):
        from raypo.model.tiny import parse_tiny_spec  # imports torch: only for tiny models

        t = parse_tiny_spec(path)
        base = _arch(f"tiny ({path})", t.hidden, t.layers, t.heads, t.kv_heads, t.intermediate, t.vocab,
                     tied=t.tie_embeddings)
        source = "model.path (tiny)"
    elif (Path(path).expanduser() / "config.json").is_file():
        hf = json.loads((Path(path).expanduser() / "config.json").read_text())
        base, source = architecture_from_hf_config(hf, Path(path).name), f"{path}/config.json"
    elif _normalise_model_name(path) in KNOWN_MODELS:
        base, source = KNOWN_MODELS[_normalise_model_name(path)], "model.path"
    given = {f: getattr(pl, f) for f in _ARCH_OVERRIDES if getattr(pl, f) is not None}
    if base is None:
        missing = [f"plan.{f}" for f in _ARCH_OVERRIDES if f not in given]
        if missing:
            raise ConfigError([
                f"raypo plan cannot tell the model's size: model.path={path!r} is not a local directory with "
                f"a config.json and names no known model; set plan.model (one of {', '.join(KNOWN_MODELS)}) "
                f"or give {', '.join(missing)}"])
        base = Architecture(name="custom", **given)
        return base, "plan.* numbers"
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


# ----------------------------------------------------------------------------------------------------
# The memory model
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One line of the estimate: a name, the bytes, and the arithmetic that gave them."""

    name: str
    nbytes: float
    formula: str

    @property
    def gib(self) -> float:
        return self.nbytes / GIB


def zero3_model_states_bytes(total_params: int, largest_layer_params: int, num_gpus: int,
                             offload_optimizer: bool, offload_params: bool) -> float:
    """GPU bytes of ZeRO-3 model states, DeepSpeed's formula (estimate_zero3_model_states_mem_needs)."""
    if offload_params:
        return 4 * largest_layer_params
    if offload_optimizer:
        return 4 * largest_layer_params + 2 * total_params / num_gpus
    return 4 * largest_layer_params + 18 * total_params / num_gpus


def zero3_host_bytes_per_node(total_params: int, largest_layer_params: int, gpus_per_node: int,
                              num_nodes: int, offload_optimizer: bool, offload_params: bool) -> float:
    """Host bytes per node for ZeRO-3 model states, DeepSpeed's formula (zero_init=True, factor 1.5)."""
    if offload_params:
        return total_params * 18 / num_nodes * DS_HOST_BUFFER_FACTOR
    if offload_optimizer:
        return total_params * 16 / num_nodes * DS_HOST_BUFFER_FACTOR
    return largest_layer_params * 4 * gpus_per_node * DS_HOST_BUFFER_FACTOR


def lora_params(arch: Architecture, r: int, target_modules: list[str]) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted projection per layer."""
    h, kv, inter = arch.hidden_size, arch.kv_size, arch.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(r * (i + o) for name, (i, o) in shapes.items() if name in target_modules)
    return arch.num_layers * per_layer


@dataclass(frozen=True)
class Setup:
    """What one estimate is for: the model, the parallelism, the batch and the memory options."""

    arch: Architecture
    num_gpus: int
    gpus_per_node: int
    micro_batch: int  # prompts per forward/backward
    responses: int  # N
    responses_per_forward: int  # n: N, or train.response_chunk_size
    prompt_len: int
    response_len: int
    prefix_sharing: bool
    checkpointing: bool
    offload_optimizer: bool
    offload_params: bool
    online_reference: bool
    lora_params: int = 0  # > 0: LoRA (base weights frozen)
    act_bytes: int = 2  # e: bytes per activation element
    token_budget: int = 0  # > 0: train.token_budget packs groups into forwards of at most this many tokens

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.num_gpus / self.gpus_per_node)

    @property
    def tokens(self) -> int:
        """T, tokens in one forward: B groups, or with a token budget at most the budget (a group larger
        than the budget runs alone, so never less than one group)."""
        if self.token_budget:
            return max(self.token_budget, self.group_tokens)
        return self.micro_batch * self.group_tokens

    @property
    def group_tokens(self) -> int:
        """Tokens of one group in one forward: Lp + n Lr (shared) or n (Lp + Lr)."""
        n, lp, lr = self.responses_per_forward, self.prompt_len, self.response_len
        return lp + n * lr if self.prefix_sharing else n * (lp + lr)

    @property
    def response_tokens(self) -> int:
        """Scored tokens in one forward (the head's input): T's share of response tokens."""
        per_group = self.responses_per_forward * self.response_len
        return self.tokens * per_group // self.group_tokens


def _p(x: float) -> str:
    """Compact number for formulas: 8.03e9, 525.3e6, 4096."""
    if abs(x) >= 1e9:
        return f"{x / 1e9:.3g}e9"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.4g}e6"
    return f"{x:.6g}"


def model_state_terms(s: Setup) -> list[Term]:
    a, w = s.arch, s.num_gpus
    p, pl = a.total_params, a.largest_layer_params
    sym = f"P={_p(p)}, W={w}"
    terms: list[Term] = []
    if s.lora_params:
        t = s.lora_params
        base = 0 if s.offload_params else 2 * p / w
        terms.append(Term("frozen base weights (bf16 shard)", base,
                          "on the host (offload_params)" if s.offload_params else f"2 B x P / W   [{sym}]"))
        states = 2 * t / w if s.offload_optimizer or s.offload_params else 18 * t / w
        terms.append(Term("LoRA weights, grads, Adam", states, f"{2 if s.offload_optimizer else 18} B x "
                          f"P_lora / W   [P_lora={_p(t)}]"))
    elif s.offload_params:
        terms.append(Term("weights, grads, optimizer", 0.0, "on the host (offload_params)"))
    elif s.offload_optimizer:
        terms.append(Term("weights (bf16 shard)", 2 * p / w, f"2 B x P / W   [{sym}]"))
        terms.append(Term("grads + optimizer", 0.0, "on the host (offload_optimizer)"))
    else:
        terms.append(Term("weights (bf16 shard)", 2 * p / w, f"2 B x P / W   [{sym}]"))
        terms.append(Term("gradients (fp32 shard)", 4 * p / w, "4 B x P / W"))
        terms.append(Term("optimizer (fp32 master, m, v)", 12 * p / w, "12 B x P / W"))
    terms.append(Term("gathered working layers", 4 * pl, f"4 B x P_L   [P_L={_p(pl)}]"))
    return terms


def reference_terms(s: Setup) -> list[Term]:
    if not s.online_reference or s.lora_params:
        why = "LoRA: the base model with adapters off" if s.lora_params else "train.reference=precomputed"
        return [Term("reference model", 0.0, f"none ({why})")]
    a, w = s.arch, s.num_gpus
    if s.offload_params:
        return [Term("reference model (gathered layer)", 2 * a.largest_layer_params,
                     "2 B x P_L (weights on the host)")]
    return [Term("reference model (bf16 shard)", 2 * a.total_params / w + 2 * a.largest_layer_params,
                 "2 B x P / W + 2 B x P_L")]


def activation_bytes_per_token_layer(arch: Architecture, e: int) -> int:
    """a = 8h + e x (7h + 3h_kv + 4I): what autograd keeps per token in one decoder layer."""
    h, kv, inter = arch.hidden_size, arch.kv_size, arch.intermediate_size
    return 8 * h + e * (7 * h + 3 * kv + 4 * inter)


def activation_terms(s: Setup) -> list[Term]:
    a, e, t = s.arch, s.act_bytes, s.tokens
    per = activation_bytes_per_token_layer(a, e)
    per_sym = f"T={t}, a=8h+{e}(7h+3h_kv+4I)={per} B"
    if s.checkpointing:
        return [Term("activations (checkpointed)", t * (a.num_layers * e * a.hidden_size + per),
                     f"T x (L x {e}h + a)   [{per_sym}]")]
    return [Term("activations (no checkpointing)", t * a.num_layers * per, f"T x L x a   [{per_sym}]")]


def head_terms(s: Setup) -> list[Term]:
    a = s.arch
    rows = min(HEAD_CHUNK_ROWS, s.response_tokens)
    nbytes = rows * a.vocab_size * 10 + 4 * a.vocab_size * a.hidden_size
    return [Term("log-prob head (chunked)", nbytes, f"{rows} x V x 10 B + 4 B x V x h   [V={a.vocab_size}]")]


def naive_head_bytes(s: Setup) -> float:
    return s.response_tokens * s.arch.vocab_size * (s.act_bytes + 8)


def fixed_terms(s: Setup) -> list[Term]:
    h = s.arch.hidden_size
    return [Term("ZeRO-3 buckets", 4 * h * h + 2 * 0.9 * h * h, "4 B x h^2 + 2 B x 0.9 h^2"),
            Term("CUDA context, NCCL, workspaces", RUNTIME_OVERHEAD_GIB * GIB, "fixed")]


def gpu_terms(s: Setup) -> list[Term]:
    return model_state_terms(s) + reference_terms(s) + activation_terms(s) + head_terms(s) + fixed_terms(s)


def gpu_total_bytes(s: Setup) -> float:
    return sum(t.nbytes for t in gpu_terms(s))


def host_terms(s: Setup) -> list[Term]:
    """Host RAM per node: ZeRO-3 offload buffers (DeepSpeed's formula) and rank 0's checkpoint load."""
    a = s.arch
    states = zero3_host_bytes_per_node(a.total_params, a.largest_layer_params, s.gpus_per_node, s.num_nodes,
                                       s.offload_optimizer, s.offload_params)
    if s.offload_params:
        formula = "18 B x P / nodes x 1.5"
    elif s.offload_optimizer:
        formula = "16 B x P / nodes x 1.5"
    else:
        formula = "4 B x P_L x GPUs/node x 1.5"
    terms = [Term("ZeRO-3 model states", states, f"{formula}   [nodes={s.num_nodes}]")]
    if s.online_reference and s.offload_params and not s.lora_params:
        terms.append(Term("reference weights", 2 * a.total_params / s.num_nodes, "2 B x P / nodes"))
    terms.append(Term("bf16 checkpoint on rank 0's node", 2 * a.total_params, "2 B x P (while loading)"))
    return terms


# ----------------------------------------------------------------------------------------------------
# A plan for a config
# ----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    setup: Setup
    arch_source: str
    hardware: Hardware
    terms: list[Term]
    host: list[Term]

    @property
    def total_gib(self) -> float:
        return sum(t.nbytes for t in self.terms) / GIB

    @property
    def host_gib(self) -> float:
        return sum(t.nbytes for t in self.host) / GIB

    @property
    def capacity_gib(self) -> Optional[float]:
        mem = self.hardware.gpu_memory_gib
        return None if mem is None else mem * USABLE_FRACTION

    @property
    def fits_gpu(self) -> Optional[bool]:
        cap = self.capacity_gib
        return None if cap is None else self.total_gib <= cap

    @property
    def fits_host(self) -> Optional[bool]:
        mem = self.hardware.cpu_memory_gib
        return None if mem is None else self.host_gib <= mem * HOST_USABLE_FRACTION

    @property
    def fits(self) -> Optional[bool]:
        """True / False when the config names a cluster (plan.node_type or plan.gpu_memory_gib), else None."""
        if self.fits_gpu is None:
            return None
        return bool(self.fits_gpu and self.fits_host is not False)


def setup_from_config(cfg: RaypoConfig, arch: Architecture, hardware: Hardware) -> Setup:
    lora = cfg.model.lora
    return Setup(
        arch=arch,
        num_gpus=cfg.scaling.num_workers,
        gpus_per_node=hardware.gpus_per_node,
        micro_batch=cfg.train.micro_batch_size,
        responses=cfg.plan.responses_per_prompt,
        responses_per_forward=min(cfg.train.response_chunk_size or cfg.plan.responses_per_prompt,
                                  cfg.plan.responses_per_prompt),
        prompt_len=cfg.data.max_prompt_length,
        response_len=cfg.data.max_response_length,
        prefix_sharing=cfg.model.prefix_sharing,
        checkpointing=cfg.model.gradient_checkpointing,
        # DeepSpeed's estimator knows param offload only together with optimizer offload (ZeRO-Infinity)
        offload_optimizer=cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_params,
        offload_params=cfg.deepspeed.offload_params,
        online_reference=cfg.train.reference == "online",
        lora_params=lora_params(arch, lora.r, list(lora.target_modules)) if lora.enabled else 0,
        act_bytes=4 if cfg.model.dtype == "float32" else 2,
        token_budget=cfg.train.token_budget,
    )


def make_plan(cfg: RaypoConfig) -> Plan:
    arch, source = resolve_architecture(cfg)
    hardware = resolve_hardware(cfg)
    setup = setup_from_config(cfg, arch, hardware)
    return Plan(setup=setup, arch_source=source, hardware=hardware, terms=gpu_terms(setup),
                host=host_terms(setup))


def _row(name: str, formula: str, gib: float) -> str:
    return f"  {name:<34} {formula:<58} {gib:8.2f}"


def format_plan(plan: Plan, title: str = "") -> str:
    """The plan as text: inputs, every term with its arithmetic, the verdict and the alternatives."""
    s, a, hw = plan.setup, plan.setup.arch, plan.hardware
    n_forward = s.responses_per_forward
    b, lp, lr = s.micro_batch, s.prompt_len, s.response_len
    tokens_formula = (f"B x (Lp + n x Lr) = {b} x ({lp} + {n_forward} x {lr})" if s.prefix_sharing else
                      f"B x n x (Lp + Lr) = {b} x {n_forward} x ({lp} + {lr})")
    if s.token_budget:
        tokens_formula = f"max(train.token_budget, one group) = max({s.token_budget}, {s.group_tokens})"
    lines = [f"raypo plan{': ' + title if title else ''}",
             f"  model    {a.name} (from {plan.arch_source}): P = {_p(a.total_params)} parameters, "
             f"largest layer P_L = {_p(a.largest_layer_params)}",
             f"           {a.describe()}",
             f"  cluster  {hw.name}: W = scaling.num_workers = {s.num_gpus} GPUs on {s.num_nodes} node(s) of "
             f"{s.gpus_per_node}; GPU memory "
             + (f"{hw.gpu_memory_gib:g} GiB" if hw.gpu_memory_gib else "unknown")
             + (f", host RAM {hw.cpu_memory_gib:g} GiB/node" if hw.cpu_memory_gib else ""),
             f"  batch    B = {b} prompt(s) x N = {s.responses} responses, n = {n_forward} per forward, "
             f"Lp = {lp}, Lr = {lr}, prefix sharing {'on' if s.prefix_sharing else 'off'}",
             f"           T = {tokens_formula} = {s.tokens} tokens per forward, "
             f"{s.response_tokens} response tokens",
             "",
             f"  {'per GPU':<34} {'formula':<58} {'GiB':>8}"]
    states = model_state_terms(s)
    for t in states:
        lines.append(_row(t.name, t.formula, t.gib))
    ds = zero3_model_states_bytes(a.total_params, a.largest_layer_params, s.num_gpus, s.offload_optimizer,
                                  s.offload_params) / GIB
    if not s.lora_params:
        lines.append(_row("= model states", "DeepSpeed estimate_zero3_model_states_mem_needs", ds))
    for t in plan.terms[len(states):]:
        lines.append(_row(t.name, t.formula, t.gib))
    lines.append(_row("= total", "", plan.total_gib))
    if plan.capacity_gib is not None:
        verdict = "FITS" if plan.fits_gpu else "DOES NOT FIT"
        lines.append(f"  GPU: {plan.total_gib:.2f} GiB of {hw.gpu_memory_gib:g} GiB x {USABLE_FRACTION:.2f}"
                     f" = {plan.capacity_gib:.2f} GiB usable -> {verdict}")
    else:
        lines.append("  GPU: no verdict (name a cluster: plan.node_type, or plan.gpu_memory_gib)")
    lines += ["", f"  {'host RAM per node':<34} {'formula':<58} {'GiB':>8}"]
    lines += [_row(t.name, t.formula, t.gib) for t in plan.host]
    if plan.fits_host is not None:
        lines.append(f"  host: {plan.host_gib:.1f} GiB of {hw.cpu_memory_gib:g} GiB x "
                     f"{HOST_USABLE_FRACTION:.2f} -> {'FITS' if plan.fits_host else 'DOES NOT FIT'}")
    lines += ["", *format_alternatives(plan)]
    if plan.fits is not None:
        lines += ["", f"verdict: {'fits' if plan.fits else 'does NOT fit'} on {hw.name} x {s.num_nodes}"]
        if not plan.fits:
            lines.append("  fixes: more GPUs (scaling.num_workers), gradient checkpointing "
                         "(model.gradient_checkpointing=true), deepspeed.offload_optimizer=true, "
                         "train.reference=precomputed, a smaller train.micro_batch_size or "
                         "train.response_chunk_size")
    return "\n".join(lines)


def format_alternatives(plan: Plan) -> list[str]:
    """Totals per GPU for every offload x checkpointing combination; '*' marks the configured one."""
    s = plan.setup
    cap = plan.capacity_gib
    usable = f" (usable {cap:.1f}; '!' = does not fit)" if cap else ""
    lines = [f"  alternatives, total GiB per GPU{usable}",
             f"  {'':<28} {'no checkpointing':>18} {'checkpointing':>15}"]
    for label, opt, par in (("no offload", False, False), ("optimizer -> CPU", True, False),
                            ("optimizer + params -> CPU", True, True)):
        cells = []
        for ckpt in (False, True):
            alt = dataclasses.replace(s, offload_optimizer=opt, offload_params=par, checkpointing=ckpt)
            gib = gpu_total_bytes(alt) / GIB
            configured = (opt, par, ckpt) == (s.offload_optimizer, s.offload_params, s.checkpointing)
            mark = "*" if configured else " "
            flag = "!" if cap is not None and gib > cap else " "
            cells.append(f"{gib:.2f}{flag}{mark}")
        lines.append(f"  {label:<28} {cells[0]:>18} {cells[1]:>15}")
    naive = naive_head_bytes(s) / GIB
    chunked = head_terms(s)[0].gib
    lines.append(f"  a naive log-prob head (full [T_resp, V] logits) would take {naive:.2f} GiB instead of "
                 f"{chunked:.2f}")
    if s.online_reference and not s.lora_params:
        ref = sum(t.nbytes for t in reference_terms(s)) / GIB
        lines.append(f"  train.reference=precomputed would save {ref:.2f} GiB per GPU (and ~25 % of step "
                     "FLOPs)")
    return lines


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def load_plan_target(path: str, overrides: list[str]) -> RaypoConfig:
    """The raypo config of ``path``: a raypo config, or a job spec (jobs/*.yaml), whose config is used."""
    from raypo.launch.submit import is_job_spec, job_config, load_job

    if is_job_spec(path):
        job = load_job(path, extra_overrides=overrides)
        return job_config(job)
    return load_config(path, overrides)


def plan_command(args: argparse.Namespace) -> int:
    """``raypo plan CONFIG|JOB [key=value ...]``: exit 0 if it fits (or no cluster is named), 1 if not."""
    cfg = load_plan_target(args.config, args.overrides)
    plan = make_plan(cfg)
    print(format_plan(plan, title=args.config))
    return 1 if plan.fits is False else 0
