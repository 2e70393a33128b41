"""ZeRO-3 (DeepSpeed on gloo, 2 CPU processes): the chunked head and response chunks stay exact.

Checks that the lm_head route of :mod:`raypo.model.logprobs` gathers the partitioned weight in forward and
backward, that response chunks accumulate (not overwrite) gradient partitions, and that two ranks with
different N_b but an agreed width N give the gradient of one process over the union batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.integration

WORLD = 2
NMAX = 4
RANK_GROUPS = [[(4, [3, 1, 4, 2]), (2, [2, 3])], [(3, [2, 2])]]  # rank 1 has N_b = 2 only


def _rows(groups, seed):
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(8, 500, (n,), generator=gen).tolist()

    return [{"prompt_ids": ids(p), "response_ids": [ids(r) for r in rs]} for p, rs in groups]


def _loss_fn(batch, scale):
    """Plackett-Luce top-1 (softmax CE on response 0) summed over groups, times ``scale``."""
    mask = batch.response_mask()

    def loss_fn(logps):
        logq = torch.log_softmax(torch.where(mask, logps, torch.tensor(-1e9, dtype=logps.dtype)), -1)
        return -logq[:, 0].sum() * scale, 1.0, {}

    return loss_fn


def _worker(rank: int, port: int, model_dir: str, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from raypo.model.batch import collate_listwise
    from raypo.model.listwise import ListwiseLogProbModel, grouped_logprobs
    from raypo.model.loading import load_policy
    from raypo.model.response_chunks import listwise_backward
    from raypo.train.collectives import init_process_group

    init_process_group(use_gpu=False)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_force_ds_cpu_optimizer": False,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    policy = load_policy(model_dir, dtype="float32", ds_config=ds)
    partitioned = policy.lm_head.weight.numel() == 0
    model = ListwiseLogProbModel(policy, head_chunk_size=3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0),
                                      config=ds)
    batch = collate_listwise(_rows(RANK_GROUPS[rank], seed=rank), num_responses=NMAX)
    total_groups = sum(len(g) for g in RANK_GROUPS)
    # DeepSpeed averages gradients over ranks, so a globally normalised loss is scaled by the world size
    out = listwise_backward(engine, batch, _loss_fn(batch, WORLD / total_groups), chunk_size=1,
                            loss_scale=1.0, backward_fn=engine.backward)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        scored = grouped_logprobs(engine, batch, with_entropy=True)
    if rank == 0:
        torch.save({"grads": grads, "partitioned": partitioned, "num_forward": out.num_forward,
                    "logps": scored.logps, "entropy": scored.entropy}, result_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_zero3_two_ranks_match_one_process(tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp

    from raypo.model.batch import collate_listwise
    from raypo.model.listwise import ListwiseLogProbModel, grouped_logprobs
    from raypo.model.loading import load_policy
    from raypo.model.response_chunks import listwise_backward

    result = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(_free_port(), str(tiny_model_dir), str(result)), nprocs=WORLD,
                       join=True, start_method="spawn")
    got = torch.load(result)
    assert got["partitioned"] and got["num_forward"] == 1 + NMAX

    # one process, no DeepSpeed, the union of both ranks' groups, direct path
    model = ListwiseLogProbModel(load_policy(tiny_model_dir, dtype="float32"))
    union = collate_listwise(_rows(RANK_GROUPS[0], 0) + _rows(RANK_GROUPS[1], 1), num_responses=NMAX)
    listwise_backward(model, union, _loss_fn(union, 1.0 / union.num_groups), loss_scale=1.0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], param.grad, atol=2e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        plain = grouped_logprobs(model, collate_listwise(_rows(RANK_GROUPS[0], 0), num_responses=NMAX),
                                 with_entropy=True)
    torch.testing.assert_close(got["logps"], plain.logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["entropy"], plain.entropy, atol=1e-6, rtol=0)
