"""``raypo data score``: scorer functions as a Ray Data stage; a failing scorer leaves a counted gap."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raypo.cli.main import main
from raypo.data.io import write_table
from raypo.data.schema import dimensions_of, listwise_schema
from raypo.data.scoring import load_scorer, score_table

pytestmark = pytest.mark.usefixtures("ray_cluster")


def raises_on_long(response: str, task: dict) -> float:
    """A user scorer that fails on some responses (here: more than three words)."""
    if len(response.split()) > 3:
        raise RuntimeError("cannot rate long responses")
    return float(len(response))


def returns_text(response: str, task: dict):
    return "good"


def _generated(tmp_path):
    task = {"answer": "42", "max_words": 4, "keyword": "river"}
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
             "responses": ["42 river", "The answer is 42 by the river", ""], "scores": [[], [], []],
             "ranks": None, "ref_logps": None, "ref_entropy": None,
             "metadata": json.dumps({"task": task})} for i in range(3)]
    import pyarrow as pa

    path = tmp_path / "gen.parquet"
    write_table(pa.Table.from_pylist(rows, schema=listwise_schema([])), str(path))
    return path


def test_a_raising_scorer_gives_missing_ratings_that_are_counted(tmp_path) -> None:
    table = pq.read_table(_generated(tmp_path))
    specs = ["raypo.data.tasks:correctness", f"{__name__}:raises_on_long=length",
             f"{__name__}:returns_text"]
    scored, report = score_table(table, specs, batch_size=2)
    assert dimensions_of(scored.schema) == ["correctness", "length", "returns_text"]
    scores = scored.column("scores").to_pylist()
    assert [s[0] for s in scores] == [[1.0, 8.0, None]] * 3
    assert [s[1] for s in scores] == [[1.0, None, None]] * 3  # the long response: no length rating
    assert report.failed["length"] == 3 and report.failed["returns_text"] == 9
    assert report.failed["correctness"] == 0 and report.ratings == 27
    assert "cannot rate long responses" in report.format()


def test_score_command_writes_trainable_listwise_rows(tmp_path, capsys) -> None:
    from raypo.config import DataConfig
    from raypo.data.pipeline import process_rows

    out = tmp_path / "scored.parquet"
    assert main(["data", "score", str(_generated(tmp_path)), "--out", str(out)]) == 0
    assert "failed ratings (stored as missing) 0" in capsys.readouterr().out
    rows, report, dims = process_rows(str(out), DataConfig(train_path=str(out)), None, "check")
    assert dims == ["correctness", "follows_length_limit", "includes_keyword", "conciseness"]
    assert report.accepted_rows == 3 and len(rows[0]["responses"]) == 2  # the empty response is dropped
    assert rows[0]["scores"][0][:3] == [1.0, 1.0, 1.0] and rows[0]["scores"][1][:3] == [1.0, 0.0, 1.0]


def test_bad_scorer_specs_are_named(tmp_path, capsys) -> None:
    for spec, words in (("nocolon", "module:function"), ("raypo.nope:f", "cannot import"),
                        ("raypo.data.tasks:nope", "no function")):
        with pytest.raises(ValueError, match=words):
            load_scorer(spec)
    assert main(["data", "score", str(_generated(tmp_path)), "--out", str(tmp_path / "o.parquet"),
                 "--scorer", "raypo.data.tasks:correctness", "--scorer", "raypo.data.tasks:correctness"]) == 2
    assert "repeat" in capsys.readouterr().err
