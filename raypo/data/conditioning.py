"""Lambda-conditioned prompts: the policy sees (x, lambda), rendered into the conversation as text.

The lambda-DPO papers' claim is that lambda can be chosen at inference without retraining. raypo makes that
true with ``lambdas.condition: prompt``: each prompt's lambda (the same draw the loss weights dimensions
with) is written into the conversation as a system message, e.g. for 4 dimensions::

    Preference weights: helpfulness 0.40, honesty 0.20, instruction_following 0.30, truthfulness 0.10.

so the trained model stays a plain Hugging Face causal LM that any serving stack can use. The rule
(:meth:`PromptConditioning.messages`):

* the text is ``template`` with ``{weights}`` replaced by ``"<name> <weight>"`` items joined by ``", "``,
  each weight printed with the printf format ``weight_format`` (default ``%.2f``);
* it is appended to the last message of the conversation (the user's turn), after a blank line.

The end of the prompt, not a system message, for two reasons: a template's own system prompt (SmolLM2
injects one when there is none) stays as it is, and when ``data.overlong: truncate`` keeps a long prompt's
last tokens the weights are kept with them (:func:`conditioned_prompt_ids`).

The reference model always scores the plain prompt x, so the implicit reward is
``beta * log pi(y | x, lambda) / pi_ref(y | x)`` (the KL-regularised optimum for every lambda has the same
reference) and precomputed reference log-probs stay valid and shared (docs/steering.md).

The rule travels with the model: :func:`write_conditioning` puts it in ``raypo_conditioning.json`` next to
the weights, and :meth:`PromptConditioning.chat_template` wraps the tokenizer's chat template so that plain
transformers renders the same text::

    tok.apply_chat_template(messages, preference_weights=[0.4, 0.2, 0.3, 0.1], add_generation_prompt=True,
                            tokenize=False) == render_prompt(tok, messages, lam, conditioning)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

from raypo.config.validate import check_condition_template, check_weight_format

CONDITIONING_FILE = "raypo_conditioning.json"
DEFAULT_TEMPLATE = "Preference weights: {weights}."
DEFAULT_WEIGHT_FORMAT = "%.2f"
CONDITION_MODES = ("none", "prompt")
# The keyword a wrapped chat template reads: apply_chat_template(messages, preference_weights=[...]).
TEMPLATE_KWARG = "preference_weights"
SIMPLEX_TOLERANCE = 1e-3  # printed lambdas (two decimals) of a simplex point sum to 1 within this


class LambdaError(ValueError):
    """A lambda that is not a point of the simplex of the model's dimensions."""


def check_lambda(lam: Sequence[float], dimensions: Sequence[str], *, what: str = "lambda") -> list[float]:
    """``lam`` as floats, or :class:`LambdaError` naming the problem and the fix."""
    values = [float(v) for v in lam]
    names = ", ".join(dimensions)
    if len(values) != len(dimensions):
        raise LambdaError(f"{what} has {len(values)} weights but the model has {len(dimensions)} dimensions "
                          f"({names}); give one weight per dimension, in that order")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise LambdaError(f"{what}={values} has a negative or non-finite weight; weights are >= 0 and sum "
                          "to 1")
    if abs(sum(values) - 1.0) > SIMPLEX_TOLERANCE:
        raise LambdaError(f"{what}={values} sums to {sum(values):.4f}, not 1: a lambda is a point of the "
                          f"simplex over ({names}); divide by the sum")
    return values


def parse_lambda(text: str, dimensions: Sequence[str]) -> list[float]:
    """A command-line lambda: comma-separated weights in dimension order (``0.5,0.5,0,0``), ``name=w`` pairs
    (missing names weigh 0: ``honesty=1``), or ``uniform``."""
    text = text.strip()
    if text == "uniform":
        return [1.0 / len(dimensions)] * len(dimensions)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all("=" in p for p in parts):
        weights = dict.fromkeys(dimensions, 0.0)
        for part in parts:
            name, _, value = part.partition("=")
            if name.strip() not in weights:
                raise LambdaError(f"--lambda {text!r}: unknown dimension {name.strip()!r}; the model's "
                                  f"dimensions are {', '.join(dimensions)}")
            weights[name.strip()] = _float(value, text)
        return check_lambda(list(weights.values()), dimensions, what=f"--lambda {text!r}")
    return check_lambda([_float(p, text) for p in parts], dimensions, what=f"--lambda {text!r}")


