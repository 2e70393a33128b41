"""Log-probabilities of label tokens without a [tokens, vocab] fp32 logits tensor.

A listwise loss needs one scalar per response, s_i = sum_t log p(y_t | x, y_<t). The usual path builds
``logits = lm_head(h)`` for every position ([T, V], 0.5 MB per token in fp32 for a 128k vocabulary),
upcasts it and takes ``log_softmax``. Here the head runs only on the T response positions, in chunks of
``chunk_size`` rows:

    z_c   = (h_c @ W^T).float()                  [c, V]  GEMM in the model dtype, one chunk upcast
    lse_c = logsumexp(z_c)                        [c]
    logp  = z_c[y] - lse_c                        [c]     log p(label)
    H     = lse_c - sum_v softmax(z_c)_v z_c,v    [c]     entropy in nats (optional, never differentiated)

Backward recomputes each chunk's logits instead of storing them (d logp / dz = onehot(y) - softmax(z)):

    dz_c = g_c * (onehot(y_c) - softmax(z_c))     [c, V]  fp32 (in place on z_c), cast to the model dtype
    dh_c = dz_c @ W                               [c, H]
    dW  += dz_c^T @ h_c                           [V, H]  accumulated in fp32 across chunks

The fp32 logits come straight out of the GEMM on CUDA (fp32-output bf16 GEMM, no low-precision copy to
upcast); the log-sum-exp runs in place on them (``torch.logsumexp`` would allocate a second [c, V]). The
weight gradient is accumulated in an fp32 [V, H] buffer by ``addmm`` (fp32 output from bf16 operands on
CUDA; from the fp32 dz on CPU), so no chunk's contribution is rounded to bf16 before the sum. Peak extra
memory: one fp32 [c, V] chunk (plus its bf16 cast in the backward for a bf16 model) and the fp32 [V, H]
gradient buffer, never [T, V] fp32. Values equal the naive ``log_softmax(h @ W^T).gather(y)`` path
(gradcheck in float64 in tests/model/test_logprobs.py).

ZeRO-3: ``lm_head.weight`` is a 0-element shard outside its module's forward. :func:`lm_head_label_logprobs`
therefore runs the chunked head *as the forward of the lm_head module* (it swaps ``forward`` for the call),
so DeepSpeed's module hooks gather the weight before the forward, release it after, gather it again before
the backward (pre-backward hook on the module's outputs) and reduce-scatter its gradient as for any
``nn.Linear``. It must itself be called inside the engine's forward (``raypo.model.listwise`` does that),
so the engine's per-forward bookkeeping (micro-step counter, trace, output hooks) covers the head too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raypo.model.shape import DEFAULT_HEAD_CHUNK_SIZE  # one value for the head and raypo plan


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision models, float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """``a @ b`` with an ``acc`` result, written into ``out`` when given (a reused chunk buffer): for
    low-precision inputs on CUDA, cuBLAS's fp32-output GEMM (bf16 tensor cores, no rounded low-precision
    [c, V] copy to upcast); in ``acc`` itself, the GEMM straight into ``out``; elsewhere the GEMM in the
    model dtype and one cast (CPUs have no fp32-output bf16 GEMM)."""
    if a.dtype != acc and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=acc) if out is None else torch.mm(a, b, out_dtype=acc, out=out)
        except (RuntimeError, TypeError, NotImplementedError):  # older torch / unsupported dtype pair
            pass
    if out is None:
        return (a @ b).to(acc)
    if a.dtype == acc:
        return torch.mm(a, b, out=out)
    return out.copy_(a @ b)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """[c, V] logits in the accumulation dtype (fp32, float64 for float64 inputs), into ``out`` if given."""
    logits = _mm_acc(hidden, weight.t(), _accum_dtype(hidden.dtype), out)
    if bias is not None:
        logits += bias
    return logits


def _chunk_buffer(num_tokens: int, chunk_size: int, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One [min(c, T), V] buffer that every chunk of a call writes its logits into. Why: a fresh [c, V]
    tensor per chunk is a fresh large allocation (glibc mmaps it), whose pages the kernel faults in and
    zeroes on first touch, once per chunk and pass; on CPU that costs about as much as the elementwise
    passes over the chunk. Peak memory is unchanged: one chunk was alive at a time before too."""
    return torch.empty(min(chunk_size, num_tokens), weight.shape[0], dtype=dtype, device=weight.device)


