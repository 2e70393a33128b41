"""The GPU checks in one call: attention paths, a 1B listwise step's MFU, the chunked head, flex gradients.

One script for one H100/H200 (under 8 minutes), printing one JSON report:

* ``attention``: every shared-layout attention path (``sdpa`` dense block mask = the reference, ``eager``,
  ``prefix_sdpa``, ``cascade`` with its math, CPU-flash and flex kernels, transformers'
  ``flex_attention``) on a Llama-3-8B-shaped layer stack (hidden 4096, 32 heads, 8 KV heads, MLP 14336,
  128k vocabulary; a few layers) at N = 8 responses, P / R = 4: bf16 agreement with the dense path
  (log-probs and the gradient of the first layer's q_proj, relative error) and forward+backward time.
* ``listwise_step``: one full listwise step (forward, a LiPO-lambda loss, backward, AdamW step) of a
  Llama-3.2-1B-shaped model, its time and model FLOPs utilisation: 6 x matmul parameters x tokens (shared
  prompt tokens counted once) + attention FLOPs of the allowed blocks, over the device's dense bf16 peak.
* ``head``: the chunked log-prob head (:mod:`raypo.model.logprobs`) vs full fp32 logits at a 128k
  vocabulary, peak memory and time, forward + backward.
* ``flex_backward``: the gradients of FlexAttention paths (cascade's flex kernel, transformers' flex) against
  the dense path, float32; FlexAttention has no CPU backward, so ``--dry-run`` reports them as skipped.

``--dry-run``: CPU-sized shapes in float32 on the CPU, the same code paths and the same JSON keys (CI runs
it: tests/bench/test_gpu_bench.py). Run on a GPU: ``python -m bench.gpu > gpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from bench.common import build_llama, environment, uniform_rows
from raypo.model.shape import ModelShape

LLAMA3_8B = ModelShape(vocab_size=128256, hidden_size=4096, num_layers=4, num_heads=32, num_kv_heads=8,
                       intermediate_size=14336, name="llama-3-8b-shaped, 4 layers")
LLAMA32_1B = ModelShape(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                        intermediate_size=8192, tie_word_embeddings=True, name="llama-3.2-1b-shaped")
DRY_SHAPE = ModelShape(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, name="dry-run")
#: dense bf16 peak FLOP/s (no sparsity), by device-name substring
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
PATHS = {"dense_sdpa": ("sdpa", None), "eager": ("eager", None), "prefix_sdpa": ("raypo_prefix_sdpa", None),
         "cascade_math": ("raypo_cascade", "math"), "cascade_flash": ("raypo_cascade", "flash"),
         "cascade_flex": ("raypo_cascade", "flex"),
         "flex_attention": ("flex_attention", None)}


def _sizes(dry: bool) -> dict:
    if dry:
        return {"stack": DRY_SHAPE, "step": DRY_SHAPE, "groups": 2, "n": 8, "r": 8, "p": 32, "rounds": 2,
                "head_tokens": 256, "head_vocab": 4096, "head_hidden": 64, "head_chunk": 64}
    return {"stack": LLAMA3_8B, "step": LLAMA32_1B, "groups": 2, "n": 8, "r": 256, "p": 1024, "rounds": 5,
            "head_tokens": 8192, "head_vocab": 128256, "head_hidden": 4096, "head_chunk": 1024}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, rounds: int) -> float:
    """Best wall time of ``rounds`` calls after one warm-up (compilation) call."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _batch(sizes: dict, vocab: int):
    from raypo.model.batch import collate_listwise

    rows = uniform_rows(sizes["groups"], sizes["n"], sizes["p"], sizes["r"], vocab, seed=0)
    return collate_listwise(rows)


def _kernel(name):
    from raypo.model import cascade

    return cascade.use_kernel(name) if name else contextlib.nullcontext()


