"""Tiny random Llama-shaped causal LMs and tokenizers, built locally with no download.

Tests, benchmarks on CPU and the quickstart need a real Hugging Face model directory (config, safetensors,
tokenizer, chat template) that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
load through the same code path as an 8B checkpoint, including ZeRO-3's partitioned loading. Nothing can be
downloaded here, so this module builds one:

* a byte-level BPE tokenizer trained on a small built-in corpus (English, digits, arithmetic, politeness
  words and chat markers, so the synthetic preference data tokenises into sensible pieces), wrapped as a
  ``PreTrainedTokenizerFast`` with bos/eos/pad tokens and a simple chat template;
* a ``LlamaForCausalLM`` from a ``LlamaConfig`` of :data:`TINY_SHAPE` (hidden 64, 2 layers, 4 heads, 2 KV
  heads, intermediate 128, vocab = tokenizer size), initialised from a seed.

Everything is deterministic for a given :class:`TinySpec`: the corpus is generated from a fixed seed, BPE
merges break ties deterministically, and the weights come from a forked, seeded RNG (the caller's global
RNG state is left untouched).

Configs name a tiny model with a URI, ``tiny://llama?hidden=64&layers=2&seed=0`` (see
:func:`parse_tiny_spec`); :func:`resolve_tiny_spec` materialises it once into a cache directory and returns
the path, so ``tiny://`` can be used anywhere a model directory is accepted. torch and transformers are
imported only to build a model, so parsing a URI (``raypo plan`` does) stays light.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import parse_qsl, urlparse

from raypo.model.shape import ModelShape

if TYPE_CHECKING:
    import torch

TINY_SCHEME = "tiny://"

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"  # end of turn, also the end-of-sequence token (as Llama-3's <|eot_id|> in generation)
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

# <|bos|><|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n  (the role markers are single tokens)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


#: The default tiny model's shape; ``vocab_size`` is the BPE target size (the real vocabulary may be smaller).
TINY_SHAPE = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                        vocab_size=512)

#: ``tiny://`` URI keys (and ``save_tiny_model`` options) of the shape -> :class:`ModelShape` fields
SHAPE_KEYS = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads",
              "kv_heads": "num_kv_heads", "intermediate": "intermediate_size", "vocab": "vocab_size",
              "tie_embeddings": "tie_word_embeddings"}
#: the other keys, fields of :class:`TinySpec` itself
SPEC_KEYS = ("max_positions", "seed")


@dataclass(frozen=True)
class TinySpec:
    """A tiny Llama: its shape, and what a shape does not say (the context length and the weights' seed)."""

    arch: str = "llama"
    shape: ModelShape = TINY_SHAPE
    max_positions: int = 2048
    seed: int = 0

    def options(self) -> dict[str, Any]:
        """The spec as URI keys, in the order of the cache key: hidden, layers, ..., max_positions, seed."""
        shape = {key: getattr(self.shape, name) for key, name in SHAPE_KEYS.items()}
        tied = shape.pop("tie_embeddings")
        return {**shape, "max_positions": self.max_positions, "tie_embeddings": tied, "seed": self.seed}

    def with_options(self, **options: Any) -> TinySpec:
        """A copy with URI keys changed: ``spec.with_options(seed=1, hidden=32)``."""
        unknown = [k for k in options if k not in SHAPE_KEYS and k not in SPEC_KEYS]
        if unknown:
            raise TypeError(f"unknown tiny model options {unknown}; known: {', '.join(self.options())}")
        shape = {SHAPE_KEYS[k]: v for k, v in options.items() if k in SHAPE_KEYS}
        spec = {k: v for k, v in options.items() if k in SPEC_KEYS}
        return dataclasses.replace(self, shape=dataclasses.replace(self.shape, **shape), **spec)

    def cache_key(self) -> str:
        """A directory name that identifies the spec (same spec, same files)."""
        fields = {"arch": self.arch, **self.options()}
        return "-".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in fields.items())


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------

_SENTENCES = (
    "Please answer the question carefully and politely.",
    "Thank you for asking! I am happy to help.",
    "Sorry, I do not know the answer to that question.",
    "The answer is correct because each step follows from the previous one.",
    "Here is a short, honest and helpful explanation.",
    "Could you please explain how you got that result?",
    "I think the best response is clear, concise and kind.",
    "Let me check the arithmetic step by step.",
    "First, add the numbers. Then, multiply the result by two.",
    "This response is rude, wrong and unhelpful.",
    "You are welcome. Have a nice day!",
    "The weather today is sunny, with a light breeze in the afternoon.",
    "Write a summary of the story in one sentence.",
    "The keyword is important: remember it for later.",
    "Dear user, thanks for your patience.",
    "A helpful assistant gives accurate, harmless and honest answers.",
    "Is it true that water boils at 100 degrees Celsius at sea level? Yes, it is.",
    "Name three colors: red, green and blue.",
)
_WORDS = (
    "please thank thanks sorry kindly welcome hello hi dear sure certainly great good bad wrong right "
    "correct incorrect answer question result sum difference product number numbers add plus minus times "
    "divided equals is the a an of to and or in on for with because therefore so that this it you I we "
    "helpful honest harmless polite rude clear concise detailed accurate keyword topic story summary "
    "explain reason step first then finally assistant user system response prompt model"
).split()


