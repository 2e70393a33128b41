"""The train/eval split, the per-epoch order, and the hand-off of datasets to Ray Train.

The eval split is a seeded hash of each prompt's split key, so it is stable across runs, cluster sizes and
data order; each epoch's order is a seeded sort by a hash of (seed, epoch, prompt id); ``trainer_datasets``
gives Ray Train one dataset per epoch (``train_key(epoch)``) and the eval set (``EVAL_KEY``), and
``eval_rows_for_rank`` partitions eval rows across ranks by hash (each row on exactly one rank).
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from raypo.data.schema import split_key

EVAL_KEY = "eval"


# ----------------------------------------------------------------------------------------------------
# Split, shuffle, hand-off
# ----------------------------------------------------------------------------------------------------


def eval_bucket(prompt_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from (seed, the prompt id's split key): stable across runs and machines."""
    h = hashlib.blake2b(f"{seed}\x00{split_key(prompt_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def in_eval(prompt_id: str, eval_fraction: float, seed: int) -> bool:
    return eval_bucket(prompt_id, seed) < eval_fraction


def _split_batch(batch: pa.Table, eval_fraction: float, seed: int, want_eval: bool) -> pa.Table:
    mask = [in_eval(pid, eval_fraction, seed) == want_eval for pid in batch.column("prompt_id").to_pylist()]
    return batch.filter(pa.array(mask, pa.bool_()))


def split_train_eval(ds, eval_fraction: float, seed: int):
    """(train, eval): a row is in eval iff ``eval_bucket(prompt_id, seed) < eval_fraction``.

    Depends only on the ids and the seed, never on row order, block layout, shuffling or cluster size,
    so the same prompt lands on the same side in every run.
    """
    def part(want_eval: bool):
        kwargs = {"eval_fraction": eval_fraction, "seed": seed, "want_eval": want_eval}
        return ds.map_batches(_split_batch, batch_format="pyarrow", fn_kwargs=kwargs)

    return part(False), part(True)


def epoch_sort_key(prompt_id: str, seed: int, epoch: int) -> int:
    """The position key of a row in epoch ``epoch``'s order (a 63-bit hash of seed, epoch and prompt id)."""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _order_key(batch: pa.Table, seed: int, epoch: int) -> pa.Table:
    keys = [epoch_sort_key(pid, seed, epoch) for pid in batch.column("prompt_id").to_pylist()]
    return batch.append_column("_order", pa.array(keys, pa.int64()))


# A materialised dataset up to this size is reordered on the driver (one pass, no shuffle tasks); larger
# ones with a distributed sort.
DRIVER_SHUFFLE_LIMIT_BYTES = 256 * 2**20


def shuffle_for_epoch(ds, seed: int, epoch: int):
    """The rows in a seeded order for ``epoch``: sorted by :func:`epoch_sort_key` (seed, epoch, prompt id).

    Reproducible (same seed and epoch -> same order, whatever the block layout or cluster), different
    between epochs, and a full shuffle; unlike ``randomize_block_order(seed=int)`` (the same order every
    epoch) or ``local_shuffle_buffer_size`` (short batches mid-stream, ray issue 66085). A materialised
    dataset under :data:`DRIVER_SHUFFLE_LIMIT_BYTES` is reordered on the driver, else by ``ds.sort``;
    both give the same order.
    """
    import ray.data
    from ray.data.dataset import MaterializedDataset

    if isinstance(ds, MaterializedDataset) and ds.size_bytes() <= DRIVER_SHUFFLE_LIMIT_BYTES:
        blocks = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        if not blocks:
            return ds
        table = pa.concat_tables(blocks)
        keys = [epoch_sort_key(pid, seed, epoch) for pid in table.column("prompt_id").to_pylist()]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        return ray.data.from_arrow(table.take(pa.array(order, pa.int64())))
    return ds.map_batches(_order_key, fn_kwargs={"seed": seed, "epoch": epoch}, batch_format="pyarrow") \
        .sort("_order").drop_columns(["_order"])


def train_key(epoch: int) -> str:
    """The dataset name of ``epoch``'s training data for ``ray.train.get_dataset_shard``."""
    return f"train_epoch_{epoch}"


def trainer_datasets(train_ds, eval_ds, *, epochs: int, seed: int, materialize: bool = True
                     ) -> dict[str, Any]:
    """Datasets for ``TorchTrainer(datasets=...)``: one shuffled copy per epoch plus ``eval``.

    In the train function, epoch ``e`` reads ``ray.train.get_dataset_shard(train_key(e))``. The copies
    are materialised by default so that no Ray Data task competes with the training workers for CPUs
    (and so a resumed run re-reads exactly the same order). Pair with :func:`data_config`.
    """
    out = {}
    for epoch in range(epochs):
        ds = shuffle_for_epoch(train_ds, seed, epoch)
        out[train_key(epoch)] = ds.materialize() if materialize else ds
    out[EVAL_KEY] = eval_ds
    return out


def data_config(datasets: dict[str, Any]):
    """``ray.train.DataConfig`` splitting the training epochs equally across workers (``streaming_split``,
    equal row counts so every rank runs the same number of steps); ``eval`` is not split: every worker
    sees all of it and keeps the rows of its rank with :func:`eval_rows_for_rank`."""
    import ray.train

    return ray.train.DataConfig(datasets_to_split=[k for k in datasets if k != EVAL_KEY])


def eval_rows_for_rank(prompt_ids: list[str], rank: int, world_size: int) -> list[bool]:
    """Which eval rows a rank evaluates: a deterministic hash partition (each row on exactly one rank)."""
    return [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "big") % world_size == rank
            for p in prompt_ids]
