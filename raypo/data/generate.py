"""On-policy sampling: N responses per prompt from a causal LM, on Ray Data (``raypo data generate``).

Prompts come from a JSONL or Parquet file, one row per prompt: ``prompt`` (a string or chat messages),
optionally ``prompt_id`` (derived from the prompt when absent) and ``task`` (any JSON object, kept for
the scorers, e.g. :mod:`raypo.data.tasks`). Bad rows are rejected with the reasons of
:mod:`raypo.data.validate`, counted and optionally quarantined, as in ``raypo data convert``.

Generation is a ``map_batches`` stage on an actor pool of :class:`GeneratorWorker` (each holds one model).
A batch's prompts are left-padded and decoded together, N rows per prompt. Sampling is seeded per response:
row j of prompt p draws its tokens from its own ``torch.Generator`` seeded with ``hash(seed, p, j)``
(:class:`SeededSampler`, applied as a logits processor that leaves one allowed token per row), so a
response does not depend on the batch it landed in, the batch size or the number of workers -- only on the
model, the prompt, its id and the seed (up to float rounding between padded shapes).

The output is listwise (:mod:`raypo.data.schema`) with no dimension yet: ``scores`` holds N empty lists
until ``raypo data score`` rates the responses; ``metadata`` (JSON) keeps the task and how it was sampled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import pyarrow as pa

from raypo.data.io import iter_raw_rows
from raypo.data.schema import listwise_schema, prompt_key
from raypo.data.validate import (
    Outcome,
    RowRejected,
    UndecodableLine,
    ValidationReport,
    normalize_prompt_id,
    raw_json,
    to_messages,
)

SOURCE = "raypo data generate"


@dataclass
class GenerateSettings:
    """How responses are sampled (``temperature=0``: greedy; then every response of a prompt is the same)."""

    num_responses: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.8
    seed: int = 0
    dtype: str = "float32"

    def problems(self) -> list[str]:
        p = []
        if self.num_responses < 1:
            p.append(f"--num-responses={self.num_responses} must be >= 1 (listwise training needs >= 2)")
        if self.max_new_tokens < 1:
            p.append(f"--max-new-tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            p.append(f"--temperature={self.temperature} must be >= 0 (0 = greedy)")
        return p


# ----------------------------------------------------------------------------------------------------
# Prompt rows
# ----------------------------------------------------------------------------------------------------


def _parse_prompt_row(raw: Any) -> dict[str, Any]:
    if isinstance(raw, UndecodableLine):
        raise RowRejected("invalid_utf8", raw.detail)
    row = raw
    if isinstance(raw, str):
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise RowRejected("invalid_json", str(exc)) from exc
    if not isinstance(row, dict):
        raise RowRejected("not_a_record", f"a {type(row).__name__}, not an object with a prompt field")
    prompt = to_messages(row.get("prompt"))
    prompt_id = normalize_prompt_id(row.get("prompt_id"), []) or prompt_key(prompt)
    task = row.get("task")
    if task is not None and not isinstance(task, dict):
        raise RowRejected("wrong_type", f"task is a {type(task).__name__}; give a JSON object or omit it")
    return {"prompt_id": prompt_id, "prompt": prompt, "task": task}


def read_prompts(path: str, s3_cfg: Any = None) -> tuple[list[dict[str, Any]], list[Outcome],
                                                          ValidationReport]:
    """The usable prompt rows of ``path``, the rejected ones (for the quarantine) and the report.

    A row repeated exactly is kept once (``duplicate_row``); one id on different prompts rejects every
    copy (``duplicate_prompt_id``), as the listwise rules do.
    """
    report = ValidationReport(source=str(path))
    parsed: list[tuple[dict, Any]] = []
    rejected: list[Outcome] = []
    for raw in iter_raw_rows(path, s3_cfg):
        try:
            parsed.append((_parse_prompt_row(raw), raw))
        except RowRejected as exc:
            rejected.append(Outcome(reason=exc.reason, detail=exc.detail, raw=raw_json(raw)))
    contents: dict[str, set[str]] = {}
    for row, _ in parsed:
        contents.setdefault(row["prompt_id"], set()).add(json.dumps([row["prompt"], row["task"]]))
    kept, seen = [], set()
    for row, raw in parsed:
        pid = row["prompt_id"]
        if len(contents[pid]) > 1:
            rejected.append(Outcome(reason="duplicate_prompt_id", raw=raw_json(raw),
                                    detail=f"prompt_id {pid!r} names {len(contents[pid])} different prompts"))
        elif pid in seen:
            rejected.append(Outcome(reason="duplicate_row", raw=raw_json(raw),
                                    detail=f"prompt_id {pid!r} repeats an earlier row; one copy is kept"))
        else:
            seen.add(pid)
            kept.append(row)
    for _ in kept:
        report.add(Outcome())
    for o in rejected:
        report.add(o)
    return kept, rejected, report


# ----------------------------------------------------------------------------------------------------
# Seeded sampling
# ----------------------------------------------------------------------------------------------------


def response_seed(seed: int, prompt_id: str, index: int) -> int:
    """The sampling seed of response ``index`` of ``prompt_id`` (63 bits of a hash)."""
    digest = hashlib.blake2b(f"{seed}|{prompt_id}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSampler:
    """A logits processor that samples each row with its own generator and leaves only that token allowed,
    so greedy decoding then emits exactly the sampled tokens (temperature 0: argmax, no generator)."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        import torch

        self.temperature = temperature
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        if self.temperature == 0:
            picks = scores.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()  # CPU generators
            picks = torch.stack([torch.multinomial(probs[i], 1, generator=g)
                                 for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks.to(scores.device), 0.0)


class GeneratorWorker:
    """One model on one actor: listwise rows with N sampled responses for a batch of prompt rows."""

    def __init__(self, model: str, settings: dict[str, Any], cache_dir: Optional[str] = None):
        from raypo.model.loading import (
            load_causal_lm,
            load_tokenizer,
            resolve_model_source,
            without_zero3_init,
        )

        self.model_name = model
        self.settings = GenerateSettings(**settings)
        path = resolve_model_source(model, cache_dir=cache_dir)
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "left"
        with without_zero3_init():
            self.model = load_causal_lm(path, dtype=self.settings.dtype, attention="sdpa",
                                        prefix_sharing=False).eval()
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # an actor given a GPU uses it
        self.model.to(self.device)

    def _encode(self, prompts: list[list[dict[str, str]]]):
        texts = [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts]
        return self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")

    def sample(self, rows: list[dict[str, Any]]) -> tuple[list[list[str]], list[list[bool]]]:
        """The N responses of every row (and whether each ended with an end-of-sequence token)."""
        import torch
        from transformers import LogitsProcessorList

        s, n = self.settings, self.settings.num_responses
        enc = self._encode([r["prompt"] for r in rows for _ in range(n)]).to(self.device)
        seeds = [response_seed(s.seed, r["prompt_id"], j) for r in rows for j in range(n)]
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=s.max_new_tokens, do_sample=False, use_cache=True,
                logits_processor=LogitsProcessorList([SeededSampler(seeds, s.temperature)]),
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos,
                temperature=None, top_p=None, top_k=None)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        texts, finished = [], []
        for ids in new:
            done = eos in ids
            ids = ids[:ids.index(eos)] if done else ids
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
            finished.append(done)
        return [texts[i * n:(i + 1) * n] for i in range(len(rows))], \
            [finished[i * n:(i + 1) * n] for i in range(len(rows))]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        responses, finished = self.sample(rows)
        sampling = {"model": self.model_name, **asdict(self.settings)}
        out = []
        for row, texts, done in zip(rows, responses, finished):
            meta = {"source": SOURCE, "sampling": sampling, "finished": done}
            if row.get("task_json"):
                meta["task"] = json.loads(row["task_json"])
            out.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"], "responses": texts,
                        "scores": [[] for _ in texts], "ranks": None, "ref_logps": None,
                        "ref_entropy": None, "metadata": json.dumps(meta, ensure_ascii=False)})
        return pa.Table.from_pylist(out, schema=listwise_schema([]))


def generate_table(rows: list[dict[str, Any]], model: str, settings: GenerateSettings, *,
                   batch_size: int = 8, concurrency: int = 1, num_gpus: float = 0,
                   cache_dir: Optional[str] = None) -> pa.Table:
    """Sample ``settings.num_responses`` responses for every prompt row on a Ray Data actor pool
    (``concurrency`` actors, each with one CPU and ``num_gpus`` GPUs); the output keeps the input order."""
    import ray.data

    order = {r["prompt_id"]: i for i, r in enumerate(rows)}
    items = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"],
              "task_json": json.dumps(r["task"]) if r.get("task") is not None else None} for r in rows]
    ds = ray.data.from_items(items).map_batches(
        GeneratorWorker, fn_constructor_args=(model, asdict(settings), cache_dir), batch_format="pyarrow",
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=1,
        **({"num_gpus": num_gpus} if num_gpus else {}))
    parts = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(parts) if parts else listwise_schema([]).empty_table()
    index = sorted(range(table.num_rows), key=lambda i: order[table.column("prompt_id")[i].as_py()])
    return table.take(index).replace_schema_metadata(listwise_schema([]).metadata)