def tiny_corpus(seed: int = 0, num_lines: int = 1500) -> list[str]:
    """The tokenizer's training text: fixed sentences, arithmetic Q/A, word salads and chat-formatted turns.

    Generated from ``random.Random(seed)`` so the corpus (and hence the BPE merges) is reproducible.
    """
    rng = random.Random(seed)
    lines = list(_SENTENCES)
    ops = (("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b))
    for _ in range(num_lines):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randrange(0, 100), rng.randrange(0, 100)
            sym, fn = ops[rng.randrange(3)]
            lines.append(f"What is {a} {sym} {b}? The answer is {fn(a, b)}.")
        elif kind == 1:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 14))).capitalize() + ".")
        elif kind == 2:
            role = ROLE_TOKENS[rng.randrange(3)]
            lines.append(f"{role}\n{rng.choice(_SENTENCES)}{EOS_TOKEN}\n")
        else:
            lines.append(" ".join(str(rng.randrange(0, 10_000)) for _ in range(rng.randrange(2, 8))))
    return lines


def build_tiny_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE tokenizer trained on :func:`tiny_corpus`, as a ``PreTrainedTokenizerFast``.

    Byte-level means every string round-trips exactly (``decode(encode(s)) == s``) with no unknown token.
    Special tokens: ``<|pad|>`` (id 0), ``<|bos|>``, ``<|end|>`` (eos), ``<|system|>``, ``<|user|>``,
    ``<|assistant|>``. ``tok(text)`` adds no special tokens; the chat template adds bos and the markers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="right",
    )


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


def tiny_llama_config(spec: TinySpec, tokenizer):
    """``LlamaConfig`` for ``spec`` with the tokenizer's vocabulary size and special-token ids."""
    from transformers import LlamaConfig

    if spec.arch != "llama":
        raise ValueError(f"tiny model arch={spec.arch!r} is not supported; use tiny://llama")
    return LlamaConfig(
        **{**spec.shape.llama_config_kwargs(), "vocab_size": len(tokenizer)},
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )


def build_tiny_model(spec: TinySpec, tokenizer, dtype: Optional[torch.dtype] = None):
    """A random ``LlamaForCausalLM`` in ``dtype`` (default float32); its weights depend only on ``spec``
    (seeded, forked RNG)."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype or torch.float32).eval()


def save_tiny_model(out_dir: str | os.PathLike, spec: TinySpec | None = None, **overrides) -> Path:
    """Build a tiny model and tokenizer and save both in Hugging Face format under ``out_dir``.

    ``overrides`` are ``tiny://`` URI keys (``seed=1``, ``hidden=32``, ...). Returns ``out_dir``.
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)`` load
    them, and so does ZeRO-3 partitioned loading.
    """
    spec = (spec or TinySpec()).with_options(**overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(spec.shape.vocab_size, seed=spec.seed)
    model = build_tiny_model(spec, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------
# tiny:// URIs
# ----------------------------------------------------------------------------------------------------

#: the shape's field names are accepted too (``hidden_size=64`` is ``hidden=64``)
_KEY_ALIASES = {name: key for key, name in SHAPE_KEYS.items()}


def is_tiny_spec(path: str) -> bool:
    return str(path).startswith(TINY_SCHEME)


def parse_tiny_spec(uri: str) -> TinySpec:
    """``tiny://llama?hidden=64&layers=2&heads=4&kv_heads=2&intermediate=128&vocab=512&seed=0`` -> TinySpec.

    Every query key is optional (defaults of :class:`TinySpec`); unknown keys raise a ``ValueError``.
    """
    if not is_tiny_spec(uri):
        raise ValueError(f"not a tiny model URI: {uri!r} (expected tiny://llama?hidden=64&layers=2)")
    parsed = urlparse(uri)
    default = TinySpec(arch=parsed.netloc or parsed.path.strip("/") or "llama")
    known = default.options()
    values: dict[str, Any] = {}
    for key, raw in parse_qsl(parsed.query, keep_blank_values=True):
        name = _KEY_ALIASES.get(key, key)
        if name not in known:
            raise ValueError(f"unknown key {key!r} in tiny model URI {uri!r}; known keys: {', '.join(known)}")
        if isinstance(known[name], bool):
            values[name] = raw.lower() in ("1", "true", "yes")
        else:
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{key}={raw!r} in tiny model URI {uri!r} must be an integer") from None
    return default.with_options(**values)


def default_tiny_cache_dir() -> Path:
    return Path(os.environ.get("RAYPO_CACHE_DIR", Path.home() / ".cache" / "raypo")) / "tiny"


def resolve_tiny_spec(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Materialise ``tiny://...`` once into ``cache_dir/<spec key>`` and return that directory.

    Safe when several processes on a node resolve the same URI at once: each builds into a private temp
    directory and renames it into place; the first rename wins and the others discard their copy (the
    content is identical because building is deterministic).
    """
    spec = parse_tiny_spec(uri)
    root = Path(cache_dir) if cache_dir is not None else default_tiny_cache_dir()
    target = root / spec.cache_key()
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        save_tiny_model(tmp, spec)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