def _logps_and_grad(model, batch, attn: str, kernel):
    from raypo.model.listwise import grouped_logprobs

    model.config._attn_implementation = attn
    model.zero_grad(set_to_none=True)
    with _kernel(kernel):
        out = grouped_logprobs(model, batch)
        out.logps.sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    return out.logps.detach().float(), grad.detach().float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _path_available(name: str, device) -> str | None:
    """None, or why the path cannot run here (flex backward: CUDA only)."""
    if name in ("cascade_flex", "flex_attention") and device.type != "cuda":
        return "FlexAttention has no backward on CPU"
    if name == "cascade_flash" and device.type != "cpu":
        return "the CPU flash kernel (CUDA runs cascade_flex)"
    return None


def attention_report(sizes: dict, device, dtype) -> dict:
    """Each path's log-prob / gradient agreement with the dense path and its forward+backward time."""
    shape = sizes["stack"]
    model = build_llama(shape).to(device=device, dtype=dtype)
    batch = _batch(sizes, shape.vocab_size)
    ref_logps, ref_grad = _logps_and_grad(model, batch, *PATHS["dense_sdpa"])
    out = {"shape": shape.describe(), "n": sizes["n"], "p": sizes["p"], "r": sizes["r"],
           "groups": sizes["groups"], "dtype": str(dtype).removeprefix("torch."), "paths": {}}
    for name, (attn, kernel) in PATHS.items():
        why = _path_available(name, device)
        if why:
            out["paths"][name] = {"skipped": why}
            continue
        try:
            logps, grad = _logps_and_grad(model, batch, attn, kernel)
            seconds = _timed(lambda a=attn, k=kernel: _logps_and_grad(model, batch, a, k), device,
                             sizes["rounds"])
        except Exception as err:  # a failing path is a finding, not the end of the report
            out["paths"][name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            continue
        out["paths"][name] = {"fwd_bwd_s": seconds,
                              "logps_max_abs_diff": float((logps - ref_logps).abs().max()),
                              "grad_rel_err": _rel(grad, ref_grad)}
    return out


def step_flops(shape: ModelShape, batch) -> float:
    """6 x matmul MACs x tokens (each shared prompt once, the head on response tokens) + attention."""
    stats = batch.token_stats()
    tokens, scored = stats["shared_tokens"], int(batch.num_scored_tokens().sum())
    linear = 2 * 3 * (shape.decoder_matmul_params() * tokens + shape.embedding_params * scored)
    d, heads = shape.head_dim, shape.num_heads
    pairs = 0
    for prompt, responses in zip(batch.prompt_ids, batch.response_ids):
        p = len(prompt)
        pairs += p * (p + 1) // 2 + sum(len(r) * p + len(r) * (len(r) + 1) // 2 for r in responses)
    attention = 3 * 2 * 2 * pairs * d * heads * shape.num_layers  # QK^T and PV, forward + 2x backward
    return float(linear + attention)


def listwise_step_report(sizes: dict, device, dtype) -> dict:
    from raypo.losses.registry import listwise_loss
    from raypo.model.listwise import grouped_logprobs

    shape = sizes["step"]
    model = build_llama(shape).to(device=device, dtype=dtype)
    model.config._attn_implementation = "raypo_cascade" if device.type == "cuda" else "raypo_prefix_sdpa"
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = _batch(sizes, shape.vocab_size)
    scores = torch.arange(batch.num_responses, dtype=torch.float32, device=device)
    scores = scores.expand(batch.num_groups, -1)

    def step():
        optim.zero_grad(set_to_none=True)
        out = grouped_logprobs(model, batch)
        loss = listwise_loss("lipo_lambda", out.logps.float(), torch.zeros_like(out.logps.float()),
                             mask=out.mask, scores=scores)
        loss.loss.backward()
        optim.step()

    seconds = _timed(step, device, sizes["rounds"])
    flops = step_flops(shape, batch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return {"shape": shape.describe(), "device": name, "attention": "cascade" if device.type == "cuda"
            else "prefix_sdpa", "step_s": seconds, "model_tflops": flops / 1e12,
            "achieved_tflops_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None,
            "peak_tflops_per_s": peak / 1e12 if peak else None}


def _head_case(sizes, device, dtype, variant: str):
    from bench.logprob_head import chunked_step, full_logits_step

    gen = torch.Generator().manual_seed(0)
    t, v, h = sizes["head_tokens"], sizes["head_vocab"], sizes["head_hidden"]
    hid = torch.randn(t, h, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=gen) * h ** -0.5).to(device, dtype).requires_grad_(True)
    y = torch.randint(0, v, (t,), generator=gen).to(device)
    g = torch.randn(t, generator=gen).to(device)
    if variant == "full":
        return full_logits_step(hid, w, y, g)
    return chunked_step(hid, w, y, g, sizes["head_chunk"])


def head_report(sizes: dict, device, dtype) -> dict:
    """Peak memory above the inputs (CUDA allocator; on CPU, the RSS probe of bench.common) and time."""
    from bench.common import measure_peak

    out = {"tokens": sizes["head_tokens"], "vocab": sizes["head_vocab"], "hidden": sizes["head_hidden"],
           "chunk": sizes["head_chunk"],
           "logits_fp32_mib": sizes["head_tokens"] * sizes["head_vocab"] * 4 / 2**20}
    for variant in ("full", "chunked"):
        step = _head_case(sizes, device, dtype, variant)
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = measure_peak(step)["peak_mib"]
        out[f"{variant}_peak_mib"] = peak
        out[f"{variant}_s"] = _timed(step, device, sizes["rounds"])
        del step
    out["memory_ratio"] = out["full_peak_mib"] / max(out["chunked_peak_mib"], 1e-9)
    out["time_ratio"] = out["chunked_s"] / out["full_s"]
    return out


def flex_backward_report(device) -> dict:
    """float32 gradients of q, k, v through each FlexAttention path vs the dense masked SDPA."""
    if device.type != "cuda":
        return {"skipped": "FlexAttention has no backward on CPU"}
    from raypo.model import attention as prefix_attention
    from raypo.model import cascade
    from raypo.model.layout import prefix_sharing_mask

    group_ids = torch.zeros(2, 320, dtype=torch.long, device=device)
    segment_ids = torch.tensor([[0] * 64 + sum([[i + 1] * 32 for i in range(8)], [])] * 2, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, 8, 320, 64, device=device, generator=gen).requires_grad_(True)
    k = torch.randn(2, 2, 320, 64, device=device, generator=gen).requires_grad_(True)
    v = torch.randn(2, 2, 320, 64, device=device, generator=gen).requires_grad_(True)
    allowed = prefix_sharing_mask(group_ids, segment_ids)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=allowed).transpose(1, 2)
    weight = torch.randn(dense.shape, device=device, generator=gen)
    want = torch.autograd.grad((dense * weight).sum(), (q, k, v))
    mask = prefix_attention.structure_mask(group_ids, segment_ids)
    out = {}
    for kernel in ("flex", "math"):
        got_o = cascade.cascade(q, k, v, mask, kernel=kernel)
        got = torch.autograd.grad((got_o * weight).sum(), (q, k, v))
        out[f"cascade_{kernel}"] = {"out_rel_err": _rel(got_o, dense),
                                    **{f"grad_{n}_rel_err": _rel(a, b) for n, a, b in zip("qkv", got, want)}}
    return out


def run(dry_run: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = _sizes(dry_run or device.type != "cuda")
    start = time.perf_counter()
    report = {"dry_run": dry_run, "device": str(device), "environment": environment()}
    for key, fn in (("attention", lambda: attention_report(sizes, device, dtype)),
                    ("listwise_step", lambda: listwise_step_report(sizes, device, dtype)),
                    ("head", lambda: head_report(sizes, device, dtype)),
                    ("flex_backward", lambda: flex_backward_report(device))):
        try:
            report[key] = fn()
        except Exception as err:  # keep the rest of the report
            report[key] = {"error": f"{type(err).__name__}: {err}"[:500]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - start
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized shapes, float32, on the CPU")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    json.dump(run(args.dry_run), sys.stdout, indent=2, default=str)
    print()


if __name__ == "__main__":
    main()
