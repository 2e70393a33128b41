"""The Ray Data pipeline on a local Ray cluster and the loopback S3 endpoint."""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
from data_corpus import DIMS, MAX_PROMPT, MAX_RESPONSE, corpus_lines, expected_rejections
from data_records import oasst_messages

from raypo.config import DataConfig, S3Config
from raypo.data.groups import convert_records
from raypo.data.pipeline import build_datasets, build_rows, convert_dataset, read_parquet, write_parquet
from raypo.data.schema import dimensions_of
from raypo.data.splits import epoch_sort_key, in_eval, shuffle_for_epoch

pytestmark = pytest.mark.integration


def _ids(ds) -> list[str]:
    return [r["prompt_id"] for r in ds.select_columns(["prompt_id"]).take_all()]


def test_build_datasets_matches_plain_python_and_splits_stably(synthetic_datasets, tiny_model_dir,
                                                               monkeypatch, tmp_path):
    import raypo.data.splits as splits

    cfg, train, evals, report = synthetic_datasets
    assert report.input_rows == report.accepted_rows == 96 and report.balanced
    assert dimensions_of(train.schema().base_schema) == report.dimensions == [
        "helpfulness", "honesty", "instruction_following", "truthfulness"]
    train_ids, eval_ids = set(_ids(train)), set(_ids(evals))
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 96 and 10 < len(eval_ids) < 40
    assert eval_ids == {f"synth-0-{i:06d}" for i in range(96) if in_eval(f"synth-0-{i:06d}", 0.25, 3)}

    # The plain-Python path produces the same rows, split the same way, whatever the shuffle seed.
    cfg = dataclasses.replace(cfg, shuffle_seed=99)
    rows_train, rows_eval, _ = build_rows(cfg, str(tiny_model_dir))
    assert {r["prompt_id"] for r in rows_eval} == eval_ids
    by_id = {r["prompt_id"]: r for r in rows_train}
    for row in train.take(5):
        ref = by_id[row["prompt_id"]]
        assert list(row["prompt_ids"]) == ref["prompt_ids"]
        assert [list(x) for x in row["response_ids"]] == ref["response_ids"]
        assert row["num_responses"] == len(row["response_ids"]) == len(row["scores"]) == 4

    # Tokenised rows are written back as Parquet with the dimension names in the schema.
    write_parquet(evals, str(tmp_path / "tok"), report.dimensions)
    schema = pq.read_schema(next((tmp_path / "tok").glob("*.parquet")))
    assert dimensions_of(schema) == report.dimensions and schema.metadata[b"raypo.schema"] == b"tokenized/1"

    # The per-epoch order: the driver-side reorder and the distributed sort agree.
    small = shuffle_for_epoch(evals, 5, 1)
    monkeypatch.setattr(splits, "DRIVER_SHUFFLE_LIMIT_BYTES", -1)
    assert _ids(shuffle_for_epoch(evals, 5, 1)) == _ids(small) == sorted(
        eval_ids, key=lambda p: epoch_sort_key(p, 5, 1))


def test_bad_row_corpus_through_ray_counts_exactly(ray_cluster, tiny_model_dir, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(corpus_lines()) + "\n")
    cfg = DataConfig(train_path=str(path), format="listwise", dimensions=list(DIMS),
                     max_prompt_length=MAX_PROMPT, max_response_length=MAX_RESPONSE, overlong="drop",
                     eval_fraction=0.0, max_reject_fraction=1.0, quarantine_path=str(tmp_path / "q.jsonl"))
    train, evals, report = build_datasets(cfg, str(tiny_model_dir))
    assert report.input_rows == len(corpus_lines())
    assert report.rejected == expected_rejections(with_tokenizer=True)
    assert report.accepted_rows == train.count() and evals.count() == 0 and report.balanced
    lines = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert len(lines) == report.rejected_rows
    _, _, plain = build_rows(cfg, str(tiny_model_dir))
    assert plain.to_dict() == report.to_dict()  # Ray and plain Python agree to the row

    cfg.max_reject_fraction = 0.01
    from raypo.data.validate import DataQualityError

    with pytest.raises(DataQualityError, match="rejected"):
        build_datasets(cfg, None)


