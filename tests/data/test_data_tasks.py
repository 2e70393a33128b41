"""The verifiable prompt family and its scorers (raypo.data.tasks): pure Python, no Ray."""

from __future__ import annotations

import json

from raypo.cli.main import main
from raypo.data import tasks


def test_prompts_are_seeded_distinct_and_heldout_is_disjoint() -> None:
    train, heldout = tasks.train_and_heldout(300, 60, seed=3)
    again, _ = tasks.train_and_heldout(300, 60, seed=3)
    other, _ = tasks.train_and_heldout(300, 60, seed=4)
    assert train == again and train != other
    texts = [r["prompt"][-1]["content"] for r in train]
    held = {r["prompt"][-1]["content"] for r in heldout}
    assert len(set(texts)) == 300 and len(held) == 60 and not held & set(texts)
    assert len({r["prompt_id"] for r in train + heldout}) == 360
    assert {r["task"]["kind"] for r in train} == set(tasks.KINDS)


def test_the_task_answer_is_what_the_prompt_asks() -> None:
    for row in tasks.prompt_rows(200, seed=0):
        text, task = row["prompt"][0]["content"], row["task"]
        assert f"at most {task['max_words']} words" in text and f"'{task['keyword']}'" in text
        if task["kind"] in ("add", "subtract", "multiply"):
            expr = text.removeprefix("What is ").split("?")[0]
            assert str(eval(expr)) == task["answer"]  # noqa: S307 - our own "a op b" text
        elif task["kind"] == "reverse":
            assert f"'{task['answer'][::-1]}'" in text


def test_scorers_on_hand_written_responses() -> None:
    task = {"answer": "-4", "max_words": 5, "keyword": "silver"}
    assert tasks.correctness("The answer is -4.", task) == 1.0
    assert tasks.correctness("It is -40, not 4", task) == 0.0
    assert tasks.includes_keyword("A SILVER -4!", task) == 1.0
    assert tasks.includes_keyword("silverware", task) == 0.0
    assert tasks.follows_length_limit("one two three four five", task) == 1.0
    assert tasks.follows_length_limit("one two three four five six", task) == 0.0
    assert tasks.conciseness("", task) == 1.0
    assert tasks.conciseness(" ".join(["w"] * 10), task) == 0.5


def test_at_least_two_dimensions_conflict() -> None:
    """The empty answer is the most concise but neither correct nor on keyword; the complete answer wins
    those and loses conciseness: the dimensions order the two responses oppositely."""
    task = {"answer": "42", "max_words": 8, "keyword": "river"}
    bare, full = "", "The answer is 42, river."
    s = {r: [getattr(tasks, d)(r, task) for d in tasks.DIMENSIONS] for r in (bare, full)}
    dims = dict(zip(tasks.DIMENSIONS, zip(s[bare], s[full])))
    assert dims["conciseness"][0] > dims["conciseness"][1]
    assert dims["correctness"][0] < dims["correctness"][1]
    assert dims["includes_keyword"][0] < dims["includes_keyword"][1]


def test_tasks_command_writes_1000_train_and_200_heldout(tmp_path, capsys) -> None:
    out = tmp_path / "prompts.jsonl"
    assert main(["data", "tasks", "--out", str(out), "--seed", "0"]) == 0
    train = [json.loads(line) for line in out.read_text().splitlines()]
    heldout = [json.loads(line) for line in (tmp_path / "prompts.heldout.jsonl").read_text().splitlines()]
    assert len(train) == 1000 and len(heldout) == 200
    assert train[0]["task"]["family"] == tasks.FAMILY
    assert "1000 training prompts" in capsys.readouterr().out
