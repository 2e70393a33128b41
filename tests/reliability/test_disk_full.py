"""A full disk (ENOSPC at the write call, after some bytes went through) or a missing permission leaves no
partial output, and the command stops with one line naming the path."""

from __future__ import annotations

import builtins
import errno
import json
import os

import pytest

import raypo.storage as storage
from raypo.cli import main
from raypo.data.synthetic import generate_table
from raypo.storage import StorageWriteError


class _FullDisk:
    """A real file whose writes fail with ENOSPC once ``room`` bytes have been written."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(data[: self._room])
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _FullDisk(f, 64) if "w" in mode else f

    monkeypatch.setattr(storage, "open", fake_open, raising=False)


def _listwise_input(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = generate_table(6, seed=0).to_pylist()
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    return src


def _leftovers(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.startswith("."))


def test_convert_on_a_full_disk_leaves_nothing_and_names_the_path(tmp_path, full_disk, capsys):
    src = _listwise_input(tmp_path)
    out = tmp_path / "out"
    rc = main(["data", "convert", "-f", "listwise", str(src), str(out), "--dimensions",
               "helpfulness,honesty,instruction_following,truthfulness"])
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # the one line of the error (progress lines may precede it)
    assert rc == 1 and "Traceback" not in err
    assert last.startswith(f"raypo: cannot write {out / 'part-00000.parquet'}") and "ENOSPC" in last
    assert not (out / "part-00000.parquet").exists() and _leftovers(out) == []


def test_quarantine_on_a_full_disk_leaves_nothing(tmp_path, full_disk, capsys):
    src = _listwise_input(tmp_path)
    q = tmp_path / "q.jsonl"
    rc = main(["data", "validate", str(src), "--max-reject-fraction", "1", "--quarantine", str(q),
               "--dimensions", "helpfulness,honesty,instruction_following,truthfulness"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and f"cannot write {q}" in err and "No space left on device" in err
    assert not q.exists() and _leftovers(tmp_path) == []


def test_no_permission_is_one_line_too(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    src = _listwise_input(tmp_path)
    rc = main(["data", "convert", "-f", "listwise", str(src), str(locked / "x.parquet"), "--dimensions",
               "helpfulness,honesty,instruction_following,truthfulness"])
    assert rc == 1 and "EACCES" in capsys.readouterr().err


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "cache.json"
    storage.write_text(str(target), "old")
    monkeypatch.setattr(storage, "open", lambda p, m="r", *a, **k: _FullDisk(builtins.open(p, m, *a, **k), 1),
                        raising=False)
    with pytest.raises(StorageWriteError, match="cache.json"):
        storage.write_text(str(target), "new content")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_export_on_a_full_disk_leaves_no_half_model(tmp_path):
    """The export is saved into a hidden sibling and renamed: a save that fails half way leaves neither
    a partial directory nor a temporary one."""
    from raypo.train.checkpoint import _write_export

    class HalfModel:
        def save_pretrained(self, out, **_):
            with open(os.path.join(out, "model.safetensors"), "wb") as f:
                f.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "export"
    with pytest.raises(StorageWriteError, match=str(out)):
        _write_export(HalfModel(), None, str(out))
    assert os.listdir(tmp_path) == []