def _chunk_label_lse(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z[y], logsumexp(z)) of a fresh logits chunk, overwriting ``z`` (no second [c, V] buffer, which
    ``torch.logsumexp`` would allocate)."""
    picked = z.gather(1, labels[:, None]).squeeze(1)
    top = z.amax(dim=-1, keepdim=True)
    lse = top.squeeze(1) + z.sub_(top).exp_().sum(-1).log_()
    return picked, lse


def _accumulate_weight_grad(grad_w: torch.Tensor, dz: torch.Tensor, dz_low: torch.Tensor,
                            h_c: torch.Tensor) -> None:
    """grad_w += dz^T h_c, accumulated in fp32 across chunks (no per-chunk rounding to the model dtype).

    CUDA, low precision: ``addmm`` with an fp32 output from the bf16 operands (tensor cores). Elsewhere: the
    fp32 ``dz`` against ``h_c`` upcast (a [c, H] copy), in fp32.
    """
    if dz_low.dtype != grad_w.dtype and grad_w.is_cuda:
        try:
            torch.addmm(grad_w, dz_low.t(), h_c, out_dtype=grad_w.dtype, out=grad_w)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    grad_w.addmm_(dz.t(), h_c.to(grad_w.dtype))


class ChunkedLabelLogProb(torch.autograd.Function):
    """``(hidden [T, H], weight [V, H], bias [V] | None, labels [T]) -> (logp [T], entropy [T] | empty)``.

    Both outputs are in the accumulation dtype (fp32, or float64 for float64 inputs). ``entropy`` is
    marked non-differentiable: it is only used from the reference model (MallowsPO's dispersion).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, with_entropy: bool):
        acc = _accum_dtype(hidden.dtype)
        num_tokens = hidden.shape[0]
        logp = hidden.new_empty(num_tokens, dtype=acc)
        lse = hidden.new_empty(num_tokens, dtype=acc)
        entropy = hidden.new_empty(num_tokens if with_entropy else 0, dtype=acc)
        buffer = _chunk_buffer(num_tokens, chunk_size, weight, acc)
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            z = _chunk_logits(hidden[start:stop], weight, bias, out=buffer[:stop - start])
            if with_entropy:  # reference only (no backward): needs z after the softmax
                lse_c = torch.logsumexp(z, dim=-1)
                picked = z.gather(1, labels[start:stop, None]).squeeze(1)
                entropy[start:stop] = lse_c - (torch.exp(z - lse_c[:, None]) * z).sum(-1)
            else:
                picked, lse_c = _chunk_label_lse(z, labels[start:stop])
            del z
            lse[start:stop] = lse_c
            logp[start:stop] = picked - lse_c
        del buffer
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        grad_logp = grad_logp.to(acc)
        num_tokens = hidden.shape[0]
        # one fp32 [c, V] buffer for every chunk's logits and dz (and one in the model dtype for its cast)
        buffer = _chunk_buffer(num_tokens, ctx.chunk_size, weight, acc)
        low = _chunk_buffer(num_tokens, ctx.chunk_size, weight, weight.dtype) if weight.dtype != acc else None
        for start in range(0, num_tokens, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, num_tokens)
            h_c, g_c = hidden[start:stop], grad_logp[start:stop]
            # in place on the recomputed fp32 logits chunk
            dz = _chunk_logits(h_c, weight, bias, out=buffer[:stop - start])
            dz.sub_(lse[start:stop, None]).exp_().mul_(-g_c[:, None])
            dz.scatter_add_(1, labels[start:stop, None], g_c[:, None])  # + g * onehot(y)
            if need_b:
                grad_b += dz.sum(0)
            dz_low = dz if low is None else low[:stop - start].copy_(dz)  # no copy for fp32 weights
            if need_w:
                _accumulate_weight_grad(grad_w, dz, dz_low, h_c)
            del dz
            if need_h:
                torch.mm(dz_low, weight, out=grad_h[start:stop])
            del dz_low
        del buffer, low
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


def chunked_label_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_HEAD_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(labels[t] | hidden[t]) under the linear head ``weight`` (and ``bias``), chunked over tokens.

    Args:
        hidden: [T, H] final hidden states at the positions that *predict* each label.
        weight: [V, H] output-embedding matrix (``lm_head.weight``), in the model dtype.
        labels: [T] int64 target token ids.
        chunk_size: rows of [chunk, V] logits materialised at once (forward and backward).
        with_entropy: also return the per-token entropy H_t = -sum_v p_v log p_v in nats (no gradient).

    Returns:
        ``(logp [T], entropy [T] or None)`` in fp32 (float64 for float64 inputs).
    """
    if hidden.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"expected hidden [T, H] and labels [T], got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logp, entropy = ChunkedLabelLogProb.apply(hidden, weight, bias, labels, int(chunk_size),
                                              bool(with_entropy))
    return logp, (entropy if with_entropy else None)


def reference_label_logprobs(hidden, weight, labels, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive path (full [T, V] logits, fp32 ``log_softmax``): the test oracle, not for training."""
    logits = _chunk_logits(hidden, weight, bias)
    logsm = torch.log_softmax(logits, dim=-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logsm.gather(1, labels[:, None]).squeeze(1), entropy


# ----------------------------------------------------------------------------------------------------
# Running the head as the lm_head module's forward (ZeRO-3)
# ----------------------------------------------------------------------------------------------------


def output_vocab_size(lm_head: nn.Module) -> int:
    """|V| = rows of the output embedding (``logits.shape[-1]``); ZeRO-3 shards keep it in ``ds_shape``."""
    weight = lm_head.weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def check_head_supported(lm_head: nn.Module, config=None) -> None:
    """Raise unless logits are plain ``h @ W^T (+ b)`` (no soft-capping, logit scaling, LoRA on the head)."""
    if not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        raise NotImplementedError(
            f"the output head {type(lm_head).__name__} has no plain .weight (e.g. LoRA or modules_to_save on "
            "lm_head); raypo's chunked log-prob head needs a linear lm_head: leave lm_head out of "
            "model.lora.target_modules")
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(config, attr, None) if config is not None else None
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"model config sets {attr}={value}; raypo's chunked log-prob head computes plain h @ W^T "
                "logits and would be wrong for this model")


def _head_forward(module: nn.Module, hidden, labels, *, chunk_size: int, with_entropy: bool):
    return chunked_label_logprobs(hidden, module.weight, labels, bias=getattr(module, "bias", None),
                                  chunk_size=chunk_size, with_entropy=with_entropy)


def call_as_forward(module: nn.Module, fn, *args, **kwargs):
    """Call ``fn(module, *args, **kwargs)`` through ``module.__call__`` so its hooks run around it.

    Hooks (ZeRO-3 gather/release and pre-backward gather, PEFT, accelerate) are attached to the module's
    ``__call__``; temporarily binding ``fn`` as the instance's ``forward`` lets a computation that reads the
    module's parameters run with them materialised. Not thread-safe for one module (nothing here is).
    """
    had_instance_forward = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = lambda *a, **k: fn(module, *a, **k)
    try:
        return module(*args, **kwargs)
    finally:
        if had_instance_forward:
            module.forward = previous
        else:
            del module.forward


def lm_head_label_logprobs(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_HEAD_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunked_label_logprobs` with ``lm_head``'s weight, run as ``lm_head``'s forward (ZeRO-3 safe).

    Returns ``(logp [T], entropy [T] in nats or None)``.
    """
    return call_as_forward(lm_head, _head_forward, hidden, labels, chunk_size=chunk_size,
                           with_entropy=with_entropy)


def normalised_entropy(entropy_sum: torch.Tensor, num_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """MallowsPO's H̄(y) = sum_t H_t / (num_tokens * ln|V|) in [0, 1]; 0 where a response has no tokens."""
    denom = num_tokens.to(entropy_sum.dtype) * math.log(vocab_size)
    return torch.where(num_tokens > 0, entropy_sum / denom.clamp_min(1e-30), torch.zeros_like(entropy_sum))
