"""Lambda-conditioned prompts (raypo.data.conditioning): the text, the chat-template wrapper that plain
transformers renders identically, command-line lambdas and their errors, and truncation."""

from __future__ import annotations

import json

import pytest

from raypo.data.conditioning import (
    LambdaError,
    PromptConditioning,
    check_lambda,
    conditioned_prompt_ids,
    install_chat_template,
    parse_lambda,
    read_conditioning,
    render_prompt,
    write_conditioning,
)

DIMS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
LAM = [0.4, 0.2, 0.3, 0.1]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from raypo.model.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_the_weights_are_appended_to_the_last_user_message():
    cond = PromptConditioning(DIMS)
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "what is 1 plus 2?"}]
    out = cond.messages(msgs, LAM)
    assert out[0] == msgs[0]
    assert out[1]["content"] == ("what is 1 plus 2?\n\nPreference weights: helpfulness 0.40, honesty 0.20, "
                                 "instruction_following 0.30, truthfulness 0.10.")
    assert msgs[1]["content"] == "what is 1 plus 2?"  # the input is not changed


def test_a_custom_template_and_format():
    cond = PromptConditioning(("a", "b"), template="[w: {weights}]", weight_format="%.3f")
    assert cond.text([0.25, 0.75]) == "[w: a 0.250, b 0.750]"


@pytest.mark.parametrize("template", ["no placeholder", "{weights} {weights}", "{weights} {other}"])
def test_bad_templates_are_refused(template):
    with pytest.raises(ValueError, match="weights"):
        PromptConditioning(DIMS, template=template)


@pytest.mark.parametrize("system", [False, True])
def test_plain_transformers_renders_what_raypo_renders(tokenizer, system):
    """The wrapped chat template, given preference_weights, gives raypo's text; without it, the original."""
    cond = PromptConditioning(DIMS)
    msgs = [{"role": "user", "content": "cats: what is 12 plus 7? Be brief."}]
    if system:
        msgs.insert(0, {"role": "system", "content": "You are terse."})
    plain = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ours = render_prompt(tokenizer, msgs, LAM, cond)
    install_chat_template(tokenizer, cond)
    install_chat_template(tokenizer, cond)  # idempotent
    assert tokenizer.apply_chat_template(msgs, preference_weights=LAM, add_generation_prompt=True,
                                         tokenize=False) == ours
    assert tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == plain
    assert ours != plain and "helpfulness 0.40" in ours


def test_the_rule_round_trips_through_its_file(tmp_path):
    cond = PromptConditioning(DIMS, template="W {weights}", weight_format="%.1f")
    write_conditioning(str(tmp_path), cond)
    assert read_conditioning(str(tmp_path)) == cond
    assert json.loads((tmp_path / "raypo_conditioning.json").read_text())["template_kwarg"] == \
        "preference_weights"
    assert read_conditioning(str(tmp_path / "nothing")) is None


def test_parse_lambda_forms():
    assert parse_lambda("0.5,0.5,0,0", DIMS) == [0.5, 0.5, 0.0, 0.0]
    assert parse_lambda("honesty=1", DIMS) == [0.0, 1.0, 0.0, 0.0]
    assert parse_lambda("uniform", DIMS) == [0.25] * 4


@pytest.mark.parametrize("text, match", [
    ("0.5,0.5", "2 weights but the model has 4 dimensions"),
    ("0.5,0.5,0.5,0.5", "sums to 2.0000, not 1"),
    ("1.5,-0.5,0,0", "negative"),
    ("kindness=1", "unknown dimension 'kindness'"),
    ("a,b,c,d", "is not a number"),
])
def test_bad_lambdas_name_the_problem(text, match):
    with pytest.raises(LambdaError, match=match):
        parse_lambda(text, DIMS)


def test_check_lambda_accepts_printed_simplex_points():
    assert check_lambda([0.33, 0.33, 0.34, 0.0], DIMS) == [0.33, 0.33, 0.34, 0.0]


def test_truncated_prompts_lose_the_same_head(tokenizer):
    """data.overlong=truncate keeps a prompt's last tokens; the conditioned prompt keeps the weights and
    drops exactly the tokens the plain one dropped."""
    cond = PromptConditioning(DIMS)
    msgs = [{"role": "user", "content": "a long question " * 20 + "what is 1 plus 2?"}]
    full = tokenizer(render_prompt(tokenizer, msgs, None, None), add_special_tokens=False)["input_ids"]
    conditioned = tokenizer(render_prompt(tokenizer, msgs, LAM, cond), add_special_tokens=False)["input_ids"]
    assert conditioned_prompt_ids(tokenizer, msgs, LAM, cond, full) == conditioned
    kept = full[-16:]
    cut = conditioned_prompt_ids(tokenizer, msgs, LAM, cond, kept)
    assert cut == conditioned[len(full) - 16:]
    assert len(cut) == 16 + len(conditioned) - len(full)
