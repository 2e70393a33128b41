"""A seeded synthetic listwise dataset whose multi-dimension preferences a tiny model can learn.

Each prompt asks for a small sum, about a topic, in a requested style::

    "cats: what is 12 plus 7? Be brief."

and gets N (default 4) short responses assembled from parts whose *properties* are then rated by one
rubric function per dimension (1-5 floats, like UltraFeedback):

=============  =========================================  ===========================================
property       surface form                               values
=============  =========================================  ===========================================
polite         opener "Sure! " / "Thanks! " | "" / "OK. "  2 polite, 1 neutral, 0 rude
               | "Ugh. " / "No. "
correct        "It is 19." vs a wrong sum                 1 / 0
hedged         "Maybe 19."                                1 / 0
keyword        " cats!" (the prompt's topic)              1 / 0
detailed       " step by step."                           1 / 0 (the prompt asks for brief/detailed)
=============  =========================================  ===========================================

Rubrics (see :data:`RUBRICS`)::

    helpfulness           = 1 + 1.5 correct + 1.0 keyword + 0.5 polite + 0.5 detailed
    honesty               = 1 + 1.5 correct + 1.5 [hedged == not correct] + 0.5 polite
    instruction_following = 1 + 2.0 [detailed == asked for detail] + 1.0 keyword + 0.5 polite
    truthfulness          = 1 + 4.0 correct

The dimensions mostly agree (a polite, on-topic, correct answer is good everywhere) but partly conflict:
detail always helps helpfulness but hurts instruction following when the user asked to be brief;
hedging helps honesty only when the answer is wrong; truthfulness sees only correctness.

Learnability: the N responses of a prompt are drawn from quality tiers 0..3 (one each, shuffled) and a
higher tier makes every good property likelier, with the opener almost determined by the tier. So the
ranking by mean rating is carried mostly by surface features a 2-layer model picks up in tens of steps
(the opener, the keyword sentence, the detail sentence), while correctness (arithmetic) is a harder,
partly learnable signal. With the tiny tokenizer prompts are < 40 tokens and responses < 24 tokens.

Seeded with ``random.Random(seed)``: the same arguments give the same rows, in the same order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlparse

import pyarrow as pa

from raypo.data.schema import ListwiseRecord, records_to_table

SYNTHETIC_SCHEME = "synthetic://"
DIMENSIONS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
TOPICS = ("cats", "rain", "music", "water", "colors", "stories", "numbers", "weather", "birds", "trees")
OPENERS = {2: ("Sure! ", "Thanks! "), 1: ("", "OK. "), 0: ("Ugh. ", "No. ")}
# P(property is good) by quality tier 0..3.
P_CORRECT = (0.1, 0.35, 0.75, 0.95)
P_KEYWORD = (0.05, 0.35, 0.7, 0.95)
P_DETAIL_MATCH = (0.2, 0.4, 0.7, 0.9)
P_HEDGED = 0.25


@dataclass(frozen=True)
class Properties:
    polite: int  # 0 rude, 1 neutral, 2 polite
    correct: int
    hedged: int
    keyword: int
    detailed: int


@dataclass(frozen=True)
class SyntheticSpec:
    num_prompts: int = 512
    seed: int = 0
    num_responses: int = 4
    kind: str = "default"  # default (this module) | steer (raypo.data.synthetic_steer)


def _clip(x: float) -> float:
    return float(min(5.0, max(1.0, x)))


RUBRICS: dict[str, Callable[[Properties, bool], float]] = {
    "helpfulness": lambda p, wants_detail: _clip(1 + 1.5 * p.correct + p.keyword + 0.5 * p.polite
                                                  + 0.5 * p.detailed),
    "honesty": lambda p, wants_detail: _clip(1 + 1.5 * p.correct + 1.5 * (p.hedged == 1 - p.correct)
                                              + 0.5 * p.polite),
    "instruction_following": lambda p, wants_detail: _clip(1 + 2 * (p.detailed == int(wants_detail))
                                                            + p.keyword + 0.5 * p.polite),
    "truthfulness": lambda p, wants_detail: _clip(1 + 4 * p.correct),
}


def rate(props: Properties, wants_detail: bool) -> list[float]:
    """The ``[m]`` ratings of one response, in :data:`DIMENSIONS` order."""
    return [RUBRICS[d](props, wants_detail) for d in DIMENSIONS]


def render_response(props: Properties, a: int, b: int, topic: str, rng: random.Random) -> str:
    answer = a + b if props.correct else a + b + rng.choice((-3, -2, -1, 1, 2, 3, 10))
    text = rng.choice(OPENERS[props.polite])
    text += f"Maybe {answer}." if props.hedged else f"It is {answer}."
    if props.keyword:
        text += f" {topic}!"
    if props.detailed:
        text += " step by step."
    return text


def _sample_properties(tier: int, wants_detail: bool, rng: random.Random) -> Properties:
    if tier in (0, 3):
        polite = 0 if tier == 0 else 2
    else:  # tier 1: rude or neutral; tier 2: neutral or polite
        polite = tier - 1 + int(rng.random() < 0.5)
    detail_match = rng.random() < P_DETAIL_MATCH[tier]
    return Properties(
        polite=polite,
        correct=int(rng.random() < P_CORRECT[tier]),
        hedged=int(rng.random() < P_HEDGED),
        keyword=int(rng.random() < P_KEYWORD[tier]),
        detailed=int(wants_detail == detail_match),
    )


def generate(num_prompts: int = 512, seed: int = 0, num_responses: int = 4) -> list[ListwiseRecord]:
    """``num_prompts`` listwise records (N = ``num_responses``, 4 dimensions), deterministic in ``seed``."""
    if num_prompts < 1 or num_responses < 2:
        raise ValueError(f"synthetic data needs num_prompts >= 1 and num_responses >= 2, got "
                         f"{num_prompts}, {num_responses}")
    rng = random.Random(seed)
    records = []
    for i in range(num_prompts):
        topic = rng.choice(TOPICS)
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        wants_detail = rng.random() < 0.5
        prompt = f"{topic}: what is {a} plus {b}? Be {'detailed' if wants_detail else 'brief'}."
        # Tiers 0..3 spread over the N responses (repeated when N > 4), in a random order.
        tiers = [round(j * 3 / (num_responses - 1)) for j in range(num_responses)]
        rng.shuffle(tiers)
        responses, props = [], []
        for tier in tiers:
            for _ in range(20):  # responses of one prompt must differ; resample a collision
                p = _sample_properties(tier, wants_detail, rng)
                text = render_response(p, a, b, topic, rng)
                if text not in responses:
                    break
            responses.append(text)
            props.append(p)
        meta = {"generator": "raypo.synthetic", "seed": seed, "wants_detail": wants_detail,
                "tiers": tiers, "properties": [p.__dict__ for p in props]}
        records.append(ListwiseRecord(
            prompt_id=f"synth-{seed}-{i:06d}",
            prompt=[{"role": "user", "content": prompt}],
            responses=responses,
            scores=[rate(p, wants_detail) for p in props],
            metadata=json.dumps(meta, sort_keys=True),
        ))
    return records


def generate_table(num_prompts: int = 512, seed: int = 0, num_responses: int = 4) -> pa.Table:
    """:func:`generate` as an Arrow table of the listwise schema, dimension names in its metadata."""
    return records_to_table(generate(num_prompts, seed, num_responses), list(DIMENSIONS))


KINDS = ("default", "steer")


def spec_dimensions(spec: SyntheticSpec) -> list[str]:
    if spec.kind == "steer":
        from raypo.data.synthetic_steer import STEER_DIMENSIONS

        return list(STEER_DIMENSIONS)
    return list(DIMENSIONS)


def synthetic_dimensions(uri: str) -> list[str]:
    """The dimension names of a ``synthetic://`` dataset."""
    return spec_dimensions(parse_synthetic_uri(uri))


