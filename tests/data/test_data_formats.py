"""Each converter on records in its real source schema."""

from __future__ import annotations

import json

import pytest

from raypo.data.formats import ConvertOptions, convert_row
from raypo.data.groups import assemble_oasst, convert_records
from raypo.data.schema import derive_prompt_id, split_key

# ---------------------------------------------------------------------------------------------------- UF


def test_ultrafeedback_string_ratings_na_and_missing_annotations(uf_record):
    res = convert_records([uf_record], "ultrafeedback")
    assert res.report.accepted_rows == 1 and res.report.balanced
    rec = res.records[0]
    assert res.dimensions == ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    assert rec.prompt == [{"role": "user", "content": "Name three primary colors."}]
    assert rec.responses[0] == "Red, yellow and blue." and len(rec.responses) == 4
    assert rec.scores == [[5.0, 5.0, 5.0, 5.0], [4.0, None, 4.0, 4.0], [1.0, 2.0, 1.0, None],
                          [2.0, 3.0, 2.0, 1.0]]
    assert res.report.repaired["missing_rating"] == 1  # one row repaired ("N/A" and a missing aspect)
    meta = json.loads(rec.metadata)
    assert meta["source"] == "evol_instruct" and meta["models"][0] == "gpt-4"
    assert "custom_system_prompts" not in meta
    assert split_key(rec.prompt_id).startswith("h")  # no id in UltraFeedback: derived from the content


def test_ultrafeedback_extras_and_system_prompts(uf_record):
    opts = ConvertOptions(dimensions=["helpfulness", "overall_score", "fine-grained_score"],
                          keep_system_prompt=True)
    res = convert_records([uf_record], "ultrafeedback", opts)
    rec = res.records[0]
    assert [s[1] for s in rec.scores] == [8.5, 7.0, 2.0, 3.0]
    assert [s[2] for s in rec.scores] == [5.0, 4.0, 1.33, 2.0]
    assert json.loads(rec.metadata)["custom_system_prompts"][3] == "You are a poet."


@pytest.mark.parametrize("rating, reason", [("five", "unparseable_rating"), ("7", "rating_out_of_range"),
                                            ("0", "rating_out_of_range"), ("nan", "non_finite_score")])
def test_ultrafeedback_bad_ratings_are_rejected(uf_record, rating, reason):
    uf_record["completions"][1]["annotations"]["helpfulness"]["Rating"] = rating
    out = convert_row("ultrafeedback", uf_record, ConvertOptions())
    assert out.reason == reason and "completions[1].annotations.helpfulness" in out.detail


def test_ultrafeedback_all_annotations_missing_still_has_labels_elsewhere(uf_record):
    for comp in uf_record["completions"]:
        comp.pop("annotations")
    out = convert_row("ultrafeedback", uf_record, ConvertOptions())
    assert out.reason == "no_labels"


def test_ultrafeedback_empty_completion_is_dropped_and_counted(uf_record):
    uf_record["completions"][2]["response"] = "   "
    res = convert_records([uf_record], "ultrafeedback")
    assert len(res.records[0].responses) == 3 and res.report.repaired["dropped_empty_response"] == 1


# ---------------------------------------------------------------------------------------------------- ranked


def test_ranked_parallel_lists_with_ties():
    row = {"prompt": "Pick a fruit.", "responses": ["apple", "pear", "plum"], "ranks": [1, 1, 3]}
    rec = convert_records([row], "ranked").records[0]
    assert rec.ranks == [1, 1, 3] and rec.scores == [[], [], []]


def test_ranked_completion_objects_drop_unranked():
    row = {"prompt_id": 7, "prompt": [{"role": "user", "content": "Hi"}],
           "completions": [{"text": "Hello!", "rank": 2}, {"text": "Hey.", "rank": 1},
                           {"text": "Yo", "rank": None}]}
    res = convert_records([row], "ranked")
    rec = res.records[0]
    assert rec.prompt_id == "7" and rec.responses == ["Hello!", "Hey."] and rec.ranks == [2, 1]
    assert res.report.repaired["dropped_unranked_response"] == 1
    assert res.report.repaired["prompt_id_to_string"] == 1


