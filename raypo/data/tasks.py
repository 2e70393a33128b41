"""A seeded family of verifiable prompts and the plain scorers that rate responses to them.

Every prompt asks a small question whose answer code can check (integer arithmetic, reversing, counting or
upper-casing a word) under two extra instructions: a word limit and a keyword to use. A response is rated
on four dimensions (:data:`DIMENSIONS`), each by one plain function ``scorer(response, task) -> float``:

* :func:`correctness` -- 1 when the expected answer appears in the response as a whole token, else 0;
* :func:`follows_length_limit` -- 1 when the response has at most ``task["max_words"]`` words, else 0;
* :func:`includes_keyword` -- 1 when ``task["keyword"]`` appears as a word (any case), else 0;
* :func:`conciseness` -- ``1 / (1 + words / 10)``: shorter is better, the empty response scores 1.

The dimensions conflict: conciseness is highest for an empty answer, which is neither correct nor
includes the keyword; spelling out the answer and working the keyword in costs words (conciseness) and, on
tight limits, the length limit. A preference between two responses therefore depends on how the
dimensions are weighted -- what listwise, multi-dimensional losses are for.

``task`` is the prompt row's ``task`` object as :func:`prompt_rows` writes it (``kind``, ``answer``,
``max_words``, ``keyword``) plus ``prompt``, the text of the last user message. Any function with the same
signature plugs into ``raypo data score --scorer module:function`` (:mod:`raypo.data.scoring`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

DIMENSIONS = ("correctness", "follows_length_limit", "includes_keyword", "conciseness")
FAMILY = "raypo-tasks/1"
KINDS = ("add", "subtract", "multiply", "reverse", "count_letter", "uppercase")
KEYWORDS = ("banana", "river", "orange", "planet", "violin", "garden", "rocket", "silver", "tiger",
            "cloud", "marble", "forest", "candle", "harbor", "meadow", "pepper")
WORDS = ("apple", "window", "python", "monkey", "yellow", "bridge", "castle", "pencil", "summer",
         "button", "guitar", "dragon", "island", "jacket", "kitten", "lemon", "mirror", "number",
         "rabbit", "saddle", "tomato", "velvet", "wizard", "zipper", "anchor", "basket", "cactus")
WORD_LIMITS = (3, 5, 8, 12, 20)
_WORD = re.compile(r"\S+")
_TOKEN = re.compile(r"-?[A-Za-z0-9]+")


def _question(kind: str, rng: random.Random) -> tuple[str, str]:
    """(question text, expected answer) for one task kind."""
    if kind in ("add", "subtract", "multiply"):
        a, b = rng.randint(2, 99), rng.randint(2, 99 if kind != "multiply" else 12)
        op, value = {"add": ("+", a + b), "subtract": ("-", a - b), "multiply": ("*", a * b)}[kind]
        return f"What is {a} {op} {b}?", str(value)
    word = rng.choice(WORDS)
    if kind == "reverse":
        return f"Write the word '{word}' backwards.", word[::-1]
    if kind == "count_letter":
        letter = rng.choice(sorted(set(word)))
        return f"How many times does the letter '{letter}' appear in '{word}'?", str(word.count(letter))
    return f"Write the word '{word}' in capital letters.", word.upper()


def make_task(rng: random.Random) -> dict[str, Any]:
    """One task drawn from ``rng``: its prompt text and the facts the scorers check."""
    kind = rng.choice(KINDS)
    question, answer = _question(kind, rng)
    max_words, keyword = rng.choice(WORD_LIMITS), rng.choice(KEYWORDS)
    text = f"{question} Answer in at most {max_words} words and use the word '{keyword}'."
    return {"text": text, "task": {"family": FAMILY, "kind": kind, "answer": answer,
                                   "max_words": max_words, "keyword": keyword}}


def prompt_rows(num_prompts: int, seed: int, *, split: str = "train",
                exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``num_prompts`` distinct prompt rows ``{prompt_id, prompt, task}`` drawn with ``seed``.

    ``split`` names the id prefix and picks its own random stream, so train and held-out prompts are
    independent draws; texts in ``exclude`` (e.g. the training prompts) are skipped, so the held-out set
    never repeats a training prompt.
    """
    rng = random.Random(f"{FAMILY}|{seed}|{split}")
    rows, seen = [], set(exclude)
    attempts = 0
    while len(rows) < num_prompts:
        attempts += 1
        if attempts > 50 * num_prompts + 1000:
            raise ValueError(f"could not draw {num_prompts} distinct prompts (the family has fewer)")
        item = make_task(rng)
        if item["text"] in seen:
            continue
        seen.add(item["text"])
        rows.append({"prompt_id": f"task-{split}-s{seed}-{len(rows):05d}",
                     "prompt": [{"role": "user", "content": item["text"]}], "task": item["task"]})
    return rows


def train_and_heldout(num_prompts: int, num_heldout: int, seed: int
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training prompts and disjoint held-out prompts (no held-out text occurs in training)."""
    train = prompt_rows(num_prompts, seed, split="train")
    texts = frozenset(r["prompt"][-1]["content"] for r in train)
    return train, prompt_rows(num_heldout, seed, split="heldout", exclude=texts)


# ----------------------------------------------------------------------------------------------------
# Scorers: plain functions (response, task) -> float
# ----------------------------------------------------------------------------------------------------


def word_count(response: str) -> int:
    return len(_WORD.findall(response))


def correctness(response: str, task: Mapping[str, Any]) -> float:
    """1.0 when ``task["answer"]`` occurs in ``response`` as a whole token (case-insensitive for words;
    ``-5`` does not match inside ``-50``), else 0.0. Raises KeyError for a task without an answer."""
    answer = str(task["answer"]).lower()
    return float(answer in (t.lower() for t in _TOKEN.findall(response)))


def follows_length_limit(response: str, task: Mapping[str, Any]) -> float:
    """1.0 when the response has at most ``task["max_words"]`` whitespace-separated words, else 0.0."""
    return float(word_count(response) <= int(task["max_words"]))


def includes_keyword(response: str, task: Mapping[str, Any]) -> float:
    """1.0 when ``task["keyword"]`` appears as a word (any case, punctuation around it allowed), else 0.0."""
    keyword = str(task["keyword"]).lower()
    return float(keyword in (t.lower() for t in _TOKEN.findall(response)))


def conciseness(response: str, task: Mapping[str, Any]) -> float:
    """``1 / (1 + words / 10)`` in (0, 1]: 1.0 for an empty response, 0.5 at 10 words. Ignores ``task``."""
    return 1.0 / (1.0 + word_count(response) / 10.0)


SCORERS = tuple(f"raypo.data.tasks:{name}" for name in DIMENSIONS)