def _float(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LambdaError(f"--lambda {text!r}: {value!r} is not a number; write weights like 0.5,0.5,0,0 "
                          "or honesty=1") from None


@dataclass(frozen=True)
class PromptConditioning:
    """How a lambda is written into a conversation (the module docstring gives the rule)."""

    dimensions: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    weight_format: str = DEFAULT_WEIGHT_FORMAT

    def __post_init__(self) -> None:
        object.__setattr__(self, "dimensions", tuple(self.dimensions))
        if not self.dimensions:
            raise ValueError("lambda conditioning needs the dataset's dimension names (data.dimensions)")
        for problem in (check_condition_template(self.template), check_weight_format(self.weight_format)):
            if problem:
                raise ValueError(f"lambda conditioning template: {problem}")

    def text(self, lam: Sequence[float]) -> str:
        """The conditioning text for ``lam`` ([m] weights in dimension order)."""
        values = [float(v) for v in lam]
        if len(values) != len(self.dimensions):
            raise LambdaError(f"lambda has {len(values)} weights for {len(self.dimensions)} dimensions")
        items = ", ".join(f"{name} {self.weight_format % w}" for name, w in zip(self.dimensions, values))
        return self.template.replace("{weights}", items)

    def messages(self, messages: Sequence[dict[str, str]], lam: Sequence[float]) -> list[dict[str, str]]:
        """The conversation the policy sees: the text appended to the last (user) message."""
        msgs = [dict(m) for m in messages]
        if not msgs:
            raise ValueError("lambda conditioning needs a conversation with at least one message")
        msgs[-1]["content"] = f"{msgs[-1]['content']}\n\n{self.text(lam)}"
        return msgs

    # -------------------------------------------------------------------------------------------------
    # Travelling with the model
    # -------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "prompt", **asdict(self), "dimensions": list(self.dimensions),
                "template_kwarg": TEMPLATE_KWARG}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptConditioning:
        return cls(dimensions=tuple(d["dimensions"]), template=d.get("template", DEFAULT_TEMPLATE),
                   weight_format=d.get("weight_format", DEFAULT_WEIGHT_FORMAT))

    def chat_template(self, base: str) -> str:
        """``base`` (a Jinja chat template) wrapped so that ``preference_weights=[...]`` conditions it the
        way :meth:`messages` does; without that keyword it renders exactly as ``base``."""
        head, tail = self.template.split("{weights}")
        parts = [json.dumps(head)]
        for j, name in enumerate(self.dimensions):
            sep = ", " if j else ""
            parts.append(json.dumps(f"{sep}{name} "))
            parts.append(f"({json.dumps(self.weight_format)} | format({TEMPLATE_KWARG}[{j}]))")
        parts.append(json.dumps(tail))
        w = TEMPLATE_KWARG
        return (
            f"{{%- if {w} is defined and {w} is not none and messages -%}}"
            f"{{%- set raypo_text = {' ~ '.join(parts)} -%}}"
            "{%- set raypo_last = messages[-1] -%}"
            "{%- set messages = messages[:-1] + [{'role': raypo_last['role'], "
            "'content': raypo_last['content'] ~ '\\n\\n' ~ raypo_text}] -%}"
            "{%- endif -%}"
            f"{base}"
        )


def render_prompt(tokenizer, messages: Sequence[dict[str, str]], lam: Optional[Sequence[float]],
                  conditioning: Optional[PromptConditioning]) -> str:
    """The model's input text for (messages, lambda): the chat template applied to the conditioned
    conversation, generation prompt included. ``conditioning=None`` (an unconditioned model) or
    ``lam=None`` renders the plain prompt."""
    if conditioning is not None and lam is not None:
        messages = conditioning.messages(messages, lam)
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def _ids(tokenizer, text: str) -> list[int]:
    # As the data stage tokenises prompts (raypo.data.tokenize): the template already holds bos etc.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conditioned_prompt_ids(tokenizer, messages: Sequence[dict[str, str]], lam: Sequence[float],
                           conditioning: PromptConditioning, plain_ids: Sequence[int]) -> list[int]:
    """Token ids of the conditioned prompt, cut like the row's plain ``prompt_ids``: when
    ``data.overlong: truncate`` dropped the first k tokens of the plain prompt, the conditioned one loses
    its first k too (the two differ only at the end, where the weights are), so policy and reference see
    the same conversation."""
    conditioned = _ids(tokenizer, render_prompt(tokenizer, messages, lam, conditioning))
    dropped = len(_ids(tokenizer, render_prompt(tokenizer, messages, None, None))) - len(plain_ids)
    return conditioned[dropped:] if dropped > 0 else conditioned


def install_chat_template(tokenizer, conditioning: PromptConditioning) -> None:
    """Wrap ``tokenizer.chat_template`` (once) so plain transformers can condition on lambda."""
    base = tokenizer.chat_template
    if not base:
        raise ValueError("the tokenizer has no chat template to condition")
    if TEMPLATE_KWARG in base:  # already wrapped (a resumed run's tokenizer)
        return
    tokenizer.chat_template = conditioning.chat_template(base)


def write_conditioning(directory: str, conditioning: Optional[PromptConditioning]) -> None:
    """``raypo_conditioning.json`` in ``directory`` (a model or checkpoint directory); nothing for None."""
    if conditioning is None:
        return
    with open(os.path.join(directory, CONDITIONING_FILE), "w") as f:
        json.dump(conditioning.to_dict(), f, indent=2)
        f.write("\n")


def read_conditioning(directory: str) -> Optional[PromptConditioning]:
    """The conditioning a model was trained with, or None for an unconditioned model."""
    path = os.path.join(directory, CONDITIONING_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return PromptConditioning.from_dict(json.load(f))
