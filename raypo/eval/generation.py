"""Generation with a trained policy at a chosen lambda (``raypo generate``).

A lambda-conditioned policy gets each prompt's messages conditioned exactly as in training
(:meth:`raypo.data.conditioning.PromptConditioning.messages`), then the chat template; an unconditioned
policy gets the plain prompt. Decoding is :class:`raypo.data.generate.GeneratorWorker`'s (the sampler of
``raypo data generate``): greedy at temperature 0, else seeded per prompt, so a response depends only on
the model, the prompt, its id, lambda and the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from raypo.eval.models import EvalModel


def conditioned_rows(model: EvalModel, rows: Sequence[dict[str, Any]], lam: Optional[Sequence[float]]
                     ) -> list[dict[str, Any]]:
    """Prompt rows whose messages carry ``lam`` (unchanged for an unconditioned model or no lambda)."""
    if model.conditioning is None or lam is None:
        return [dict(r) for r in rows]
    return [{**r, "prompt": model.conditioning.messages(r["prompt"], lam)} for r in rows]


def generate_responses(model: EvalModel, rows: Sequence[dict[str, Any]], lam: Optional[Sequence[float]], *,
                       max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
                       batch_size: int = 8, worker: Any = None) -> list[str]:
    """One response per prompt row (``{"prompt_id", "prompt": messages}``) at ``lam``."""
    from raypo.data.generate import GeneratorWorker

    worker = worker or GeneratorWorker(model.path, {"num_responses": 1, "max_new_tokens": max_new_tokens,
                                                    "temperature": temperature, "seed": seed})
    rows = conditioned_rows(model, rows, lam)
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        texts, _ = worker.sample(rows[start:start + batch_size])
        out += [t[0] for t in texts]
    return out
