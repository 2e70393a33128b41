"""``raypo data generate``: prompt rows checked and quarantined, seeded sampling on a Ray Data actor pool
(a tiny random Llama: what is tested is the plumbing and the seeding, not the text)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raypo.cli.main import main
from raypo.data.generate import GenerateSettings, generate_table, read_prompts
from raypo.data.schema import dimensions_of


def _prompt_file(tmp_path, extra_lines=()):
    lines = [json.dumps({"prompt_id": f"p{i}", "prompt": f"Say something about {w}.", "task": {"k": i}})
             for i, w in enumerate(["cats", "rain", "tea", "maps", "jazz"])]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return path


BAD_LINES = ('{"prompt": ""}', "not json", '{"prompt": "hi", "task": [1]}', "[1, 2]",
             json.dumps({"prompt_id": "p0", "prompt": "Say something about cats.", "task": {"k": 0}}),
             json.dumps({"prompt_id": "dup", "prompt": "a"}), json.dumps({"prompt_id": "dup", "prompt": "b"}))


def test_bad_prompt_rows_are_counted_by_reason(tmp_path) -> None:
    rows, rejected, report = read_prompts(str(_prompt_file(tmp_path, BAD_LINES)))
    assert [r["prompt_id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert dict(report.rejected) == {"empty_prompt": 1, "invalid_json": 1, "wrong_type": 1, "not_a_record": 1,
                                     "duplicate_row": 1, "duplicate_prompt_id": 2}
    assert report.input_rows == 12 and report.balanced
    assert rows[0]["prompt"] == [{"role": "user", "content": "Say something about cats."}]
    assert "not json" in {o.raw for o in rejected}


@pytest.mark.usefixtures("ray_cluster")
def test_responses_depend_on_the_seed_not_on_batching(tmp_path, tiny_model_dir) -> None:
    rows, _, _ = read_prompts(str(_prompt_file(tmp_path)))
    settings = GenerateSettings(num_responses=3, max_new_tokens=6, temperature=1.0, seed=7)
    one = generate_table(rows, str(tiny_model_dir), settings, batch_size=1)
    many = generate_table(rows, str(tiny_model_dir), settings, batch_size=4)
    assert one.column("prompt_id").to_pylist() == [r["prompt_id"] for r in rows]
    assert one.column("responses").to_pylist() == many.column("responses").to_pylist()
    responses = one.column("responses").to_pylist()
    assert all(len(r) == 3 for r in responses) and len({t for r in responses for t in r}) > 5
    other = generate_table(rows[:2], str(tiny_model_dir), GenerateSettings(3, 6, 1.0, seed=8), batch_size=2)
    assert other.column("responses").to_pylist() != responses[:2]
    meta = json.loads(one.column("metadata")[0].as_py())
    assert meta["task"] == {"k": 0} and meta["sampling"]["seed"] == 7 and len(meta["finished"]) == 3


@pytest.mark.usefixtures("ray_cluster")
def test_generate_command_writes_unscored_rows_and_the_quarantine(tmp_path, tiny_model_dir, capsys) -> None:
    out, quarantine = tmp_path / "gen.parquet", tmp_path / "bad.jsonl"
    code = main(["data", "generate", "--model", str(tiny_model_dir), "--prompts",
                 str(_prompt_file(tmp_path, BAD_LINES[:2])), "--out", str(out), "--num-responses", "2",
                 "--max-new-tokens", "4", "--batch-size", "2", "--quarantine", str(quarantine)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rejected rows           2" in printed and "wrote 5 prompts x 2 responses" in printed
    assert {json.loads(line)["reason"] for line in quarantine.read_text().splitlines()} == {
        "empty_prompt", "invalid_json"}
    table = pq.read_table(out)
    assert dimensions_of(table.schema) == [] and table.num_rows == 5
    assert table.column("scores").to_pylist() == [[[], []]] * 5
    assert main(["data", "generate", "--model", str(tiny_model_dir), "--prompts", str(out), "--out",
                 str(out), "--num-responses", "0"]) == 2
