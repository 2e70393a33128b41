"""Response chunking gives the direct path's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from raypo.model.batch import collate_listwise
from raypo.model.response_chunks import listwise_backward, num_response_chunks

GROUPS = [(4, [3, 1, 4, 2, 2]), (2, [2, 3]), (3, [1, 2, 2])]


def _softmax_ce_loss(batch, beta=0.7):
    """A listwise loss coupling all N responses: CE between softmax(scores) and softmax(beta * s)."""
    mask = batch.response_mask()
    scores = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    target = torch.softmax(torch.where(mask, scores, neg_inf), -1)

    def loss_fn(logps):
        logq = torch.log_softmax(torch.where(mask, beta * logps, neg_inf), -1)
        numerator = -torch.where(mask, target * logq, torch.zeros_like(logq)).sum()
        return numerator, float(batch.num_groups), {"mean_logp": logps[mask].mean().detach()}

    return loss_fn


def _run(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = listwise_backward(model, batch, _softmax_ce_loss(batch), **kwargs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads


@pytest.mark.parametrize("prefix_sharing, chunk_size, num_chunks", [
    (True, 1, None), (True, 3, None), (True, None, 2), (True, 2, 5),  # (2, 5): two chunks past N, empty
    (False, 2, None),
])
def test_chunked_equals_direct(tiny_model_f64, make_rows, prefix_sharing, chunk_size, num_chunks):
    batch = collate_listwise(make_rows(GROUPS))
    direct, g_direct = _run(tiny_model_f64, batch, prefix_sharing=prefix_sharing)
    chunked, g_chunked = _run(tiny_model_f64, batch, prefix_sharing=prefix_sharing, chunk_size=chunk_size,
                              num_chunks=num_chunks)
    assert direct.num_forward == 1
    expected_chunks = num_chunks or num_response_chunks(batch.num_responses, chunk_size)
    assert chunked.num_forward == 1 + expected_chunks
    torch.testing.assert_close(chunked.loss, direct.loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(chunked.logps, direct.logps, atol=1e-6, rtol=0)
    for name, grad in g_direct.items():
        torch.testing.assert_close(g_chunked[name], grad, atol=1e-6, rtol=0, msg=name)
    assert float(direct.metrics["mean_logp"]) < 0


def test_loss_scale_scales_gradients(tiny_model_f64, make_rows):
    batch = collate_listwise(make_rows(GROUPS))
    _, g_local = _run(tiny_model_f64, batch, chunk_size=2)  # numerator / 3 groups
    _, g_global = _run(tiny_model_f64, batch, chunk_size=2, loss_scale=1 / 12)  # e.g. 12 groups globally
    for name, grad in g_local.items():
        torch.testing.assert_close(g_global[name], grad * 3 / 12, atol=1e-9, rtol=1e-9)


def test_same_number_of_forwards_whatever_the_local_n(tiny_model_f64, make_rows):
    """ZeRO-3 invariant: ranks with different N_b but the same agreed width run the same forwards."""
    calls = []
    handle = tiny_model_f64.model.register_forward_pre_hook(lambda *a: calls.append(1))
    counts = []
    for groups in ([(3, [2, 2, 2, 2, 2, 2])], [(3, [2, 2])]):  # rank A: N=6, rank B: N=2
        calls.clear()
        batch = collate_listwise(make_rows(groups), num_responses=6)
        listwise_backward(tiny_model_f64, batch, _softmax_ce_loss(batch), chunk_size=2)
        counts.append(len(calls))
    handle.remove()
    assert counts[0] == counts[1] == 1 + 3


def test_backward_fn_is_called_once_per_chunk(tiny_model_f64, make_rows):
    batch = collate_listwise(make_rows(GROUPS))
    objectives = []

    def backward(objective):
        objectives.append(objective.detach())
        objective.backward()

    listwise_backward(tiny_model_f64, batch, _softmax_ce_loss(batch), chunk_size=2, backward_fn=backward)
    assert len(objectives) == num_response_chunks(batch.num_responses, 2) == 3


def test_constant_loss_still_runs_a_backward(tiny_model_f64, make_rows):
    """A rank whose loss does not depend on the log-probs (nothing valid) must still run its backward."""
    batch = collate_listwise(make_rows([(3, [2])]))
    out = listwise_backward(tiny_model_f64, batch, lambda s: (torch.zeros((), dtype=s.dtype), 1.0, {}))
    assert out.loss == 0
    assert all(p.grad is not None and not p.grad.any() for p in tiny_model_f64.parameters())
