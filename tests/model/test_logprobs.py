"""The chunked log-prob head against the naive full-logits path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raypo.model.logprobs import (
    ChunkedLabelLogProb,
    call_as_forward,
    chunked_label_logprobs,
    lm_head_label_logprobs,
    normalised_entropy,
    reference_label_logprobs,
)


def _inputs(t=7, h=5, v=11, dtype=torch.float64, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=gen, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (t,), generator=gen)
    return hidden, weight, b, labels


@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64(bias):
    hidden, weight, b, labels = _inputs(bias=bias)

    def fn(h, w, *rest):
        return ChunkedLabelLogProb.apply(h, w, rest[0] if rest else None, labels, 3, False)[0]

    args = (hidden, weight, b) if bias else (hidden, weight)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_equals_naive_values_and_grads(chunk):
    hidden, weight, _, labels = _inputs(t=9, h=6, v=13)
    upstream = torch.randn(9, dtype=torch.float64)
    logp, ent = chunked_label_logprobs(hidden, weight, labels, chunk_size=chunk, with_entropy=True)
    (logp * upstream).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_logp, ref_ent = reference_label_logprobs(hidden, weight, labels)
    (ref_logp * upstream).sum().backward()
    torch.testing.assert_close(logp, ref_logp, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(g_h, hidden.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_w, weight.grad, atol=1e-12, rtol=0)
    assert not ent.requires_grad


def test_no_tokens_gives_zero_weight_grad():
    hidden, weight, _, labels = _inputs(t=0)
    logp, _ = chunked_label_logprobs(hidden, weight, labels, chunk_size=4)
    assert logp.shape == (0,)
    logp.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_bf16_close_to_float64():
    hidden, weight, _, labels = _inputs(t=16, h=32, v=64, seed=1)
    exact, _ = reference_label_logprobs(hidden.detach(), weight.detach(), labels)
    approx, _ = chunked_label_logprobs(hidden.detach().bfloat16(), weight.detach().bfloat16(), labels,
                                       chunk_size=5)
    assert approx.dtype == torch.float32
    # bf16 GEMM then fp32 softmax: per-token error of the order of bf16's 2^-8 relative precision
    assert (approx.double() - exact).abs().max() < 0.1


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op (a CPU stand-in for a peak-memory check)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_materialises_tokens_by_vocab():
    t, h, v, chunk = 64, 8, 50, 4
    hidden, weight, _, labels = _inputs(t=t, h=h, v=v, dtype=torch.float32)
    with _MaxNumel() as probe:
        logp, _ = chunked_label_logprobs(hidden, weight, labels, chunk_size=chunk, with_entropy=True)
        logp.sum().backward()
    assert probe.max_numel <= max(chunk * v, v * h, t * h)
    assert probe.max_numel < t * v


def test_lm_head_route_runs_module_hooks():
    """The head runs as lm_head's forward: its hooks fire around the forward (what ZeRO-3 relies on)."""
    head = torch.nn.Linear(5, 11, bias=False, dtype=torch.float64)
    calls = []
    head.register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    head.register_forward_hook(lambda mod, args, out: calls.append("post"))
    hidden, _, _, labels = _inputs()
    logp, _ = lm_head_label_logprobs(head, hidden, labels, chunk_size=2)
    ref, _ = reference_label_logprobs(hidden, head.weight, labels)
    torch.testing.assert_close(logp, ref)
    assert calls == ["pre", "post"]
    assert "forward" not in head.__dict__  # the temporary forward is removed again
    assert torch.equal(head(hidden), hidden @ head.weight.t())


def test_call_as_forward_restores_instance_forward():
    mod = torch.nn.Identity()
    marker = lambda x: x + 1  # noqa: E731
    mod.forward = marker
    assert call_as_forward(mod, lambda m, x: x * 2, torch.ones(1)).item() == 2
    assert mod.forward is marker


def test_normalised_entropy_uniform_is_one():
    v = 13
    hidden = torch.zeros(4, 3, dtype=torch.float64)  # zero hidden -> uniform softmax -> H = ln V
    weight = torch.randn(v, 3, dtype=torch.float64)
    _, ent = chunked_label_logprobs(hidden, weight, torch.zeros(4, dtype=torch.long), with_entropy=True)
    h_bar = normalised_entropy(ent.sum()[None], torch.tensor([4]), v)
    torch.testing.assert_close(h_bar, torch.ones(1, dtype=torch.float64))
    assert normalised_entropy(torch.zeros(1), torch.tensor([0]), v).item() == 0.0


def test_bf16_weight_grad_accumulates_in_fp32_across_chunks():
    """One token per chunk: the weight gradient of 64 chunks equals the one-chunk gradient up to fp32
    summation order and the final bf16 rounding (a per-chunk bf16 rounding would drift by many ulps)."""
    hidden, weight, _, labels = _inputs(t=64, h=16, v=32, seed=2)
    h16, w16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
    grads = []
    for chunk in (64, 1):
        w16.grad = None
        logp, _ = chunked_label_logprobs(h16, w16, labels, chunk_size=chunk)
        logp.sum().backward()
        grads.append(w16.grad.double())
    one, many = grads
    ulp = one.abs().clamp_min(2**-20) * 2**-7  # one bf16 ulp
    assert ((many - one).abs() <= ulp).all()
    assert (many != one).double().mean() < 0.05


def _count_vocab_buffers(size: int):
    """A dispatch mode counting the [c, V]-sized tensors that ops allocate (outputs not written into an
    argument's storage, ``out=`` included)."""

    class _Count(TorchDispatchMode):
        big = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            given = {a.data_ptr() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.numel() == size and out.data_ptr() not in given:
                self.big += 1
            return out

    return _Count()


def test_chunks_share_one_vocab_buffer_without_entropy():
    """Without entropy the forward's log-sum-exp runs in place, and every chunk's logits GEMM writes into
    one [c, V] buffer made once per call (a fresh one per chunk costs page faults on CPU): one [c, V]
    allocation in the forward and one in the backward (fp32 weights: dz is cast to nothing)."""
    t, h, v, chunk = 64, 8, 50, 4
    hidden, weight, _, labels = _inputs(t=t, h=h, v=v, dtype=torch.float32)
    with torch.no_grad(), _count_vocab_buffers(chunk * v) as probe:
        logp, _ = chunked_label_logprobs(hidden, weight, labels, chunk_size=chunk)
    assert probe.big == 1
    torch.testing.assert_close(logp, reference_label_logprobs(hidden, weight, labels)[0])
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logp, _ = chunked_label_logprobs(hidden, weight, labels, chunk_size=chunk)
    with _count_vocab_buffers(chunk * v) as probe:
        logp.sum().backward()
    assert probe.big == 1
