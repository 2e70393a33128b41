"""Hugging Face ``datasets`` as sources: ``save_to_disk`` directories and ``hf://`` paths read through
``datasets.load_dataset``, with the same validation and accounting as files (raypo.data.hf_source)."""

from __future__ import annotations

import json
import time

import pytest

from raypo.cli.main import EXIT_RUN, main
from raypo.config import load_config

ROWS = [
    {"prompt_id": "a", "prompt": "2+2?", "responses": ["4", "5", "22"], "scores": [[3.0], [1.0], [0.0]]},
    {"prompt_id": "b", "prompt": "capital?", "responses": ["Paris", "Lyon"], "scores": [[2.0], [1.0]]},
    {"prompt_id": "c", "prompt": "one response only", "responses": ["x"], "scores": [[1.0]]},  # rejected
    {"prompt_id": "a", "prompt": "2+2?", "responses": ["4", "5", "22"], "scores": [[3.0], [1.0], [0.0]]},
]


def validate_json(capsys, *args: str) -> dict:
    code = main(["data", "validate", *args, "--dimensions", "correctness", "--max-reject-fraction", "1",
                 "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


@pytest.fixture
def saved(tmp_path):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


def test_a_save_to_disk_dataset_is_validated_and_counted_like_the_same_rows_as_jsonl(saved, tmp_path, capsys):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    from_disk = validate_json(capsys, str(saved))
    from_file = validate_json(capsys, str(jsonl))
    assert from_disk["input_rows"] == 4 and from_disk["accepted_rows"] == 2
    for key in ("input_rows", "accepted_rows", "rejected", "output_rows"):
        assert from_disk[key] == from_file[key], key


def test_a_dataset_dict_uses_the_named_or_default_split(tmp_path, capsys):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(path))
    assert validate_json(capsys, str(path))["input_rows"] == 2  # train by default
    assert validate_json(capsys, f"{path}?split=test")["input_rows"] == 1
    assert main(["data", "validate", f"{path}?split=dev", "--dimensions", "correctness"]) == EXIT_RUN
    assert "has splits train, test" in capsys.readouterr().err


def test_hf_scheme_loads_a_local_json_file_through_load_dataset(tmp_path, capsys):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    report = validate_json(capsys, f"hf://{jsonl}")
    assert report["input_rows"] == 2 and report["accepted_rows"] == 2


def test_a_hub_name_fails_at_once_saying_to_pass_a_local_path(capsys):
    start = time.time()
    assert main(["data", "validate", "hf://someorg/some-preferences", "--dimensions", "h"]) == EXIT_RUN
    err = capsys.readouterr().err
    assert "cannot be downloaded here" in err and "save_to_disk" in err and "someorg/some-preferences" in err
    assert time.time() - start < 30  # no network retries


def test_training_data_from_a_save_to_disk_dataset_on_ray(ray_cluster, saved, tiny_model_dir):
    from raypo.data.pipeline import build_datasets

    cfg = load_config(None, [f"data.train_path={saved}", "data.dimensions=[correctness]",
                             "data.eval_fraction=0.0", "data.max_reject_fraction=0.6"])
    train, evals, report = build_datasets(cfg.data, tokenizer_path=str(tiny_model_dir))
    assert report.input_rows == 4 and report.accepted_rows == 2 and report.rejected["duplicate_row"] == 1
    rows = train.take_all()
    assert sorted(r["prompt_id"] for r in rows) == ["a", "b"] and evals.count() == 0
    assert sorted(len(r["response_ids"]) for r in rows) == [2, 3]  # a: 3 responses, b: 2
