"""Prefix-shared vs unshared listwise forward+backward: speedup against the ideal rho, and peak memory.

One group, one prompt of P tokens and N responses of R tokens; the policy's per-response log-prob sums s_i
(:func:`raypo.model.listwise.grouped_logprobs`) and the backward of sum_i s_i, in the two layouts of
:mod:`raypo.model.layout`:

    shared:         one row [prompt | r_1 | ... | r_N], dense block mask (sdpa)     tokens P + N R
                    (``model.attention: sdpa``)
    shared_blocks:  the same row, attention on the allowed blocks only              tokens P + N R
                    (``prefix_sdpa``, :mod:`raypo.model.attention`; the default, ``auto``)
    shared_cascade: the same row, cascade attention (prompt keys once per group,     tokens P + N R
                    merged by log-sum-exp; ``cascade``, :mod:`raypo.model.cascade`)
    unshared:       N rows [prompt | r_i] (sdpa, causal + padding)                   tokens N (P + R)

Ideal speedup (token count): rho = N (P + R) / (P + N R). The log-prob head runs on the N R response
tokens in both layouts, so it does not shrink with sharing; the linear-FLOP ideal counts it:

    rho_flops = (D N (P + R) + V H N R) / (D (P + N R) + V H N R)

with D the decoder's matmul parameters and V H the head's. ``achieved / rho`` is the headline number.

Run: ``python -m bench.prefix_sharing [--smoke]``.
"""

from __future__ import annotations

import dataclasses

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

GRID_N = (4, 8, 16)
GRID_RATIO = (0.5, 1.0, 4.0)  # P / R
RESPONSE_LEN = 64


def rho(n: int, p: int, r: int) -> float:
    """Ideal token saving N (P + R) / (P + N R)."""
    return n * (p + r) / (p + n * r)


def rho_flops(n: int, p: int, r: int, shape: ModelShape) -> float:
    """Linear-FLOP ideal with the response-only head (same in both layouts); see the module docstring."""
    d, v = shape.decoder_matmul_params(), shape.embedding_params
    return (d * n * (p + r) + v * n * r) / (d * (p + n * r) + v * n * r)


# layout variants: (prefix_sharing, transformers attention implementation)
VARIANTS = {"shared": (True, "sdpa"), "shared_blocks": (True, "raypo_prefix_sdpa"),
            "shared_cascade": (True, "raypo_cascade"),
            "unshared": (False, "sdpa")}


def _step(model, batch, variant: str):
    import raypo.model.cascade  # noqa: F401 - registers the cascade backend
    from raypo.model.listwise import grouped_logprobs

    shared, attention = VARIANTS[variant]

    def step():
        model.config._attn_implementation = attention
        model.zero_grad(set_to_none=False)  # persistent gradient buffers: the peak is activations
        out = grouped_logprobs(model, batch, prefix_sharing=shared)
        out.logps.sum().backward()

    return step


def _batch(n: int, p: int, r: int, vocab: int):
    from raypo.model.batch import collate_listwise

    return collate_listwise(uniform_rows(1, n, p, r, vocab, seed=n * 1000 + p))


def memory_case(case: dict):
    """Subprocess entry (bench.common.peak_in_subprocess): one variant's forward+backward."""
    shape = ModelShape(**case["shape"])
    model = build_llama(shape)
    return _step(model, _batch(case["n"], case["p"], case["r"], shape.vocab_size), case["variant"])


def _speedups(row: dict, times: dict, name: str, suffix: str) -> None:
    """speedup = best unshared / best ``name`` time, with the per-round spread, and its share of rho."""
    speedup = paired_ratio(times["unshared"], times[name])
    row.update({f"{name}_s": min(times[name]), f"speedup{suffix}": speedup["best"],
                f"speedup{suffix}_median": speedup["median"], f"speedup{suffix}_min": speedup["min"],
                f"speedup{suffix}_max": speedup["max"]})
    row[f"of_rho{suffix}"] = speedup["best"] / row["rho"]
    row[f"of_rho_flops{suffix}"] = speedup["best"] / row["rho_flops"]


def run_case(model, shape: ModelShape, n: int, p: int, r: int, *, rounds: int, memory: str) -> dict:
    """Interleaved timing of the variants (and their peak memory in fresh processes) for one (N, P, R).

    ``speedup`` / ``of_rho``: the dense-mask shared layout (``model.attention: auto``/``sdpa``);
    ``speedup_blocks`` / ``of_rho_blocks``: the block backend (``model.attention: prefix_sdpa``).
    ``speedup_cascade`` / ``of_rho_cascade``: cascade attention (``model.attention: cascade``).
    """
    batch = _batch(n, p, r, shape.vocab_size)
    times = interleaved_times({v: _step(model, batch, v) for v in VARIANTS}, rounds=rounds)
    stats = batch.token_stats()
    row = {"n": n, "p": p, "r": r, "p_over_r": p / r, "vocab": shape.vocab_size,
           "shared_tokens": stats["shared_tokens"], "unshared_tokens": stats["unshared_tokens"],
           "unshared_s": min(times["unshared"]), "rho": rho(n, p, r), "rho_flops": rho_flops(n, p, r, shape)}
    _speedups(row, times, "shared", "")
    _speedups(row, times, "shared_blocks", "_blocks")
    _speedups(row, times, "shared_cascade", "_cascade")
    if memory != "off":
        for variant in VARIANTS:
            case = {"shape": vars(shape), "n": n, "p": p, "r": r, "variant": variant}
            row[f"{variant}_peak_mib"] = measure_memory("bench.prefix_sharing", case,
                                                        in_process=memory == "in_process")["peak_mib"]
    return row


def run(smoke: bool = False, rounds: int = 4, memory: str = "subprocess") -> dict:
    """The N x (P/R) grid on the bench model, plus the N = 8, P/R = 4 point with a 32k vocabulary."""
    setup_torch(1)
    shape = BENCH_MODEL
    grid_n, grid_ratio, r_len = GRID_N, GRID_RATIO, RESPONSE_LEN
    if smoke:
        shape = SMOKE_MODEL
        grid_n, grid_ratio, r_len, rounds = (4,), (4.0,), 8, 1
        memory = "in_process" if memory != "off" else memory
    model = build_llama(shape)
    rows = [run_case(model, shape, n, int(ratio * r_len), r_len, rounds=rounds, memory=memory)
            for n in grid_n for ratio in grid_ratio]
    extra = []
    big = dataclasses.replace(BENCH_MODEL, vocab_size=32000)
    if not smoke:  # the same point with a 32k vocabulary: the head (response tokens only) dilutes the gain
        extra.append(run_case(build_llama(big), big, 8, 4 * r_len, r_len, rounds=rounds, memory=memory))
    return {"model": describe_model(shape), "rows": rows, "vocab_32k": extra,
            "model_32k": describe_model(big)}


if __name__ == "__main__":
    torch.manual_seed(0)
    bench_main(run, __doc__, rounds=4)
