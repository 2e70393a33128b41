"""The chunked log-prob head vs full logits: peak memory and time, forward + backward.

T response positions with final hidden states h [T, H] and an lm_head W [V, H]; both variants compute
logp_t = log softmax(h_t W^T)[y_t] and backpropagate sum_t g_t logp_t into h and W:

* full logits (what ``model(...).logits`` + ``log_softmax`` + ``gather`` does): z = h W^T [T, V] fp32,
  log_softmax(z) [T, V] saved for the backward, dz [T, V] in the backward;
* raypo (:func:`raypo.model.logprobs.chunked_label_logprobs`): [c, V] logits per chunk of c rows, recomputed
  in the backward (one extra GEMM), never [T, V].

Vocabularies 32,000 (hidden 256) and 128,256 (Llama-3, hidden 128: smaller so a CPU run stays short);
T = 1024 tokens, chunk c = 256 rows (raypo's default, 1024, is sized for GPUs and 8k-token micro-batches;
here it would hold all the logits at once, so it is scaled with T).

Run: ``python -m bench.logprob_head [--smoke]``.
"""

from __future__ import annotations

import torch

from bench.common import bench_main, interleaved_times, measure_memory, paired_ratio, setup_torch

CASES = ((32000, 256), (128256, 128))  # (vocab, hidden)
TOKENS = 1024
CHUNK = 256


def _tensors(vocab: int, hidden: int, tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=gen)).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    g = torch.randn(tokens, generator=gen)
    return h, w, y, g


def full_logits_step(h, w, y, g):
    """The naive path: [T, V] fp32 logits, log_softmax, gather; backward through autograd."""

    def step():
        h.grad = w.grad = None
        logp = torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, y[:, None]).squeeze(1)
        (logp * g).sum().backward()

    return step


def chunked_step(h, w, y, g, chunk: int):
    from raypo.model.logprobs import chunked_label_logprobs

    def step():
        h.grad = w.grad = None
        logp, _ = chunked_label_logprobs(h, w, y, chunk_size=chunk)
        (logp * g).sum().backward()

    return step


def memory_case(case: dict):
    h, w, y, g = _tensors(case["vocab"], case["hidden"], case["tokens"])
    if case["variant"] == "full":
        return full_logits_step(h, w, y, g)
    return chunked_step(h, w, y, g, case["chunk"])


def run_case(vocab: int, hidden: int, tokens: int, chunk: int, *, rounds: int, memory: str) -> dict:
    h, w, y, g = _tensors(vocab, hidden, tokens)
    variants = {"full": full_logits_step(h, w, y, g), "chunked": chunked_step(h, w, y, g, chunk)}
    times = interleaved_times(variants, rounds=rounds)
    ratio = paired_ratio(times["chunked"], times["full"])
    row = {"vocab": vocab, "hidden": hidden, "tokens": tokens, "chunk": chunk,
           "full_s": min(times["full"]), "chunked_s": min(times["chunked"]), "time_ratio": ratio["best"],
           "time_ratio_median": ratio["median"], "time_ratio_min": ratio["min"],
           "time_ratio_max": ratio["max"],
           "logits_fp32_mib": tokens * vocab * 4 / 2**20}
    if memory != "off":
        for variant in ("full", "chunked"):
            case = {"vocab": vocab, "hidden": hidden, "tokens": tokens, "chunk": chunk, "variant": variant}
            row[f"{variant}_peak_mib"] = measure_memory("bench.logprob_head", case,
                                                        in_process=memory == "in_process")["peak_mib"]
        row["memory_ratio"] = row["full_peak_mib"] / row["chunked_peak_mib"]
    return row


def run(smoke: bool = False, rounds: int = 3, memory: str = "subprocess") -> dict:
    setup_torch(1)
    cases, tokens, chunk = CASES, TOKENS, CHUNK
    if smoke:
        cases, tokens, chunk, rounds = ((1000, 32),), 64, 16, 1
        memory = "in_process" if memory != "off" else memory
    return {"rows": [run_case(v, h, tokens, chunk, rounds=rounds, memory=memory) for v, h in cases]}


if __name__ == "__main__":
    bench_main(run, __doc__)
