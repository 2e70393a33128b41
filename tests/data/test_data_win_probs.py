"""The listwise format's optional win-probability matrix (docs/data.md §1, "listwise"): validated, carried
through tokenisation and collation, and read by ``loss.lipo_labels: matrix`` (docs/losses.md)."""

from __future__ import annotations

import torch

from raypo.config import config_from_dict
from raypo.data.formats import ConvertOptions
from raypo.data.groups import convert_records
from raypo.data.pipeline import process_rows
from raypo.model.batch import collate_listwise
from raypo.train.objective import Objective

W = [[None, 0.9, 0.6], [0.1, None, 0.3], [0.4, 0.7, None]]


def _row(win_probs, responses=("a", "b", "c")) -> dict:
    return {"prompt_id": "w1", "prompt": "Hello", "responses": list(responses),
            "scores": [[1.0], [2.0], [3.0]], "win_probs": win_probs}


def test_bad_matrices_are_rejected_with_the_reason() -> None:
    bad = [[[0.5, 0.9], [0.1, 0.5]],  # 2 x 2 for 3 responses
           [[None, 0.9, 0.6], [0.1, None], [0.4, 0.7, None]],  # a short row
           [[None, 1.5, 0.6], [0.1, None, 0.3], [0.4, 0.7, None]],  # not a probability
           [[None, None, 0.6], [0.1, None, 0.3], [0.4, 0.7, None]]]  # a missing off-diagonal entry
    for i, matrix in enumerate(bad):
        row = dict(_row(matrix), prompt_id=f"bad{i}")
        res = convert_records([row], "listwise", ConvertOptions(dimensions=["s"]))
        assert res.report.rejected == {"invalid_win_probs": 1}, matrix
    ok = convert_records([_row(W)], "listwise", ConvertOptions(dimensions=["s"]))
    assert ok.report.accepted_rows == 1 and ok.records[0].win_probs == W


def test_dropping_an_empty_response_drops_its_row_and_column() -> None:
    res = convert_records([_row(W, responses=("a", " ", "c"))], "listwise", ConvertOptions(dimensions=["s"]))
    assert res.records[0].win_probs == [[None, 0.6], [0.4, None]]


def test_matrix_reaches_the_lipo_labels(tmp_path, data_cfg, tiny_tokenizer) -> None:
    import json

    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(_row(W)) + "\n" + json.dumps(dict(_row(None), prompt_id="w2")) + "\n")
    rows, report, _ = process_rows(str(path), data_cfg(train_path=str(path), format="listwise",
                                                       dimensions=["s"]), tiny_tokenizer)
    assert report.accepted_rows == 2
    with_matrix = [r for r in rows if r["prompt_id"] == "w1"]
    assert with_matrix[0]["win_probs"] == W
    batch = collate_listwise(with_matrix)
    assert batch.extras["win_probs"].shape == (1, 3, 3)
    obj = Objective.from_config(config_from_dict({"loss": {"name": "lipo_lambda", "lipo_labels": "matrix"}}),
                                ["s"])
    psi = obj.labels(batch, torch.device("cpu"))
    # psi_k = (1/K) sum_i W_ki with W_kk = 0.5 (LiPO paper, Sec. 5).
    expected = torch.tensor([[(0.5 + 0.9 + 0.6) / 3, (0.1 + 0.5 + 0.3) / 3, (0.4 + 0.7 + 0.5) / 3]])
    torch.testing.assert_close(psi, expected)
