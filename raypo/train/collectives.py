"""The collectives of the worker loop, each a no-op in a single process.

ZeRO-3 runs collectives inside forward and backward, so every rank must make the same calls: the loop
agrees on counts (how many steps every rank can supply, the widest list for response chunks, how many eval
batches) before it runs them, and sums losses and metrics across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

#: metric name -> (sum, count), float64 scalars, so metrics aggregate by addition across micro-batches,
#: steps and ranks (:func:`raypo.losses.metrics.finalize_metrics` divides at the end).
MetricSums = dict[str, tuple[torch.Tensor, torch.Tensor]]


#: DeepSpeed's CPU shared-memory all-reduce, used only by its inference all-reduce (``inference_all_reduce``),
#: never by ZeRO-3 training.
_SHM_INFERENCE_OP = "deepspeed_shm_comm"


def init_process_group(use_gpu: bool) -> None:
    """``deepspeed.init_distributed`` with NCCL on GPUs and gloo on CPUs.

    On CPUs DeepSpeed would first JIT-compile its shared-memory op (a C++ build of about a minute on two
    cores, once per installed DeepSpeed, under a file lock in ``~/.cache/torch_extensions``). Training never
    calls it, and a process killed during that build (a worker stopped by a fault or a driver killed) leaves
    the lock behind, so every later process on the machine waits on it forever. So it is marked unusable
    here and not built.
    """
    import deepspeed

    if not use_gpu:
        deepspeed.ops.__compatible_ops__[_SHM_INFERENCE_OP] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``values`` reduced over the ranks (a copy; the input is left as it is)."""
    if _distributed():
        values = values.clone()
        dist.all_reduce(values, op=op)
    return values


def agreed_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` of any rank, e.g. the number of micro-batches every rank can supply."""
    return int(all_reduce(torch.tensor([value], device=device), op=dist.ReduceOp.MIN).item())


def agreed_max(value: int, device: torch.device) -> int:
    """The largest ``value`` of any rank, e.g. the widest list N for the response-chunk count."""
    return int(all_reduce(torch.tensor([value], device=device), op=dist.ReduceOp.MAX).item())


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; for the token-budget exchange of groups)."""
    if _distributed():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def all_reduce_metric_sums(sums: MetricSums, device: torch.device) -> MetricSums:
    """Sum every (sum, count) pair across ranks in one collective.

    Ranks may hold different metric names (a dimension absent from a rank's batch): the names are
    gathered first so every rank reduces the same vector.
    """
    names = sorted(set().union(*all_gather_objects(sorted(sums))))
    zero = torch.zeros((), dtype=torch.float64)
    flat = torch.stack([torch.stack([sums.get(n, (zero, zero))[0].double().cpu(),
                                     sums.get(n, (zero, zero))[1].double().cpu()]) for n in names]) \
        if names else torch.zeros(0, 2, dtype=torch.float64)
    flat = all_reduce(flat.to(device)).cpu()
    return {n: (flat[i, 0], flat[i, 1]) for i, n in enumerate(names)}
