"""Response chunking (flat in N): peak memory at N = 4, 8, 16 with a fixed chunk of responses.

One group, prompt P = 256, N responses of R = 64 tokens, the LiPO-lambda loss coupling all N responses,
forward + backward by :func:`raypo.model.response_chunks.listwise_backward`:

* direct: one prefix-shared forward of P + N R tokens with grad, one backward; activations grow with N;
* chunked (``chunk_size`` = 4): a no-grad forward of all N (only transient activations), dL/ds on [1, N],
  then ceil(N / 4) forwards of P + 4 R tokens with grad, each backpropagating sum_i (dL/ds_i) s_i; exact
  gradients (tests/model/test_response_chunks.py), activation memory of one chunk.

Peak = extra resident memory of the step in a fresh process per configuration (:mod:`bench.common`).
Parameter-gradient buffers persist across steps (``zero_grad(set_to_none=False)``), as DeepSpeed's
partitioned gradient buffers do, so the peak is activations and temporaries. (With ``set_to_none=True``
every path with two or more chunks also holds the full gradients while the later chunks run: + one
parameter size, independent of N.) Time: the chunked path runs one extra no-grad forward.

Run: ``python -m bench.response_chunks_memory [--smoke]``.
"""

from __future__ import annotations

import torch

from bench.common import (
    BENCH_MODEL,
    SMOKE_MODEL,
    bench_main,
    build_llama,
    describe_model,
    interleaved_times,
    measure_memory,
    paired_ratio,
    setup_torch,
    uniform_rows,
)
from raypo.model.shape import ModelShape

NS = (4, 8, 16)
CHUNK = 4
PROMPT_LEN, RESPONSE_LEN = 256, 64


def _loss_fn(batch):
    """LiPO-lambda against a zero reference with the rows' scores: a loss coupling all N responses."""
    from raypo.losses import listwise_loss

    mask = batch.response_mask()
    scores = batch.extras["scores"]

    def loss_fn(logps):
        out = listwise_loss("lipo_lambda", logps, torch.zeros_like(logps), mask=mask, scores=scores)
        return out.numerator, out.denominator, {}

    return loss_fn


def _step(model, batch, chunk: int | None):
    from raypo.model.response_chunks import listwise_backward

    loss_fn = _loss_fn(batch)

    def step():
        model.zero_grad(set_to_none=False)  # persistent gradient buffers, as DeepSpeed's (module docstring)
        listwise_backward(model, batch, loss_fn, chunk_size=chunk)

    return step


def _batch(n: int, p: int, r: int, vocab: int):
    from raypo.model.batch import collate_listwise

    return collate_listwise(uniform_rows(1, n, p, r, vocab, seed=n))


def memory_case(case: dict):
    shape = ModelShape(**case["shape"])
    model = build_llama(shape)
    return _step(model, _batch(case["n"], case["p"], case["r"], shape.vocab_size), case["chunk"])


def run(smoke: bool = False, rounds: int = 3, memory: str = "subprocess") -> dict:
    setup_torch(1)
    shape, ns, chunk, p, r = BENCH_MODEL, NS, CHUNK, PROMPT_LEN, RESPONSE_LEN
    if smoke:
        shape = SMOKE_MODEL
        ns, chunk, p, r, rounds = (4, 8), 2, 16, 8, 1
        memory = "in_process" if memory != "off" else memory
    model = build_llama(shape)
    rows = []
    for n in ns:
        batch = _batch(n, p, r, shape.vocab_size)
        variants = {"direct": _step(model, batch, None), "chunked": _step(model, batch, chunk)}
        times = interleaved_times(variants, rounds=rounds)
        ratio = paired_ratio(times["chunked"], times["direct"])
        row = {"n": n, "p": p, "r": r, "chunk": chunk, "direct_s": min(times["direct"]),
               "chunked_s": min(times["chunked"]), "time_ratio": ratio["best"],
               "time_ratio_median": ratio["median"]}
        if memory != "off":
            for variant, size in (("direct", None), ("chunked", chunk)):
                case = {"shape": vars(shape), "n": n, "p": p, "r": r, "chunk": size}
                row[f"{variant}_peak_mib"] = measure_memory("bench.response_chunks_memory", case,
                                                            in_process=memory == "in_process")["peak_mib"]
        rows.append(row)
    out = {"model": describe_model(shape), "rows": rows}
    if memory != "off":
        first, last = rows[0], rows[-1]
        out["chunked_peak_ratio_last_vs_first"] = last["chunked_peak_mib"] / first["chunked_peak_mib"]
        out["direct_peak_ratio_last_vs_first"] = last["direct_peak_mib"] / first["direct_peak_mib"]
    return out


if __name__ == "__main__":
    bench_main(run, __doc__)