def test_openassistant_message_tree(oasst_rows):
    groups, notes = assemble_oasst(oasst_rows)
    assert notes["oasst_messages"] == len(oasst_rows) and notes["oasst_deleted_messages"] == 1
    res = convert_records(oasst_rows, "ranked")  # detects the tree itself
    by_id = {r.prompt_id: r for r in res.records}
    root = by_id["m0"]
    assert root.responses == ["A monad is a design pattern for chaining computations.",
                              "A monad is a monoid in the category of endofunctors.", "No idea."]
    assert root.ranks == [1, 2, 3]  # oasst's 0-based sibling rank -> 1-based, the deleted reply skipped
    follow_up = by_id["p1"]
    assert [m["role"] for m in follow_up.prompt] == ["user", "assistant", "user"]
    assert follow_up.prompt[1]["content"].startswith("A monad is a design pattern")
    assert follow_up.ranks == [1, 1]  # a tie; the unranked reply dropped (repair)
    assert res.report.rejected == {"too_few_responses": 1}  # p2 has a single reply
    assert res.report.input_rows == 3 and res.report.balanced


# -------------------------------------------------------------------------------------------------- pairwise


def test_pairwise_trl_standard_conversational_and_implicit_prompt():
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": [{"role": "user", "content": "What color is the sky?"}],
         "chosen": [{"role": "assistant", "content": "It is blue."}],
         "rejected": [{"role": "assistant", "content": "It is green."}]},
        {"chosen": [{"role": "user", "content": "What color is grass?"},
                    {"role": "assistant", "content": "Green."}],
         "rejected": [{"role": "user", "content": "What color is grass?"},
                      {"role": "assistant", "content": "Red."}]},
    ]
    res = convert_records(rows, "pairwise")
    assert res.report.accepted_rows == 3 and res.report.output_rows == 3
    grass = next(r for r in res.records if r.prompt[0]["content"] == "What color is grass?")
    assert grass.responses == ["Green.", "Red."] and grass.ranks == [1, 2] and grass.scores == [[], []]


def test_pairwise_ultrafeedback_binarized_shape():
    """HuggingFaceH4/ultrafeedback_binarized: the prompt is repeated inside chosen/rejected."""
    row = {"prompt": "Say hi", "prompt_id": "abc",
           "chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
           "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}],
           "score_chosen": 8.0, "score_rejected": 3.0}
    rec = convert_records([row], "pairwise").records[0]
    assert rec.prompt_id == "abc" and rec.responses == ["Hi!", "No."]


def test_pairwise_merge_consistent_pairs_into_one_ranked_list():
    p = "Rank the answers."
    rows = [{"prompt": p, "chosen": "A", "rejected": "B"}, {"prompt": p, "chosen": "B", "rejected": "C"},
            {"prompt": p, "chosen": "A", "rejected": "C"}, {"prompt": p, "chosen": "A", "rejected": "B"}]
    res = convert_records(rows, "pairwise")
    assert res.report.output_rows == 1 and res.report.accepted_rows == 3
    assert res.report.rejected == {"duplicate_row": 1}
    rec = res.records[0]
    assert rec.responses == ["A", "B", "C"] and rec.ranks == [1, 2, 3]
    assert rec.prompt_id == derive_prompt_id(rec.prompt, ["A", "B", "C"])
    assert res.report.notes["pair_groups_merged"] == 1 and res.report.notes["pairs_merged"] == 3
    # Order-independent: the same pairs in another order give the same row.
    again = convert_records(rows[::-1], "pairwise").records[0]
    assert again.to_row() == rec.to_row()


