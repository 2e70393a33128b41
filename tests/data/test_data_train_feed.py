"""Tokenised rows feed two Ray Train workers (a real TorchTrainer): groups intact, epochs reshuffled."""

from __future__ import annotations

import json

import pytest

from raypo.data.splits import data_config, epoch_sort_key, trainer_datasets

pytestmark = pytest.mark.integration


def _train_fn(config):
    import json
    import os

    import ray.train

    from raypo.data.splits import EVAL_KEY, eval_rows_for_rank, train_key
    from raypo.model.batch import collate_listwise

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seen = {}
    for epoch in range(config["epochs"]):
        rows = []
        shard = ray.train.get_dataset_shard(train_key(epoch))
        for batch in shard.iter_batches(batch_size=4, batch_format="numpy"):
            listwise = collate_listwise(batch)  # the model side's collate takes the rows as they come
            for j, pid in enumerate(batch["prompt_id"]):
                rows.append({"id": str(pid), "n": int(batch["num_responses"][j]),
                             "lengths": [len(r) for r in listwise.response_ids[j]],
                             "prompt": len(listwise.prompt_ids[j]), "scores": len(batch["scores"][j])})
        seen[epoch] = rows
    eval_ids = []
    for batch in ray.train.get_dataset_shard(EVAL_KEY).iter_batches(batch_size=16, batch_format="numpy"):
        ids = [str(p) for p in batch["prompt_id"]]
        eval_ids += [p for p, mine in zip(ids, eval_rows_for_rank(ids, rank, world)) if mine]
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "eval": eval_ids}, f)
    ray.train.report({"rows": len(seen[0])})


def test_two_workers_get_whole_groups_and_a_new_order_each_epoch(synthetic_datasets, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # The workers cannot import this test module: ship the train function by value.
    cloudpickle.register_pickle_by_value(__import__(__name__))

    cfg, train, evals, _ = synthetic_datasets
    datasets = trainer_datasets(train, evals, epochs=2, seed=cfg.shuffle_seed)
    trainer = TorchTrainer(
        _train_fn, train_loop_config={"epochs": 2, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="data-feed", storage_path=str(tmp_path / "runs")),
        datasets=datasets, dataset_config=data_config(datasets))
    trainer.fit()

    expected = {r["prompt_id"]: r for r in train.take_all()}
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    orders = []
    for epoch in ("0", "1"):
        per_rank = [r["seen"][epoch] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1])  # equal rows per rank: equal step counts
        ids = [row["id"] for rows in per_rank for row in rows]
        assert len(ids) == len(set(ids))  # no prompt on two workers
        assert len(expected) - len(ids) < 2 and set(ids) <= set(expected)
        for rows in per_rank:
            for row in rows:  # every group arrives whole: all N responses, same tokens as built
                ref = expected[row["id"]]
                assert row["n"] == ref["num_responses"] == len(row["lengths"]) == row["scores"] == 4
                assert row["lengths"] == list(ref["response_lengths"])
                assert row["prompt"] == ref["prompt_length"]
            keys = [epoch_sort_key(row["id"], cfg.shuffle_seed, int(epoch)) for row in rows]
            assert keys == sorted(keys)  # each rank reads its part of the epoch's seeded order, in order
        orders.append(per_rank[0])
    assert [r["id"] for r in orders[0]] != [r["id"] for r in orders[1]]  # a new order each epoch
    eval_seen = ranks[0]["eval"] + ranks[1]["eval"]
    assert sorted(eval_seen) == sorted(r["prompt_id"] for r in evals.take_all())  # eval: every row once