def test_pairwise_merge_and_duplicates_through_ray(ray_cluster, tmp_path, monkeypatch):
    import raypo.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "DRIVER_GROUP_LIMIT", 0)  # the pairs are grouped by a Ray groupby here
    rows = [{"prompt": "p", "chosen": "A", "rejected": "B"}, {"prompt": "p", "chosen": "B", "rejected": "C"},
            {"prompt": "p", "chosen": "A", "rejected": "B"}, {"prompt": "q", "chosen": "x", "rejected": "y"},
            {"prompt": "r", "chosen": "s", "rejected": "s"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(format="pairwise", max_reject_fraction=1.0)
    ds, report, dims = convert_dataset(str(path), "pairwise", cfg)
    got = sorted((r["responses"], r["ranks"]) for r in ds.take_all())
    assert got == [(["A", "B", "C"], [1, 2, 3]), (["x", "y"], [1, 2])] and dims == []
    assert report.rejected == {"duplicate_row": 1, "identical_responses": 1} and report.accepted_rows == 3
    assert report.notes["pair_groups_merged"] == 1 and report.balanced

    # OpenAssistant message rows (JSONL) are assembled into ranked groups, as in plain Python.
    path = tmp_path / "oasst.jsonl"
    path.write_text("\n".join(json.dumps(m) for m in oasst_messages()))
    monkeypatch.undo()
    ds, report, _ = convert_dataset(str(path), "ranked", cfg)
    assert sorted(r["prompt_id"] for r in ds.take_all()) == ["m0", "p1"]
    assert report.to_dict() == convert_records(path.read_text().splitlines(), "ranked",
                                               source="convert").report.to_dict()


def test_s3_round_trip_via_s3fs_and_ray(ray_cluster, s3, tmp_s3_prefix, uf_record):
    import datasets

    # A Hugging Face dataset in UltraFeedback's schema -> listwise rows -> Parquet on S3 (Ray writer).
    hf = datasets.Dataset.from_list([uf_record, {**uf_record, "instruction": "Name two colors."}])
    cfg = DataConfig(s3=S3Config(endpoint_url=s3.endpoint_url, region=s3.region))
    ds, report, dims = convert_dataset(hf, "ultrafeedback", cfg, output=f"{tmp_s3_prefix}/uf")
    assert report.accepted_rows == 2 and dims[0] == "helpfulness"
    files = [f for f in s3.s3fs().find(f"{tmp_s3_prefix}/uf".removeprefix("s3://")) if f.endswith(".parquet")]
    assert files

    # Read back with s3fs + pyarrow: the dimension names are in the schema metadata.
    with s3.s3fs().open(files[0], "rb") as f:
        table = pq.read_table(f)
    assert dimensions_of(table.schema) == dims and table.column("scores").to_pylist()[0][1][1] is None

    # And with ray.data.read_parquet (s3fs filesystem from the config / environment).
    back = sorted(read_parquet(f"{tmp_s3_prefix}/uf", cfg.s3).take_all(), key=lambda r: r["prompt_id"])
    assert sorted(r["prompt_id"] for r in ds.take_all()) == [r["prompt_id"] for r in back]
    written = {r["prompt_id"]: r for r in ds.take_all()}
    assert back[0]["responses"] == written[back[0]["prompt_id"]]["responses"]

    # Round trip of a listwise dataset written back to S3 and trained from (s3:// train_path).
    write_parquet(read_parquet(f"{tmp_s3_prefix}/uf", cfg.s3), f"{tmp_s3_prefix}/again", dims, cfg.s3)
    cfg2 = DataConfig(train_path=f"{tmp_s3_prefix}/again", eval_fraction=0.0, s3=cfg.s3)
    train, _, rep = build_datasets(cfg2, None)
    assert rep.dimensions == dims and train.count() == 2