def test_pairwise_inconsistent_or_partial_orders_stay_pairs():
    rows = [{"prompt_id": "q", "prompt": "x", "chosen": "A", "rejected": "B"},
            {"prompt_id": "q", "prompt": "x", "chosen": "B", "rejected": "A"},  # a cycle
            {"prompt": "y", "chosen": "A", "rejected": "B"}, {"prompt": "y", "chosen": "A", "rejected": "C"}]
    res = convert_records(rows, "pairwise")
    assert res.report.output_rows == 4 and res.report.notes["pair_groups_not_mergeable"] == 2
    ids = sorted(r.prompt_id for r in res.records)
    assert len(set(ids)) == 4 and sum(i.startswith("q#") for i in ids) == 2
    assert len({split_key(i) for i in ids}) == 2  # same prompt -> same side of the train/eval split
    unmerged = convert_records(rows[2:], "pairwise", ConvertOptions(merge_pairs=False))
    assert unmerged.report.output_rows == 2


def test_pairwise_prompt_mismatch_and_multi_turn_response():
    bad = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
           "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}
    assert convert_row("pairwise", bad, ConvertOptions()).reason == "prompt_mismatch"
    two_turns = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    multi = {"prompt": "p", "chosen": two_turns, "rejected": "c"}
    assert convert_row("pairwise", multi, ConvertOptions()).reason == "unsupported_response"


# ---------------------------------------------------------------------------------------------------- scored


def test_scored_reward_model_output_schema():
    """princeton-nlp/llama3-ultrafeedback-armorm style: all_generated_responses + all_rm_scores."""
    row = {"prompt_id": "p1", "prompt": "Write a haiku.",
           "all_generated_responses": ["An old silent pond", "Haiku is hard", "Leaves fall, quietly"],
           "all_rm_scores": [0.1523, -0.0213, 0.0931],
           "chosen": [], "rejected": []}
    res = convert_records([row], "scored")
    rec = res.records[0]
    assert res.dimensions == ["score"] and rec.scores == [[0.1523], [-0.0213], [0.0931]]


def test_scored_missing_score_is_rejected_and_numeric_string_repaired():
    row = {"prompt": "q", "responses": ["a", "b"], "scores": ["0.5", None]}
    assert convert_row("scored", row, ConvertOptions()).reason == "missing_score"
    row["scores"] = ["0.5", 1]
    res = convert_records([row], "scored")
    assert res.records[0].scores == [[0.5], [1.0]] and res.report.repaired["numeric_string_score"] == 1


# -------------------------------------------------------------------------------------------------- listwise


def test_listwise_round_trip_and_string_prompt():
    row = {"prompt_id": "x1", "prompt": "Hello", "responses": ["a", "b", "c"],
           "scores": [[1, None], [2, 3], [3, 1]], "ranks": [3, 2, 1], "ref_logps": [-1.0, -2.0, -3.0]}
    res = convert_records([row], "listwise", ConvertOptions(dimensions=["u", "v"]))
    rec = res.records[0]
    assert rec.prompt == [{"role": "user", "content": "Hello"}] and rec.scores[0] == [1.0, None]
    assert rec.ranks == [3, 2, 1] and rec.ref_logps == [-1.0, -2.0, -3.0]
    assert res.report.repaired["string_prompt_to_messages"] == 1


def test_jsonl_lines_are_parsed_by_the_converter():
    line = json.dumps({"prompt": "q", "responses": ["a", "b"], "scores": [[1.0], [2.0]]})
    res = convert_records([line, "{not json"], "listwise", ConvertOptions(dimensions=["s"]))
    assert res.report.accepted_rows == 1 and res.report.rejected == {"invalid_json": 1}


def test_openassistant_tree_from_jsonl_lines(oasst_rows):
    lines = [json.dumps(m) for m in oasst_rows] + ["{broken"]
    res = convert_records(lines, "ranked")
    assert {r.prompt_id for r in res.records} == {"m0", "p1"}
    assert res.report.rejected == {"too_few_responses": 1, "invalid_json": 1} and res.report.balanced
