"""`raypo data convert | validate | synth` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from data_corpus import DIMS, corpus_lines
from data_records import ultrafeedback_record

from raypo.cli import main
from raypo.data.schema import dimensions_of


@pytest.mark.parametrize("action", ["convert", "validate", "synth"])
def test_help(action, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", action, "--help"])
    assert exc.value.code == 0
    assert "usage: raypo data " + action in capsys.readouterr().out


def test_help_from_a_real_process():
    cmd = [sys.executable, "-m", "raypo.cli", "data", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout and "synth" in out.stdout


def test_synth_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert main(["data", "synth", str(a), "--num-prompts", "20", "--seed", "4"]) == 0
    assert main(["data", "synth", str(b), "--num-prompts", "20", "--seed", "4"]) == 0
    assert a.read_bytes() == b.read_bytes()
    table = pq.read_table(a)
    assert table.num_rows == 20 and dimensions_of(table.schema)[0] == "helpfulness"
    assert main(["data", "validate", str(a)]) == 0
    assert "accepted rows          20" in capsys.readouterr().out


def test_convert_ultrafeedback_then_validate(tmp_path, capsys):
    src = tmp_path / "uf.jsonl"
    rec = ultrafeedback_record()
    src.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "completions": []}) + "\n")
    out_dir = tmp_path / "out"
    rc = main(["data", "convert", "--format", "ultrafeedback", str(src), str(out_dir),
               "--quarantine", str(tmp_path / "q.jsonl")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "too_few_responses" in text and "wrote 1 listwise rows" in text
    table = pq.read_table(out_dir / "part-00000.parquet")
    assert table.num_rows == 1 and len(dimensions_of(table.schema)) == 4
    assert json.loads((tmp_path / "q.jsonl").read_text())["reason"] == "too_few_responses"
    assert main(["data", "validate", str(out_dir), "--json", "--tokenizer", "tiny://llama"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_rows"] == report["accepted_rows"] == 1


def test_validate_fails_over_the_threshold_and_prints_counts(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(corpus_lines()))
    assert main(["data", "validate", str(path), "--dimensions", ",".join(DIMS)]) == 1
    captured = capsys.readouterr()
    assert "invalid_json" in captured.out and "FAIL" in captured.err
    args = ["data", "validate", str(path), "--dimensions", ",".join(DIMS), "--max-reject-fraction", "1"]
    assert main(args) == 0


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "nope.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_to_s3_and_back(s3, tmp_s3_prefix, tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p", "chosen": "A", "rejected": "B"}, {"prompt": "p", "chosen": "B", "rejected": "C"}]))
    assert main(["data", "convert", "-f", "pairwise", str(src), f"{tmp_s3_prefix}/pairs.parquet"]) == 0
    with s3.s3fs().open(f"{tmp_s3_prefix}/pairs.parquet".removeprefix("s3://"), "rb") as f:
        rows = pq.read_table(f).to_pylist()
    assert [r["responses"] for r in rows] == [["A", "B", "C"]]
    assert main(["data", "validate", f"{tmp_s3_prefix}/pairs.parquet"]) == 0
    assert "testing" not in capsys.readouterr().out  # credentials are never printed


def test_convert_with_every_row_rejected_fails_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "uf.jsonl"
    src.write_text(json.dumps({**ultrafeedback_record(), "completions": []}) + "\n")
    out_dir = tmp_path / "out"
    assert main(["data", "convert", "--format", "ultrafeedback", str(src), str(out_dir)]) == 1
    captured = capsys.readouterr()
    assert "too_few_responses" in captured.out
    assert "every one of the 1 input rows was rejected" in captured.err
    assert not out_dir.exists()


def test_rank_only_listwise_jsonl_validates_and_rated_jsonl_asks_for_dimension_names(tmp_path, capsys):
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("\n".join(json.dumps(r) for r in [
        {"prompt_id": "p1", "prompt": "Say hi", "responses": ["hi there", "hello", "go away"],
         "ranks": [1, 2, 3]},
        {"prompt_id": "p2", "prompt": "Add 2 and 2", "responses": ["4", "5"], "ranks": [1, 2]}]) + "\n")
    assert main(["data", "validate", str(ranked), "--format", "listwise", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_rows"] == report["accepted_rows"] == 2 and report["dimensions"] == []
    rated = tmp_path / "rated.jsonl"
    rated.write_text(json.dumps({"prompt_id": "p1", "prompt": "Say hi", "responses": ["a", "b"],
                                 "scores": [[1, 2], [3, 4]]}) + "\n")
    assert main(["data", "validate", str(rated), "--format", "listwise"]) == 2
    err = capsys.readouterr().err
    assert "JSON lines carry no schema metadata" in err and "2 rating(s) per response" in err
    assert main(["data", "validate", str(rated), "--format", "listwise", "--dimensions", "a,b"]) == 0
