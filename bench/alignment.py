"""Alignment benchmark: several losses trained on the same on-policy SmolLM2-135M data, compared on held-out
implicit-reward pairwise accuracy per dimension (docs/alignment.md).

    python -m bench.alignment --quick     # 32 train / 16 held-out prompts, N = 4, 4 LoRA steps per loss
    python -m bench.alignment --smoke     # 8 / 6 prompts, N = 2, 1 step: checks that the chain runs
    python -m bench.alignment             # 1000 / 200 prompts, N = 4, 200 steps per loss

Pipeline: ``raypo data tasks`` -> ``raypo data generate`` (train and held-out prompts, cached under
``--cache``, so every loss sees the same data) -> ``raypo data score`` -> ``raypo train`` per loss with the
same budget (steps, batch, LoRA rank, lr) -> the exported policy and the reference score every held-out
response: implicit reward r = log pi(y|x) - log pi_ref(y|x) (beta only scales it). Per dimension, every
pair of responses of a prompt with different ratings counts 1 when r orders it like the ratings, 0.5 on a
tie of r, 0 otherwise; the reference's rewards are all 0, so its accuracy is 0.5 by this definition.
Generation-based evaluation (win rates, lengths) is not part of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

LOSSES = ("dpo", "lambda_dpo", "lipo_lambda", "mpo", "mallows_theta")
MODEL = "smollm2://135m-instruct"
SIZES = {  # train prompts, held-out prompts, N, new tokens, steps, micro batch
    "smoke": (8, 6, 2, 8, 1, 2),
    "quick": (32, 16, 4, 16, 4, 2),
    "full": (1000, 200, 4, 48, 200, 4),
}


def _cli(*argv: str) -> None:
    from raypo.cli.main import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"raypo {' '.join(map(str, argv))} exited with {code}")


def build_data(cache: Path, mode: str, seed: int) -> tuple[Path, Path]:
    """Scored train and held-out listwise files (generated once per mode and seed, then reused)."""
    n_train, n_held, n, new_tokens, _, _ = SIZES[mode]
    root = cache / (f"{mode}-s{seed}-" + "-".join(map(str, SIZES[mode])))
    train, held = root / "train.scored.parquet", root / "heldout.scored.parquet"
    if train.exists() and held.exists():
        return train, held
    root.mkdir(parents=True, exist_ok=True)
    _cli("data", "tasks", "--out", root / "prompts.jsonl", "--num-prompts", n_train, "--num-heldout", n_held,
         "--seed", seed)
    for name, prompts in (("train", "prompts.jsonl"), ("heldout", "prompts.heldout.jsonl")):
        _cli("data", "generate", "--model", MODEL, "--prompts", root / prompts, "--out",
             root / f"{name}.gen.parquet", "--num-responses", n, "--max-new-tokens", new_tokens,
             "--seed", seed, "--batch-size", 8)
        _cli("data", "score", root / f"{name}.gen.parquet", "--out", root / f"{name}.scored.parquet")
    return train, held


def train_loss(loss: str, train: Path, out: Path, mode: str) -> tuple[str, float]:
    """One training run with the shared budget; returns (export dir, wall seconds)."""
    _, _, _, new_tokens, steps, micro = SIZES[mode]
    config = out / "bench_alignment.yaml"
    config.write_text("deepspeed:\n  zero_stage: 3\nscaling:\n  num_workers: 1\n  use_gpu: false\n")
    export = out / loss / "export"
    start = time.time()
    _cli("train", config, f"model.path={MODEL}", "model.dtype=float32", "model.lora.enabled=true",
         "model.lora.r=8", "model.lora.alpha=16", f"data.train_path={train}", "data.eval_fraction=0.0",
         "data.max_prompt_length=96", f"data.max_response_length={new_tokens}", f"loss.name={loss}",
         "optimizer.lr=5e-4", "optimizer.warmup_steps=0", f"train.micro_batch_size={micro}",
         f"train.max_steps={steps}", f"train.epochs={max(steps, 1)}", "logging.tensorboard=false",
         f"checkpoint.storage_path={out}", f"checkpoint.run_name={loss}", f"checkpoint.every_steps={steps}",
         f"checkpoint.export_path={export}")
    return str(export), time.time() - start


def response_logps(model_dir: str, rows: list[dict]) -> list[list[float]]:
    """Summed log-probs of every response given its prompt (chat template, eos appended); the N
    responses of a prompt run as one right-padded batch."""
    import torch

    from raypo.model.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype="float32", attention="sdpa", prefix_sharing=False).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            seqs = [p_ids + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                    for r in row["responses"]]
            width = max(map(len, seqs))
            ids = torch.tensor([q + [tok.pad_token_id] * (width - len(q)) for q in seqs])
            mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            tokens = logp.gather(2, ids[:, 1:, None])[..., 0]
            keep = mask[:, 1:].clone()
            keep[:, :len(p_ids) - 1] = 0  # response tokens only
            out.append((tokens * keep).sum(1).tolist())
    return out


def pairwise_accuracy(rewards: list[list[float]], scores: list[list[list]], dim: int) -> tuple[float, int]:
    """Accuracy over the pairs with different (non-null) ratings on ``dim``; ties of the reward count 0.5."""
    total, pairs = 0.0, 0
    for r, s in zip(rewards, scores):
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                a, b = s[i][dim], s[j][dim]
                if a is None or b is None or a == b:
                    continue
                pairs += 1
                d = (r[i] - r[j]) * (1 if a > b else -1)
                total += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return (total / pairs if pairs else float("nan")), pairs


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from raypo.data.schema import dimensions_of
    from raypo.model.loading import resolve_model_source

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", nargs="+", default=list(LOSSES))
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/raypo/bench_alignment"))
    p.add_argument("--out", default="bench/results/alignment.json")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cache = Path(args.cache)
    train, held = build_data(cache, mode, args.seed)
    table = pq.read_table(held)
    dims, rows = dimensions_of(table.schema), table.to_pylist()
    scores = [r["scores"] for r in rows]
    ref = response_logps(resolve_model_source(MODEL), rows)
    results = {"mode": mode, "seed": args.seed, "sizes": dict(zip(
        ("train_prompts", "heldout_prompts", "num_responses", "max_new_tokens", "steps", "micro_batch"),
        SIZES[mode])), "dimensions": dims, "reference": {d: 0.5 for d in dims}, "losses": {}}
    runs = train.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for loss in args.losses:
        export, wall = train_loss(loss, train, runs, mode)
        pol = response_logps(export, rows)
        rewards = [[a - b for a, b in zip(pr, rr)] for pr, rr in zip(pol, ref)]
        acc = {d: pairwise_accuracy(rewards, scores, k) for k, d in enumerate(dims)}
        results["losses"][loss] = {"train_s": round(wall, 1),
                                   "heldout_pairwise_accuracy": {d: round(a, 4) for d, (a, _) in acc.items()},
                                   "pairs": {d: n for d, (_, n) in acc.items()}}
        print(loss, json.dumps(results["losses"][loss]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
