"""Evaluation by generation (raypo.eval.by_generation, ``raypo eval --generate``): the win-rate rule with
ties and missing ratings, per-dimension means, lengths, the JSON object, lambdas of a conditioned model
(the reference generated once), bad prompt rows quarantined, a failing scorer counted, and the CLI on a
tiny random model (local and on Ray Data)."""

from __future__ import annotations

import json
import shutil

import pytest

from raypo.cli.main import main
from raypo.data.conditioning import PromptConditioning
from raypo.eval.by_generation import (
    WIN_RULE,
    GenerationEvalError,
    GenerationEvalSettings,
    compare,
    evaluate_by_generation,
    format_generation_table,
    length_stats,
)
from raypo.eval.models import EvalModel

DIMS = ["correctness", "follows_length_limit", "includes_keyword", "conciseness"]
RESULT_KEYS = {"lambda", "mean_score", "reference_mean_score", "win_rate", "wins", "ties", "losses",
               "compared", "mean_words", "mean_tokens", "failed_ratings"}


def test_win_rate_counts_ties_half_and_skips_missing_ratings():
    policy = [[1.0, 0.2], [0.0, 0.5], [1.0, None], [0.0, 0.9]]
    reference = [[0.0, 0.2], [0.0, 0.1], [1.0, 0.3], [1.0, None]]
    out = compare(policy, reference, ["a", "b"])
    # a: win, tie, tie, loss -> (1 + 0.5 + 0.5 + 0) / 4; b: tie, win (the other two miss a rating)
    assert out["win_rate"] == {"a": 0.5, "b": 0.75}
    assert (out["wins"], out["ties"], out["losses"]) == ({"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": 1, "b": 0})
    assert out["compared"] == {"a": 4, "b": 2}
    assert out["mean_score"] == {"a": 0.5, "b": pytest.approx((0.2 + 0.5 + 0.9) / 3)}  # every rated response
    assert out["reference_mean_score"] == {"a": 0.5, "b": pytest.approx(0.15)}  # the compared prompts only
    same = compare(reference, reference, ["a", "b"])
    assert same["win_rate"] == {"a": 0.5, "b": 0.5} and same["losses"] == {"a": 0, "b": 0}
    none = compare([[None]], [[1.0]], ["a"])
    assert none["win_rate"] == {"a": None} and none["compared"] == {"a": 0}
    assert none["mean_score"] == {"a": None}


def test_lengths_in_words_and_tokens():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            assert add_special_tokens is False
            return {"input_ids": list(text.replace(" ", ""))}  # one token per non-space character

    assert length_stats(["one two three", "", "x"], Tok()) == {"mean_words": pytest.approx(4 / 3),
                                                                "mean_tokens": pytest.approx(12 / 3)}
    assert length_stats(["a b"])["mean_tokens"] is None


@pytest.fixture
def prompts(tmp_path):
    """Three task prompts (raypo data tasks' rows) and two bad rows."""
    from raypo.data.tasks import prompt_rows

    path = tmp_path / "heldout.jsonl"
    rows = [json.dumps(r) for r in prompt_rows(3, 0, split="heldout")]
    path.write_text("\n".join(rows[:2] + ["{not json", '{"prompt": ""}', rows[2]]) + "\n")
    return path


class FakeGenerator:
    """Fixed responses per model source; records every call (source, the prompt texts seen)."""

    def __init__(self, responses):
        self.responses, self.calls = responses, []

    def __call__(self, source, rows):
        self.calls.append((source, [r["prompt"][-1]["content"] for r in rows]))
        return [self.responses[source](r) for r in rows]


def _answer(row) -> str:
    return row["task"]["answer"]  # the prompt row's task carries the expected answer


