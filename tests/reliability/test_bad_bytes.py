"""Bad bytes and the quarantine: a line that is not UTF-8 is one counted ``invalid_utf8`` rejection (with its
line number and byte offset) in `raypo data` and in the Ray Data read path of `raypo train`; a UTF-8 BOM is
accepted; the quarantine goes exactly where it is asked, with the raw input line of every rejected row."""

from __future__ import annotations

import json

from raypo.cli import main
from raypo.config import DataConfig
from raypo.data.pipeline import build_datasets, process_rows

GOOD = '{"prompt_id":"b","prompt":"x","responses":["a","b"],"scores":[[1],[2]]}'
BAD = b'{"prompt_id":"a","prompt":"caf\xe9","responses":["a","b"],"scores":[[1],[2]]}'  # latin-1 e-acute
BOM = b"\xef\xbb\xbf"


def _write(tmp_path, *lines: bytes, name: str = "x.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_the_issue_s_file_is_one_counted_rejection_not_a_failure(tmp_path, capsys):
    path = _write(tmp_path, BAD)
    assert main(["data", "validate", str(path), "--dimensions", "h", "--json"]) == 1  # 100% rejected
    report = json.loads(capsys.readouterr().out)
    assert report["input_rows"] == 1 and report["rejected"] == {"invalid_utf8": 1}


def test_invalid_utf8_names_line_and_byte_offset_and_the_rest_is_kept(tmp_path):
    path = _write(tmp_path, BOM + GOOD.encode(), BAD, GOOD.replace('"b"', '"c"', 1).encode())
    q = tmp_path / "q.jsonl"
    cfg = DataConfig(train_path=str(path), dimensions=["h"], quarantine_path=str(q))
    rows, report, _ = process_rows(str(path), cfg, None, "validate")
    assert report.rejected == {"invalid_utf8": 1} and report.accepted_rows == 2 and report.balanced
    assert {r["prompt_id"] for r in rows} == {"b", "c"}  # the BOM line is accepted
    (line,) = [json.loads(x) for x in q.read_text().splitlines()]
    offset = len(BOM) + len(GOOD) + 1 + BAD.index(b"\xe9")
    assert f"line 2 of {path}" in line["detail"] and f"byte offset {offset}" in line["detail"]
    assert "0xe9" in line["detail"] and line["row"] == BAD.decode("utf-8", "backslashreplace")


def test_ray_data_read_path_counts_invalid_utf8_like_plain_python(ray_cluster, tmp_path):
    path = _write(tmp_path, BOM + GOOD.encode(), BAD, GOOD.replace('"b"', '"c"', 1).encode())
    cfg = DataConfig(train_path=str(path), dimensions=["h"], eval_fraction=0.0, max_reject_fraction=1.0,
                     quarantine_path=str(tmp_path / "q.jsonl"))
    train, _, report = build_datasets(cfg, None)
    assert report.rejected == {"invalid_utf8": 1} and report.accepted_rows == train.count() == 2
    (line,) = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert line["reason"] == "invalid_utf8" and "line 2 of" in line["detail"]
    _, plain, _ = process_rows(str(path), cfg, None, "train")
    assert plain.to_dict()["rejected"] == report.to_dict()["rejected"]


def test_validate_honours_the_quarantine_path_exactly(tmp_path, capsys):
    path = _write(tmp_path, b"not json")
    q = tmp_path / "q.jsonl"
    assert main(["data", "validate", str(path), "--dimensions", "h", "--quarantine", str(q)]) == 1
    assert q.exists() and not (tmp_path / "q.validate.jsonl").exists()
    assert json.loads(q.read_text())["reason"] == "invalid_json"


def test_cross_row_rejects_quarantine_the_raw_input_line(tmp_path):
    """Duplicates are found after conversion; their quarantine lines still hold the input line verbatim
    (key order and spacing included), not a re-serialised record."""
    dup_a = '{"scores": [[1], [2]], "prompt_id": "d", "prompt": "p", "responses": ["x", "y"]}'
    dup_b = '{"prompt_id":"d",   "prompt":"p","responses":["x","z"],"scores":[[1],[2]]}'
    copy = '{ "prompt_id": "b", "prompt": "x", "responses": ["a","b"], "scores": [[1],[2]] }'
    path = _write(tmp_path, GOOD.encode(), copy.encode(), dup_a.encode(), dup_b.encode())
    q = tmp_path / "q.jsonl"
    cfg = DataConfig(train_path=str(path), dimensions=["h"], quarantine_path=str(q))
    _, report, _ = process_rows(str(path), cfg, None, "convert")
    assert report.rejected == {"duplicate_prompt_id": 2, "duplicate_row": 1}
    by_reason = {}
    for line in map(json.loads, q.read_text().splitlines()):
        by_reason.setdefault(line["reason"], set()).add(line["row"])
    assert by_reason["duplicate_prompt_id"] == {dup_a, dup_b}
    assert by_reason["duplicate_row"] <= {GOOD, copy} and len(by_reason["duplicate_row"]) == 1
