"""Tokenisation of listwise rows: chat template on the prompt, responses as continuations.

For a row with prompt messages ``x`` and responses ``y_1..y_N``::

    prompt_ids      = tok(apply_chat_template(x, add_generation_prompt=True))        [P]
    response_ids[i] = tok(pre_i) + tok(y_i) + tok(post_i)                             [R_i]
    response_masks  = 0 on pre_i, 1 on y_i and post_i

where ``pre_i + y_i + post_i`` is what the chat template appends to the prompt's text when ``y_i`` is the
assistant turn (``post_i`` holds the end-of-turn token, e.g. ``<|eot_id|>``, so the model learns to stop;
``pre_i`` is template scaffolding such as an empty think block and is not trained on). So
``prompt_ids + response_ids[i]`` is the tokenised conversation, and the prompt is shared by all N
responses (prefix sharing, packing). If the template does not render the prompt as a prefix of the
conversation, the response is ``y_i + eos``.

Truncation policy (``data.overlong``): ``truncate`` keeps the *last* ``max_prompt_length`` prompt tokens
(the end of the conversation and the generation prompt matter most) and the *first*
``max_response_length`` tokens of a response (a truncated response loses its end-of-turn token);
``drop`` rejects the row (``overlong_prompt`` / ``overlong_response``). Either way the row is counted.

:class:`TokenizeBatch` is the Ray Data ``map_batches`` stage (a callable class: the tokenizer is loaded
once per actor); :func:`tokenize_rows` is the same thing in plain Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from raypo.data.schema import staged_schema, tokenized_schema


@dataclass(frozen=True)
class TokenizeConfig:
    max_prompt_length: int = 512
    max_response_length: int = 512
    overlong: str = "truncate"  # truncate | drop

    def __post_init__(self):
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong={self.overlong!r} must be 'truncate' or 'drop'")
        if self.max_prompt_length < 1 or self.max_response_length < 1:
            raise ValueError("max_prompt_length and max_response_length must be >= 1")

    @classmethod
    def from_data_config(cls, data_cfg: Any) -> TokenizeConfig:
        return cls(data_cfg.max_prompt_length, data_cfg.max_response_length, data_cfg.overlong)


def load_tokenizer(path: str, s3_cfg: Any = None):
    """A Hugging Face tokenizer with a chat template: a local dir, a hub id, ``tiny://...`` or ``s3://...``.

    Loading (and the s3 copy to a local cache) is :func:`raypo.model.loading.load_tokenizer`, the same as the
    trainer's, so data and model always agree on the tokenizer.
    """
    from raypo.model.loading import load_tokenizer as _load
    from raypo.storage import s3_options_of

    options = s3_options_of(s3_cfg) if str(path).startswith("s3://") else None
    tok = _load(str(path), storage_options=options)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"the tokenizer at {path} has no chat template; raypo formats prompts as chat. "
                         "Use an instruct model's tokenizer or set tokenizer.chat_template before saving it")
    return tok


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def render_continuation(tokenizer, prompt: list[dict[str, str]], prompt_text: str, response: str
                        ) -> tuple[str, str, str]:
    """``(pre, content, post)``: the text the template appends to ``prompt_text`` for this response."""
    turn = {"role": "assistant", "content": response}
    full = tokenizer.apply_chat_template(prompt + [turn], tokenize=False)
    if not full.startswith(prompt_text):
        return "", response, tokenizer.eos_token or ""
    cont = full[len(prompt_text):]
    for content in (response, response.strip()):  # templates may trim the content
        idx = cont.find(content)
        if idx >= 0 and content:
            return cont[:idx], content, cont[idx + len(content):]
    return "", cont, ""


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_rows(rows: list[dict[str, Any]], tokenizer, cfg: TokenizeConfig) -> list[dict[str, Any]]:
    """Listwise rows (optionally with the pipeline's ``_*`` columns) -> tokenised rows.

    Each output row has the columns of :func:`raypo.data.schema.tokenized_schema` plus ``_reject_reason``
    (None when accepted), ``_reject_detail``, ``_raw`` (the listwise row as JSON, when rejected),
    ``_repairs``, ``_source_rows``. One input row -> one output row: a group is never split.
    """
    prompt_texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                    for r in rows]
    pieces = [[render_continuation(tokenizer, r["prompt"], pt, y) for y in r["responses"]]
              for r, pt in zip(rows, prompt_texts)]
    flat = [p for row_pieces in pieces for p in row_pieces]
    prompt_ids = _ids(tokenizer, prompt_texts)
    pre_ids = _ids(tokenizer, [p[0] for p in flat])
    content_ids = _ids(tokenizer, [p[1] for p in flat])
    post_ids = _ids(tokenizer, [p[2] for p in flat])
    out, k = [], 0
    for row, p_ids, row_pieces in zip(rows, prompt_ids, pieces):
        n = len(row_pieces)
        resp = [pre_ids[k + i] + content_ids[k + i] + post_ids[k + i] for i in range(n)]
        masks = [[0] * len(pre_ids[k + i]) + [1] * (len(content_ids[k + i]) + len(post_ids[k + i]))
                 for i in range(n)]
        k += n
        out.append(_finish_row(row, list(p_ids), resp, masks, cfg))
    return out


def _finish_row(row: dict[str, Any], p_ids: list[int], resp: list[list[int]], masks: list[list[int]],
                cfg: TokenizeConfig) -> dict[str, Any]:
    from raypo.data import targets  # torch: imported where tokenising, not by every Ray Data task

    repairs = list(row.get("_repairs") or [])
    reason, detail = None, ""
    if len(p_ids) > cfg.max_prompt_length:
        if cfg.overlong == "drop":
            reason = "overlong_prompt"
            detail = f"{len(p_ids)} prompt tokens > max_prompt_length={cfg.max_prompt_length}"
        else:
            p_ids = p_ids[-cfg.max_prompt_length:]
            repairs.append("truncated_prompt")
    longest = max(len(r) for r in resp)
    if reason is None and longest > cfg.max_response_length:
        if cfg.overlong == "drop":
            reason = "overlong_response"
            detail = f"a response has {longest} tokens > max_response_length={cfg.max_response_length}"
        else:
            resp = [r[:cfg.max_response_length] for r in resp]
            masks = [m[:cfg.max_response_length] for m in masks]
            repairs.append("truncated_response")
    lengths = [len(r) for r in resp]
    raw = None
    if reason is not None:  # the original input row when the pipeline kept it, else the listwise row
        raw = row.get("_raw") or json.dumps({k: v for k, v in row.items() if not k.startswith("_")},
                                            ensure_ascii=False, allow_nan=True)
    return {
        "prompt_id": row["prompt_id"],
        "prompt_ids": p_ids,
        "response_ids": resp,
        "response_masks": masks,
        "scores": row["scores"],
        "ranks": row.get("ranks"),
        "psi": targets.psi(row["scores"], row.get("ranks")),
        "num_responses": len(resp),
        "prompt_length": len(p_ids),
        "response_lengths": lengths,
        "num_tokens": len(p_ids) + sum(lengths),
        "ref_logps": row.get("ref_logps"),
        "ref_entropy": row.get("ref_entropy"),
        "win_probs": row.get("win_probs"),
        # The messages, for the trainer to render each prompt with its lambda (lambdas.condition: prompt).
        "prompt_messages": json.dumps(list(row["prompt"]), ensure_ascii=False),
        "_reject_reason": reason,
        "_reject_detail": detail,
        "_raw": raw,
        "_repairs": repairs,
        "_source_rows": int(row.get("_source_rows") or 1),
        "_group_key": row.get("_group_key"),
        "_notes": row.get("_notes"),
    }


class TokenizeBatch:
    """Ray Data ``map_batches`` stage: staged listwise rows (Arrow) -> tokenised rows (Arrow).

    A callable class so each actor loads the tokenizer once::

        ds.map_batches(TokenizeBatch, fn_constructor_args=(path, cfg, dims), batch_format="pyarrow",
                       compute=ray.data.ActorPoolStrategy(size=k))
    """

    def __init__(self, tokenizer_path: str, cfg: TokenizeConfig, dimensions: list[str], s3_cfg: Any = None):
        self.tokenizer = load_tokenizer(tokenizer_path, s3_cfg)
        self.cfg = cfg
        self.schema = staged_schema(tokenized_schema(dimensions))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        return pa.Table.from_pylist(tokenize_rows(rows, self.tokenizer, self.cfg) if rows else [],
                                    schema=self.schema)