def test_the_generation_object(tiny_model_dir, prompts, tmp_path):
    model = EvalModel(str(tiny_model_dir), {"reference": "REF", "dimensions": DIMS}, None)
    fake = FakeGenerator({"REF": lambda r: "I do not know the answer to this question at all, sorry",
                          str(tiny_model_dir): lambda r: f"{_answer(r)} {r['task']['keyword']}"})
    quarantine, responses = tmp_path / "bad.jsonl", tmp_path / "responses.jsonl"
    gen = evaluate_by_generation(model, str(prompts), scorers=None, generator=fake,
                                 quarantine=str(quarantine), responses_out=str(responses),
                                 settings=GenerationEvalSettings(max_new_tokens=8))
    assert json.loads(json.dumps(gen, allow_nan=False)) == gen  # strict JSON
    assert gen["num_prompts"] == 3 and gen["rejected_rows"] == 2
    assert gen["rejected"] == {"empty_prompt": 1, "invalid_json": 1}
    assert [json.loads(line)["reason"] for line in quarantine.read_text().splitlines()] == \
        ["invalid_json", "empty_prompt"]
    assert gen["dimensions"] == DIMS and gen["win_rule"] == WIN_RULE and gen["quarantine"] == str(quarantine)
    assert gen["settings"] == {"max_new_tokens": 8, "temperature": 0.0, "seed": 0}
    assert gen["reference"]["source"] == "REF" and gen["reference"]["mean_words"] == 12
    assert gen["reference"]["mean_score"]["correctness"] == 0.0
    [result] = gen["results"]  # an unconditioned model: generated once
    assert set(result) == RESULT_KEYS and result["lambda"] is None
    assert result["mean_score"]["correctness"] == 1.0 and result["mean_score"]["includes_keyword"] == 1.0
    assert result["win_rate"]["correctness"] == 1.0 and result["win_rate"]["conciseness"] == 1.0
    assert result["compared"] == {d: 3 for d in DIMS} and result["failed_ratings"] == {d: 0 for d in DIMS}
    assert result["mean_words"] == 2 and result["mean_tokens"] > 0
    assert [c[0] for c in fake.calls] == ["REF", str(tiny_model_dir)]
    lines = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(lines) == 6 and {ln["model"] for ln in lines} == {"reference", "policy"}
    table = format_generation_table(gen)
    assert "win rate" in table and "correctness" in table and "ties count 0.5" in table


def test_a_conditioned_model_is_generated_at_each_lambda_and_the_reference_once(tiny_model_dir, prompts):
    model = EvalModel(str(tiny_model_dir), {"reference": "REF", "dimensions": DIMS},
                      PromptConditioning(dimensions=tuple(DIMS)))
    fake = FakeGenerator({"REF": lambda r: "", str(tiny_model_dir): lambda r: "x"})
    gen = evaluate_by_generation(model, str(prompts), generator=fake)
    assert [r["lambda"] for r in gen["results"]] == \
        [[1.0 if i == k else 0.0 for i in range(4)] for k in range(4)] + [[0.25] * 4]
    assert [c[0] for c in fake.calls] == ["REF"] + [str(tiny_model_dir)] * 5
    assert "Preference weights" not in fake.calls[0][1][0]  # the reference sees the plain prompt
    assert fake.calls[1][1][0].endswith("correctness 1.00, follows_length_limit 0.00, includes_keyword 0.00, "
                                        "conciseness 0.00.")
    # "x" (1 word) vs "" (0 words): the empty response is more concise, so every prompt is lost
    assert all(r["win_rate"]["conciseness"] == 0.0 for r in gen["results"])
    two = evaluate_by_generation(model, str(prompts), [[0.5, 0.5, 0, 0]],
                                 generator=FakeGenerator(fake.responses))
    assert [r["lambda"] for r in two["results"]] == [[0.5, 0.5, 0, 0]]


def boom(response: str, task: dict) -> float:
    """A scorer that raises on one response."""
    if response == "bad":
        raise RuntimeError("cannot rate this")
    return float(len(response))


