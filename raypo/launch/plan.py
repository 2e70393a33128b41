"""The memory model of ``raypo plan``: per-GPU memory of a run under DeepSpeed ZeRO-3, and whether it fits.

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
estimator in tests/launch/test_launch_plan.py.

The model's shape and the cluster come from :mod:`raypo.launch.catalog`; the printed plan is
:mod:`raypo.launch.plan_format`; the command is :mod:`raypo.cli.plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from raypo.config import RaypoConfig
from raypo.launch.catalog import Hardware, resolve_architecture, resolve_hardware
from raypo.model.shape import DEFAULT_HEAD_CHUNK_SIZE, ModelShape

GIB = 2**30
RUNTIME_OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, cuBLAS workspaces
USABLE_FRACTION = 0.90  # leave 10 % of GPU memory for allocator fragmentation
HOST_USABLE_FRACTION = 0.90
DS_HOST_BUFFER_FACTOR = 1.5  # DeepSpeed estimator's additional_buffer_factor


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


def lora_params(arch: ModelShape, r: int, target_modules: list[str]) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted projection per layer."""
    h, kv, inter = arch.hidden_size, arch.kv_size, arch.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(r * (i + o) for name, (i, o) in shapes.items() if name in target_modules)
    return arch.num_layers * per_layer


@dataclass(frozen=True)
class PlanInputs:
    """What one estimate is for: the model, the parallelism, the batch and the memory options."""

    arch: ModelShape
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


def compact(x: float) -> str:
    """Compact number for formulas: 8.03e9, 525.3e6, 4096."""
    if abs(x) >= 1e9:
        return f"{x / 1e9:.3g}e9"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.4g}e6"
    return f"{x:.6g}"


def model_state_terms(s: PlanInputs) -> list[Term]:
    a, w = s.arch, s.num_gpus
    p, pl = a.total_params, a.largest_layer_params
    sym = f"P={compact(p)}, W={w}"
    terms: list[Term] = []
    if s.lora_params:
        t = s.lora_params
        base = 0 if s.offload_params else 2 * p / w
        terms.append(Term("frozen base weights (bf16 shard)", base,
                          "on the host (offload_params)" if s.offload_params else f"2 B x P / W   [{sym}]"))
        states = 2 * t / w if s.offload_optimizer or s.offload_params else 18 * t / w
        terms.append(Term("LoRA weights, grads, Adam", states, f"{2 if s.offload_optimizer else 18} B x "
                          f"P_lora / W   [P_lora={compact(t)}]"))
    elif s.offload_params:
        terms.append(Term("weights, grads, optimizer", 0.0, "on the host (offload_params)"))
    elif s.offload_optimizer:
        terms.append(Term("weights (bf16 shard)", 2 * p / w, f"2 B x P / W   [{sym}]"))
        terms.append(Term("grads + optimizer", 0.0, "on the host (offload_optimizer)"))
    else:
        terms.append(Term("weights (bf16 shard)", 2 * p / w, f"2 B x P / W   [{sym}]"))
        terms.append(Term("gradients (fp32 shard)", 4 * p / w, "4 B x P / W"))
        terms.append(Term("optimizer (fp32 master, m, v)", 12 * p / w, "12 B x P / W"))
    terms.append(Term("gathered working layers", 4 * pl, f"4 B x P_L   [P_L={compact(pl)}]"))
    return terms


def reference_terms(s: PlanInputs) -> list[Term]:
    if not s.online_reference or s.lora_params:
        why = "LoRA: the base model with adapters off" if s.lora_params else "train.reference=precomputed"
        return [Term("reference model", 0.0, f"none ({why})")]
    a, w = s.arch, s.num_gpus
    if s.offload_params:
        return [Term("reference model (gathered layer)", 2 * a.largest_layer_params,
                     "2 B x P_L (weights on the host)")]
    return [Term("reference model (bf16 shard)", 2 * a.total_params / w + 2 * a.largest_layer_params,
                 "2 B x P / W + 2 B x P_L")]


def activation_bytes_per_token_layer(arch: ModelShape, e: int) -> int:
    """a = 8h + e x (7h + 3h_kv + 4I): what autograd keeps per token in one decoder layer."""
    h, kv, inter = arch.hidden_size, arch.kv_size, arch.intermediate_size
    return 8 * h + e * (7 * h + 3 * kv + 4 * inter)


def activation_terms(s: PlanInputs) -> list[Term]:
    a, e, t = s.arch, s.act_bytes, s.tokens
    per = activation_bytes_per_token_layer(a, e)
    per_sym = f"T={t}, a=8h+{e}(7h+3h_kv+4I)={per} B"
    if s.checkpointing:
        return [Term("activations (checkpointed)", t * (a.num_layers * e * a.hidden_size + per),
                     f"T x (L x {e}h + a)   [{per_sym}]")]
    return [Term("activations (no checkpointing)", t * a.num_layers * per, f"T x L x a   [{per_sym}]")]


def head_terms(s: PlanInputs) -> list[Term]:
    a = s.arch
    rows = min(DEFAULT_HEAD_CHUNK_SIZE, s.response_tokens)
    nbytes = rows * a.vocab_size * 10 + 4 * a.vocab_size * a.hidden_size
    return [Term("log-prob head (chunked)", nbytes, f"{rows} x V x 10 B + 4 B x V x h   [V={a.vocab_size}]")]


def naive_head_bytes(s: PlanInputs) -> float:
    return s.response_tokens * s.arch.vocab_size * (s.act_bytes + 8)


def fixed_terms(s: PlanInputs) -> list[Term]:
    h = s.arch.hidden_size
    return [Term("ZeRO-3 buckets", 4 * h * h + 2 * 0.9 * h * h, "4 B x h^2 + 2 B x 0.9 h^2"),
            Term("CUDA context, NCCL, workspaces", RUNTIME_OVERHEAD_GIB * GIB, "fixed")]


def gpu_terms(s: PlanInputs) -> list[Term]:
    return model_state_terms(s) + reference_terms(s) + activation_terms(s) + head_terms(s) + fixed_terms(s)


def gpu_total_bytes(s: PlanInputs) -> float:
    return sum(t.nbytes for t in gpu_terms(s))


def host_terms(s: PlanInputs) -> list[Term]:
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
    inputs: PlanInputs
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


def plan_inputs(cfg: RaypoConfig, arch: ModelShape, hardware: Hardware) -> PlanInputs:
    lora = cfg.model.lora
    return PlanInputs(
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
    inputs = plan_inputs(cfg, arch, hardware)
    return Plan(inputs=inputs, arch_source=source, hardware=hardware, terms=gpu_terms(inputs),
                host=host_terms(inputs))
