"""The shape of a decoder-only transformer of the Llama / Qwen2 family (GQA attention, SwiGLU MLP, RMSNorm).

One type for every component that needs a model's sizes without the model: ``raypo plan`` (parameter
counts, :mod:`raypo.launch.plan`), tiny test models (:mod:`raypo.model.tiny`, a ``LlamaConfig``) and the
benchmarks (bench/common.py). Free of torch, so planning stays light.

Symbols: h = hidden size, L = layers, n_h / n_kv = attention / key-value heads, d = h / n_h (head dim),
h_kv = n_kv x d (key/value width), I = MLP width, V = vocabulary. Parameters of one decoder layer
(``recurse=False`` per module, as DeepSpeed counts "layers")::

    q_proj h x h (+ h)    k_proj, v_proj h x h_kv (+ h_kv)    o_proj h x h
    gate_proj, up_proj h x I    down_proj I x h    two RMSNorms h each        (+ ...: Qwen2's q/k/v biases)

Total P = L x (layer) + h (final norm) + V x h (embedding) + V x h (lm_head, unless tied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Rows of the chunked log-prob head per chunk (raypo.model.logprobs). Here, not there, so that
#: ``raypo plan`` models the head's memory without importing torch.
DEFAULT_HEAD_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped decoder's sizes. ``name`` only labels it (``raypo plan`` prints it)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k and v
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        """h_kv = n_kv x d."""
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
        """V x h, also the lm_head's weight."""
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.embedding_params + self.num_layers * sum(self.module_params().values()) + \
            self.hidden_size

    @property
    def largest_layer_params(self) -> int:
        """P_L, the largest single module (DeepSpeed's "largest layer"; the embedding for Llama / Qwen)."""
        return max(self.embedding_params, *self.module_params().values())

    def decoder_matmul_params(self) -> int:
        """Multiply-accumulates per token of the decoder's linear layers, L x (2h^2 + 2h h_kv + 3hI)."""
        h = self.hidden_size
        return self.num_layers * (2 * h * h + 2 * h * self.kv_size + 3 * h * self.intermediate_size)

    def describe(self) -> str:
        tied = ", tied embeddings" if self.tie_word_embeddings else ""
        return (f"h={self.hidden_size}, L={self.num_layers}, heads {self.num_heads} ({self.num_kv_heads} kv, "
                f"head_dim {self.head_dim}), I={self.intermediate_size}, V={self.vocab_size}{tied}")

    def llama_config_kwargs(self) -> dict[str, Any]:
        """The ``transformers.LlamaConfig`` arguments that give this shape."""
        return {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "tie_word_embeddings": self.tie_word_embeddings}

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str = "") -> ModelShape:
        """The shape in a Hugging Face ``config.json`` (Llama, Mistral, Qwen2 families)."""
        heads = int(hf["num_attention_heads"])
        return cls(
            hidden_size=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            intermediate_size=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")), name=name,
        )