def test_a_failing_scorer_leaves_one_rating_missing_and_the_run_goes_on(tiny_model_dir, prompts):
    model = EvalModel(str(tiny_model_dir), {"reference": "REF", "dimensions": []}, None)
    texts = iter(["bad", "ok", "fine"])
    fake = FakeGenerator({"REF": lambda r: "a", str(tiny_model_dir): lambda r: next(texts)})
    gen = evaluate_by_generation(model, str(prompts), scorers=[f"{__name__}:boom=size"], generator=fake)
    [result] = gen["results"]
    assert gen["dimensions"] == ["size"] and result["failed_ratings"] == {"size": 1}
    assert result["compared"] == {"size": 2} and result["win_rate"] == {"size": 1.0}
    assert result["mean_score"] == {"size": 3.0}  # "ok" 2, "fine" 4


def test_bad_input_is_refused(tiny_model_dir, tmp_path, prompts):
    model = EvalModel(str(tiny_model_dir), {"dimensions": DIMS}, None)
    with pytest.raises(GenerationEvalError, match="names no reference"):
        evaluate_by_generation(model, str(prompts), generator=FakeGenerator({}))
    model = EvalModel(str(tiny_model_dir), {"reference": "REF"}, None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n[1, 2]\n")
    with pytest.raises(GenerationEvalError, match="no usable prompt row"):
        evaluate_by_generation(model, str(bad), generator=FakeGenerator({}))
    with pytest.raises(GenerationEvalError, match="does not exist|No such file"):
        evaluate_by_generation(model, str(tmp_path / "missing.jsonl"), generator=FakeGenerator({}))
    with pytest.raises(GenerationEvalError, match="must be module:function"):
        evaluate_by_generation(model, str(prompts), scorers=["nocolon"], generator=FakeGenerator({}))


@pytest.fixture
def export(tiny_model_dir, tmp_path):
    """A tiny random model with a raypo record whose reference is the same tiny model."""
    out = tmp_path / "export"
    shutil.copytree(tiny_model_dir, out)
    (out / "raypo_model.json").write_text(json.dumps({
        "format": 1, "loss": "dpo", "beta": 0.1, "logp_reduction": "sum", "reference": str(tiny_model_dir),
        "uses_reference": True, "dimensions": DIMS, "conditioning": "none"}))
    return out


def _eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_generates_with_the_model_and_its_reference(export, tiny_model_dir, prompts, tmp_path, capsys,
                                                        ray_cluster):
    quarantine = tmp_path / "q.jsonl"
    local = _eval_json(capsys, str(export), "--generate", "--prompts", str(prompts), "--local",
                       "--max-new-tokens", "4", "--quarantine", str(quarantine))
    gen = local["generation"]
    assert local["model"] == str(export) and local["conditioned"] is False and "results" not in local
    assert gen["num_prompts"] == 3 and gen["rejected_rows"] == 2 and quarantine.exists()
    assert gen["reference"]["source"] == str(tiny_model_dir)
    [result] = gen["results"]
    # the policy's weights equal the reference's: greedy generations match, every prompt ties
    assert result["win_rate"] == {d: 0.5 for d in DIMS} and result["ties"] == {d: 3 for d in DIMS}
    assert result["mean_tokens"] == gen["reference"]["mean_tokens"] and result["mean_tokens"] > 0
    on_ray = _eval_json(capsys, str(export), "--prompts", str(prompts), "--max-new-tokens", "4")
    assert on_ray["generation"]["results"] == gen["results"]
    assert on_ray["generation"]["reference"] == gen["reference"]
    assert main(["eval", str(export), "--prompts", str(prompts), "--local", "--max-new-tokens", "4"]) == 0
    assert "win rate" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--generate"], "--generate needs --prompts"),
    ([], "give --data PATH"),
    (["--prompts", "PROMPTS", "--plot", "x.png"], "--plot draws the ranking evaluation"),
    (["--prompts", "PROMPTS", "--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    (["--prompts", "PROMPTS", "--scorer", "raypo.data.tasks:nothing"], "has no function 'nothing'"),
])
def test_cli_refuses_bad_generation_options(export, prompts, capsys, args, message):
    args = [str(prompts) if a == "PROMPTS" else a for a in args]
    assert main(["eval", str(export), "--local", *args]) == 2
    assert message in capsys.readouterr().err
