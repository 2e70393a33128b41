"""Preference records in their real source schemas (openbmb/UltraFeedback, OpenAssistant oasst1)."""

from __future__ import annotations


def _uf_completion(model, response, ratings, overall=None, fine=None, system="You are a helpful assistant."):
    """One openbmb/UltraFeedback completion: every aspect annotation carries a *string* Rating."""
    annotations = {}
    for aspect, rating in ratings.items():
        if rating is _MISSING:
            continue
        ann = {"Rating": rating, "Rationale": f"The text is rated {rating} for {aspect}."}
        if aspect in ("helpfulness", "truthfulness"):
            ann["Rationale For Rating"] = "Accurate but brief."
            ann["Type"] = ["1", "2"]
        annotations[aspect] = ann
    comp = {"annotations": annotations, "critique": "Could be more detailed.", "custom_system_prompt": system,
            "model": model, "principle": "helpfulness", "response": response}
    if overall is not None:
        comp["overall_score"] = overall
    if fine is not None:
        comp["fine-grained_score"] = fine
    return comp


_MISSING = object()


def ultrafeedback_record() -> dict:
    """A record as in openbmb/UltraFeedback, with "N/A" and a missing annotation."""
    return {
        "source": "evol_instruct",
        "instruction": "Name three primary colors.",
        "models": ["gpt-4", "alpaca-7b", "pythia-12b", "starchat"],
        "completions": [
            _uf_completion("gpt-4", "Red, yellow and blue.",
                           {"helpfulness": "5", "honesty": "5", "instruction_following": "5",
                            "truthfulness": "5"},
                           overall=8.5, fine=5.0),
            _uf_completion("alpaca-7b", "Red, green and blue are the additive primaries.",
                           {"helpfulness": "4", "honesty": "N/A", "instruction_following": "4",
                            "truthfulness": "4"}, overall=7.0, fine=4.0),
            _uf_completion("pythia-12b", "Colors are nice.",
                           {"helpfulness": "1", "honesty": "2", "instruction_following": "1",
                            "truthfulness": _MISSING}, overall=2.0, fine=1.33),
            _uf_completion("starchat", "Purple, orange and pink.",
                           {"helpfulness": "2", "honesty": "3", "instruction_following": "2",
                            "truthfulness": "1"},
                           overall=3.0, fine=2.0, system="You are a poet."),
        ],
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
    }


def oasst_messages() -> list[dict]:
    """An OpenAssistant (oasst1) message tree: rows with message_id, parent_id, role, text, rank, ..."""
    base = {"user_id": "u", "created_date": "2023-02-05T14:23:50.983374+00:00", "lang": "en",
            "review_count": 3, "review_result": True, "deleted": False, "synthetic": False,
            "model_name": None,
            "message_tree_id": "t1", "tree_state": "ready_for_export", "emojis": None, "labels": None}

    def msg(mid, parent, role, text, rank=None, deleted=False):
        return {**base, "message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank,
                "deleted": deleted}

    return [
        msg("m0", None, "prompter", "What is a monad?"),
        msg("a1", "m0", "assistant", "A monad is a design pattern for chaining computations.", rank=0),
        msg("a2", "m0", "assistant", "A monad is a monoid in the category of endofunctors.", rank=1),
        msg("a3", "m0", "assistant", "No idea.", rank=2),
        msg("a4", "m0", "assistant", "Deleted reply.", rank=None, deleted=True),
        msg("p1", "a1", "prompter", "Give an example in Python."),
        msg("b1", "p1", "assistant", "Optional values: a Maybe wraps None checks.", rank=0),
        msg("b2", "p1", "assistant", "Lists with flat_map.", rank=0),  # a tie
        msg("b3", "p1", "assistant", "Unranked reply.", rank=None),
        msg("p2", "a2", "prompter", "Thanks."),
        msg("c1", "p2", "assistant", "You are welcome.", rank=0),  # only one reply: too few responses
    ]
