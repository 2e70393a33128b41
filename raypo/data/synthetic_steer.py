"""A seeded synthetic dataset for steering: three dimensions that conflict on surface features.

``synthetic://steer?num_prompts=512&seed=0&num_responses=4``. Each prompt asks a small sum about a topic::

    "cats: what is 12 plus 7?"

and gets N responses, each a correct answer with three independent optional parts::

    [opener "Sure! "] "It is 19." [keyword " cats!"] [detail " step by step."]

rated 1-5 by one rubric per dimension (:data:`STEER_RUBRICS`)::

    helpfulness = 1 + 2 detailed + 1 keyword + 0.5 polite
    conciseness = 1 + 2 (1 - detailed) + 1 (1 - keyword)
    politeness  = 1 + 3 polite

Helpfulness and conciseness disagree on every pair that differs in detail or keyword (a model can rank
well for one only by ranking badly for the other), politeness is independent of conciseness and agrees a
little with helpfulness. Unlike the default synthetic data (:mod:`raypo.data.synthetic`, whose dimensions
mostly agree through shared quality tiers), no ranking is good for every dimension, so a policy conditioned
on lambda (docs/steering.md) must read lambda to do well: the steering benchmark's data.
"""

from __future__ import annotations

import json
import random

from raypo.data.schema import ListwiseRecord

STEER_DIMENSIONS = ("helpfulness", "conciseness", "politeness")
TOPICS = ("cats", "rain", "music", "water", "colors", "stories", "numbers", "weather", "birds", "trees")

STEER_RUBRICS = {
    "helpfulness": lambda polite, detailed, keyword: 1 + 2 * detailed + keyword + 0.5 * polite,
    "conciseness": lambda polite, detailed, keyword: 1 + 2 * (1 - detailed) + (1 - keyword),
    "politeness": lambda polite, detailed, keyword: 1 + 3 * polite,
}


def _response(polite: int, detailed: int, keyword: int, topic: str, answer: int) -> str:
    return ("Sure! " if polite else "") + f"It is {answer}." + (f" {topic}!" if keyword else "") + \
        (" step by step." if detailed else "")


def generate_steer(num_prompts: int = 512, seed: int = 0, num_responses: int = 4) -> list[ListwiseRecord]:
    """``num_prompts`` records with N = ``num_responses`` distinct responses (at most 8: the part
    combinations), rated on :data:`STEER_DIMENSIONS`; deterministic in ``seed``."""
    if num_prompts < 1 or not 2 <= num_responses <= 8:
        raise ValueError(f"synthetic://steer needs num_prompts >= 1 and 2 <= num_responses <= 8, got "
                         f"{num_prompts}, {num_responses}")
    rng = random.Random(seed)
    records = []
    for i in range(num_prompts):
        topic = rng.choice(TOPICS)
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        parts = rng.sample([(p, d, k) for p in (0, 1) for d in (0, 1) for k in (0, 1)], num_responses)
        records.append(ListwiseRecord(
            prompt_id=f"steer-{seed}-{i:06d}",
            prompt=[{"role": "user", "content": f"{topic}: what is {a} plus {b}?"}],
            responses=[_response(p, d, k, topic, a + b) for p, d, k in parts],
            scores=[[float(STEER_RUBRICS[dim](p, d, k)) for dim in STEER_DIMENSIONS] for p, d, k in parts],
            metadata=json.dumps({"generator": "raypo.synthetic.steer", "seed": seed,
                                 "parts": [dict(polite=p, detailed=d, keyword=k) for p, d, k in parts]}),
        ))
    return records
