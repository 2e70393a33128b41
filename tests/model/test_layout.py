"""Collate and the two token layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raypo.model.batch import ListwiseBatch, collate_listwise
from raypo.model.layout import prefix_sharing_mask, prefix_sharing_mask_mod, shared_layout, unshared_layout


def _batch() -> ListwiseBatch:
    rows = [
        {"prompt_ids": [10, 11, 12], "response_ids": [[20, 21], [30], [40, 41, 42]],
         "scores": [[1.0, None], [2.0, 0.5], [0.0, 3.0]], "ref_logps": [-1.0, -2.0, -3.0]},
        {"prompt_ids": [13], "response_ids": [[50, 51]], "scores": [[4.0, 4.0]], "ref_logps": [-4.0]},
    ]
    return collate_listwise(rows, num_responses=4)


def test_collate_pads_and_masks():
    batch = _batch()
    assert batch.num_groups == 2 and batch.num_responses == 4 and batch.max_response_len == 3
    assert batch.response_mask().tolist() == [[True, True, True, False], [True, False, False, False]]
    assert batch.response_lengths().tolist() == [[2, 1, 3, 0], [2, 0, 0, 0]]
    scores = batch.extras["scores"]
    assert scores.shape == (2, 4, 2)
    assert math.isnan(scores[0, 0, 1]) and math.isnan(scores[1, 1, 0]) and scores[0, 1, 1] == 0.5
    assert batch.extras["ref_logps"][0].tolist()[:3] == [-1.0, -2.0, -3.0]
    assert math.isnan(batch.extras["ref_logps"][1, 3])
    stats = batch.token_stats()
    assert stats == {"shared_tokens": 3 + 6 + 1 + 2, "unshared_tokens": 3 * 3 + 6 + 1 + 2,
                     "response_tokens": 8}


def test_collate_accepts_columns_and_numpy():
    cols = {"prompt_ids": [np.array([1, 2]), np.array([3])],
            "response_ids": [[np.array([4]), np.array([5, 6])], [np.array([7])]]}
    batch = collate_listwise(cols)
    assert batch.prompt_ids == [[1, 2], [3]] and batch.response_ids[0] == [[4], [5, 6]]
    assert batch.num_responses == 2


@pytest.mark.parametrize("rows, match", [
    ([{"prompt_ids": [], "response_ids": [[1]]}], "empty prompt"),
    ([{"prompt_ids": [1], "response_ids": [[1], []]}], "empty response"),
])
def test_collate_rejects_bad_rows(rows, match):
    with pytest.raises(ValueError, match=match):
        collate_listwise(rows)


def test_collate_rejects_too_small_width():
    with pytest.raises(ValueError, match="num_responses=1"):
        collate_listwise([{"prompt_ids": [1], "response_ids": [[1], [2]]}], num_responses=1)


def test_shared_layout():
    packed = shared_layout(_batch(), pad_token_id=0)
    # row 0: prompt(3) r0(2) r1(1) r2(3) = 9 tokens; row 1: prompt(1) r0(2) + 6 padding
    assert packed.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 40, 41, 42], [13, 50, 51] + [0] * 6]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]
    assert packed.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 3], [0, 1, 1] + [-1] * 6]
    # first token of every response is predicted by the last prompt token (position 2 / row 1's 9 + 0)
    assert packed.pred_index.tolist() == [2, 3, 2, 2, 6, 7, 9, 10]
    assert packed.target_ids.tolist() == [20, 21, 30, 40, 41, 42, 50, 51]
    rmax = 3
    assert packed.slot_index.tolist() == [0, 1, 1 * rmax, 2 * rmax, 2 * rmax + 1, 2 * rmax + 2, 4 * rmax,
                                          4 * rmax + 1]
    assert packed.num_tokens == 12


def test_unshared_layout():
    packed = unshared_layout(_batch(), pad_token_id=0)
    assert packed.input_ids.shape == (4, 6)
    assert packed.input_ids[2].tolist() == [10, 11, 12, 40, 41, 42]
    assert packed.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 0]
    assert packed.pred_index.tolist()[:3] == [2, 3, 6 + 2]
    assert packed.num_tokens == 5 + 4 + 6 + 3


def test_unshared_layout_without_responses_keeps_a_row():
    batch = _batch().select_responses(5, 7)
    assert batch.num_responses == 2 and not batch.response_mask().any()
    packed = unshared_layout(batch)
    assert packed.input_ids.shape[0] == 1 and packed.target_ids.numel() == 0


def test_pad_to_multiple_of():
    assert shared_layout(_batch(), pad_to_multiple_of=8).input_ids.shape == (2, 16)


def test_mask_rule():
    packed = shared_layout(_batch())
    mask = prefix_sharing_mask(packed.group_ids, packed.segment_ids)[0, 0]
    seg = packed.segment_ids[0]
    for q in range(9):
        for k in range(9):
            expected = k <= q and (seg[k] == 0 or seg[k] == seg[q])
            assert bool(mask[q, k]) == expected, (q, k)
    pad_rows = prefix_sharing_mask(packed.group_ids, packed.segment_ids)[1, 0, 3:]
    assert torch.equal(pad_rows, torch.eye(9, dtype=torch.bool)[3:])  # padding sees only itself


def test_dense_mask_equals_flex_mask_mod():
    from torch.nn.attention.flex_attention import create_mask

    packed = shared_layout(_batch())
    rows, length = packed.input_ids.shape
    dense = prefix_sharing_mask(packed.group_ids, packed.segment_ids)
    flex = create_mask(prefix_sharing_mask_mod(packed.group_ids, packed.segment_ids), rows, 1, length, length,
                       device="cpu")
    assert torch.equal(dense, flex)


def test_response_masks_select_scored_tokens():
    rows = [{"prompt_ids": [10, 11], "response_ids": [[20, 21, 22], [30, 31]],
             "response_masks": [np.array([0, 1, 1]), [1, 1]], "psi": [0.75, 0.25]}]
    batch = collate_listwise(rows)
    assert batch.response_masks == [[[0, 1, 1], [1, 1]]]
    assert batch.num_scored_tokens().tolist() == [[2, 2]] and batch.response_lengths().tolist() == [[3, 2]]
    assert batch.extras["psi"].tolist() == [[0.75, 0.25]]
    shared = shared_layout(batch)
    assert shared.input_ids[0].tolist() == [10, 11, 20, 21, 22, 30, 31]  # scaffolding stays in the context
    assert shared.target_ids.tolist() == [21, 22, 30, 31]
    assert shared.pred_index.tolist() == [2, 3, 1, 5]
    assert shared.slot_index.tolist() == [1, 2, 3, 4]
    unshared = unshared_layout(batch)
    assert unshared.target_ids.tolist() == [21, 22, 30, 31]
    assert batch.select_responses(1, 2).response_masks == [[[1, 1]]]


@pytest.mark.parametrize("masks, match", [([[1, 1]], "2 entries for 1 tokens"), ([[0]], "scores no token")])
def test_bad_response_masks(masks, match):
    with pytest.raises(ValueError, match=match):
        collate_listwise([{"prompt_ids": [1], "response_ids": [[5]], "response_masks": masks}])