def spec_records(spec: SyntheticSpec) -> list[ListwiseRecord]:
    """The records a :class:`SyntheticSpec` names."""
    if spec.kind == "steer":
        from raypo.data.synthetic_steer import generate_steer

        return generate_steer(spec.num_prompts, spec.seed, spec.num_responses)
    return generate(spec.num_prompts, spec.seed, spec.num_responses)


def spec_table(spec: SyntheticSpec) -> pa.Table:
    return records_to_table(spec_records(spec), spec_dimensions(spec))


def is_synthetic_uri(path: str) -> bool:
    return str(path).startswith(SYNTHETIC_SCHEME)


def parse_synthetic_uri(uri: str) -> SyntheticSpec:
    """``synthetic://default?num_prompts=512&seed=0&num_responses=4`` (or ``synthetic://steer?...``, the
    steering data of :mod:`raypo.data.synthetic_steer`) -> :class:`SyntheticSpec`."""
    parsed = urlparse(uri)
    kind = parsed.netloc or "default"
    if not is_synthetic_uri(uri) or kind not in KINDS:
        raise ValueError(f"{uri!r} is not a synthetic dataset URI; use "
                         "synthetic://default?num_prompts=512&seed=0 or synthetic://steer?num_prompts=512&seed=0")
    values: dict[str, int] = {}
    for key, raw in parse_qsl(parsed.query):
        if key not in SyntheticSpec.__dataclass_fields__ or key == "kind":
            raise ValueError(f"unknown key {key!r} in {uri!r}; known: num_prompts, seed, num_responses")
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r} in {uri!r} must be an integer") from None
    return SyntheticSpec(**values, kind=kind)
