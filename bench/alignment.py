"""Alignment benchmark: several losses trained on the same on-policy SmolLM2-135M data, compared on held-out
implicit-reward pairwise accuracy per dimension and on their own generations (docs/alignment.md).

    python -m bench.alignment --quick     # 32 train / 16 held-out prompts, N = 4, 4 LoRA steps per loss
    python -m bench.alignment --smoke     # 8 / 6 prompts, N = 2, 1 step: checks that the chain runs
    python -m bench.alignment             # "full", sized for this 2-core machine: see SIZES
    python -m bench.alignment --write-doc # also put the table into docs/alignment.md (between markers)

Pipeline: ``raypo data tasks`` -> ``raypo data generate`` (train and held-out prompts, cached under
``--cache``, so every loss sees the same data) -> ``raypo data score`` -> ``raypo train`` per loss with the
same budget (steps, batch, LoRA rank, lr) -> two evaluations of the exported policy on held-out prompts:

* ranking: implicit reward r = log pi(y|x) - log pi_ref(y|x) (beta only scales it) of every held-out
  response. Per dimension, every pair of responses of a prompt with different ratings counts 1 when r
  orders it like the ratings, 0.5 on a tie of r, 0 otherwise; the reference's rewards are all 0, so its
  accuracy is 0.5 by this definition.
* generation (:mod:`raypo.eval.by_generation`, as ``raypo eval --generate``): the policy and the reference
  each generate one greedy response per held-out prompt, rated by the same four task scorers; per
  dimension the mean score of both, the win rate against the reference (1 if higher, 0.5 if equal, 0 if
  lower, averaged over prompts) and the mean length in words and tokens. The reference is generated once.

Writes ``--out`` (bench/results/alignment.json), a markdown table next to it (alignment.md) and a PNG
(alignment.png); with ``--write-doc`` the table also replaces the block between the markers of
docs/alignment.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

LOSSES = ("dpo", "lambda_dpo", "lipo_lambda", "mpo", "mallows_theta")
MODEL = "smollm2://135m-instruct"
SIZES = {  # train prompts, held-out prompts, N, new tokens, steps, micro batch
    "smoke": (8, 6, 2, 8, 1, 2),
    "quick": (32, 16, 4, 16, 4, 2),
    # 1,000 / 200 prompts; 64 steps of 4 lists (a quarter epoch) keeps the five runs near an hour on a
    # 2-core CPU machine (docs/alignment.md gives the measured time)
    "full": (1000, 200, 4, 16, 64, 4),
}
DOC = Path(__file__).resolve().parents[1] / "docs" / "alignment.md"
GEN_KEYS = ("mean_score", "reference_mean_score", "win_rate", "wins", "ties", "losses", "compared",
            "mean_words", "mean_tokens", "failed_ratings")
TABLE_BEGIN, TABLE_END = "<!-- bench/alignment.py table: begin -->", "<!-- bench/alignment.py table: end -->"


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


def train_loss(loss: str, train: Path, out: Path, mode: str, reuse: bool = False) -> tuple[str, float]:
    """One training run with the shared budget; returns (export dir, wall seconds). With ``reuse``, a run
    of an earlier invocation whose export is complete is taken as it is (its recorded wall time)."""
    _, _, _, new_tokens, steps, micro = SIZES[mode]
    export = out / loss / "export"
    summary = out / loss / "raypo_summary.json"
    if reuse and (export / "raypo_model.json").exists() and summary.exists():
        return str(export), float(json.loads(summary.read_text())["wall_s"])
    config = out / "bench_alignment.yaml"
    config.write_text("deepspeed:\n  zero_stage: 3\nscaling:\n  num_workers: 1\n  use_gpu: false\n")
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


def pairwise_accuracy_against(rewards: list[list[float]], targets: list[list]) -> tuple[float, int]:
    """Accuracy of ``rewards`` over the pairs of a prompt's responses with different (non-null)
    ``targets``: 1 when the rewards order the pair like the targets, 0.5 on a tie of the rewards, 0
    otherwise; returns (accuracy, number of pairs)."""
    total, pairs = 0.0, 0
    for r, t in zip(rewards, targets):
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                a, b = t[i], t[j]
                if a is None or b is None or a == b:
                    continue
                pairs += 1
                d = (r[i] - r[j]) * (1 if a > b else -1)
                total += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return (total / pairs if pairs else float("nan")), pairs


def pairwise_accuracy(rewards: list[list[float]], scores: list[list[list]], dim: int) -> tuple[float, int]:
    """Accuracy over the pairs with different (non-null) ratings on ``dim``; ties of the reward count 0.5."""
    return pairwise_accuracy_against(rewards, [[s[dim] for s in row] for row in scores])


def mean_ratings(scores: list[list[list]]) -> list[list]:
    """Each response's mean over its rated dimensions (None when it has no rating): the expectation of the
    lambda-weighted mean rating over ``lambdas.schedule: uniform`` draws. The pairwise losses pick best and
    worst by a close relative, ``mean_k p*(k)`` (:func:`raypo.losses.labels.aggregate_ratings`), which
    first normalises each dimension over the list; the two can order a pair differently."""
    out = []
    for row in scores:
        means = []
        for s in row:
            rated = [v for v in s if v is not None]
            means.append(sum(rated) / len(rated) if rated else None)
        out.append(means)
    return out


def overall_accuracy(rewards: list[list[float]], scores: list[list[list]]) -> tuple[float, int]:
    """Held-out accuracy on the trained preference: pairs ordered by :func:`mean_ratings`."""
    return pairwise_accuracy_against(rewards, mean_ratings(scores))


def ceiling_accuracy(scores: list[list[list]], dim: int) -> float:
    """The accuracy on ``dim`` of a policy whose rewards order every list exactly by the mean rating: the
    most a learner of the trained preference gets on that dimension, below 1 where ``dim`` conflicts with
    the others (mean-rating ties count 0.5, as reward ties do)."""
    means = [[-math.inf if m is None else m for m in row] for row in mean_ratings(scores)]
    return pairwise_accuracy(means, scores, dim)[0]


class ReferenceOnce:
    """A generator for :func:`raypo.eval.by_generation.evaluate_by_generation` that generates the reference
    once for all losses and each policy in a fresh in-process worker (one model in memory at a time)."""

    def __init__(self, settings, reference: str):
        from raypo.eval.by_generation import LocalGenerator

        self.settings, self.reference = settings, reference
        self.ref_generator = LocalGenerator(settings)
        self.ref_texts: list[str] | None = None
        self.policy = LocalGenerator(settings)

    def for_policy(self) -> ReferenceOnce:
        from raypo.eval.by_generation import LocalGenerator

        self.policy = LocalGenerator(self.settings)
        return self

    def __call__(self, source: str, rows: list[dict]) -> list[str]:
        if source == self.reference:
            if self.ref_texts is None:
                self.ref_texts = self.ref_generator(source, rows)
                self.ref_generator.workers.clear()
            return self.ref_texts
        return self.policy(source, rows)


def _cells(values: dict, dims: list[str], spec: str = ".3f") -> str:
    return " / ".join("-" if values.get(d) is None else format(values[d], spec) for d in dims)


def _length(g: dict) -> str:
    return f"{g['mean_words']:.1f} ({g['mean_tokens']:.1f})"


def markdown_table(results: dict) -> str:
    """The summary table (cells list the dimensions in order) and a per-dimension generation table."""
    dims, ref = results["dimensions"], results["reference"]
    short = " / ".join(dims)
    g0 = ref["generation"]
    sizes = results["sizes"]
    lines = [f"Cells list the dimensions in the order {short}. Held-out: {sizes['heldout_prompts']} prompts "
             f"({g0['num_prompts']} generated per model, greedy, at most {sizes['max_new_tokens']} new "
             "tokens).", "",
             "| loss | held-out accuracy on the mean rating (the trained preference) | held-out pairwise "
             "accuracy of implicit rewards, per dimension | generation score (reference: "
             f"{_cells(g0['mean_score'], dims)}) | win rate vs reference | mean length, words (tokens) | "
             "train time |", "|---|---|---|---|---|---|---|",
             f"| reference | {ref.get('heldout_overall_accuracy', 0.5):.3f} | "
             f"{_cells(ref['heldout_pairwise_accuracy'], dims)} | "
             f"{_cells(g0['mean_score'], dims)} | 0.500 by definition | {_length(g0)} | - |"]
    if results.get("ceiling"):
        lines.append("| ranking by the mean rating itself (the ceiling) | 1.000 | "
                     f"{_cells(results['ceiling'], dims)} | - | - | - | - |")
    for loss, r in results["losses"].items():
        g = r["generation"]
        overall = r.get("heldout_overall_accuracy")
        overall = "-" if overall is None else f"{overall:.3f} ({r['overall_pairs']} pairs)"
        lines.append(f"| {loss} | {overall} | {_cells(r['heldout_pairwise_accuracy'], dims)} | "
                     f"{_cells(g['mean_score'], dims)} | {_cells(g['win_rate'], dims)} | {_length(g)} | "
                     f"{r['train_s']:.0f} s |")
    lines += ["", "Per loss and dimension, the generations against the reference's on the same prompts "
              "(delta = model mean - reference mean; w/t/l = prompts won / tied / lost):", "",
              "| loss | " + " | ".join(dims) + " |", "|---|" + "---|" * len(dims)]
    for loss, r in results["losses"].items():
        g = r["generation"]
        cells = []
        for d in dims:
            if g["mean_score"][d] is None or g["reference_mean_score"][d] is None:
                cells.append("no rating")
                continue
            delta = g["mean_score"][d] - g["reference_mean_score"][d]
            verdict = "better" if g["win_rate"][d] > 0.5 else "worse" if g["win_rate"][d] < 0.5 else "same"
            cells.append(f"{verdict}: {delta:+.3f}, win {g['win_rate'][d]:.3f} "
                         f"({g['wins'][d]}/{g['ties'][d]}/{g['losses'][d]} of {g['compared'][d]})")
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out_png: str) -> str:
    """Two panels of grouped bars per dimension: held-out pairwise accuracy (0.5 = the reference) and the
    mean generation score (the reference's bars first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims, losses = results["dimensions"], list(results["losses"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(losses))
    groups = ["mean rating", *dims]
    for i, loss in enumerate(losses):
        r = results["losses"][loss]
        acc = r["heldout_pairwise_accuracy"]
        values = [r.get("heldout_overall_accuracy", math.nan), *(acc[d] for d in dims)]
        ax1.bar([k + i * width for k in range(len(groups))], values, width, label=loss)
    ax1.axhline(0.5, color="k", lw=1, ls="--", label="reference (0.5)")
    ax1.set_title("held-out pairwise accuracy of implicit rewards")
    names = ["reference", *losses]
    width2 = 0.8 / len(names)
    for i, name in enumerate(names):
        g = results["reference" if name == "reference" else "losses"]
        g = g["generation"] if name == "reference" else g[name]["generation"]
        ax2.bar([k + i * width2 for k in range(len(dims))], [g["mean_score"][d] or 0.0 for d in dims], width2,
                label=name, color="0.6" if name == "reference" else None)
    ax2.set_title(f"mean score of greedy generations ({results['reference']['generation']['num_prompts']} "
                  "held-out prompts)")
    for ax, w, n, labels in ((ax1, width, len(losses), groups), (ax2, width2, len(names), dims)):
        ax.set_xticks([k + w * (n - 1) / 2 for k in range(len(labels))], labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct, LoRA, {results['sizes']['steps']} steps per loss "
                 f"({results['mode']})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_doc_table(table: str, doc: Path = DOC) -> bool:
    """Replace the block between the table markers of ``doc``; False when the markers are missing."""
    text = doc.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        return False
    head, rest = text.split(TABLE_BEGIN, 1)
    doc.write_text(head + TABLE_BEGIN + "\n" + table + TABLE_END + rest.split(TABLE_END, 1)[1])
    return True


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from raypo.data.schema import dimensions_of
    from raypo.eval.by_generation import GenerationEvalSettings, evaluate_by_generation
    from raypo.eval.models import resolve_eval_model
    from raypo.model.loading import resolve_model_source

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", nargs="+", default=list(LOSSES))
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/raypo/bench_alignment"))
    p.add_argument("--out", default="bench/results/alignment.json")
    p.add_argument("--write-doc", action="store_true", help="put the table into docs/alignment.md")
    p.add_argument("--reuse-runs", action="store_true",
                   help="evaluate the runs an earlier invocation left in --cache instead of training again")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    t0 = time.time()
    cache = Path(args.cache)
    train, held = build_data(cache, mode, args.seed)
    heldout_prompts = str(train.parent / "prompts.heldout.jsonl")
    table = pq.read_table(held)
    dims, rows = dimensions_of(table.schema), table.to_pylist()
    scores = [r["scores"] for r in rows]
    ref = response_logps(resolve_model_source(MODEL), rows)
    _, _, _, new_tokens, _, _ = SIZES[mode]
    settings = GenerationEvalSettings(max_new_tokens=new_tokens, temperature=0.0, seed=args.seed,
                                      batch_size=8)
    results = {"mode": mode, "seed": args.seed, "sizes": dict(zip(
        ("train_prompts", "heldout_prompts", "num_responses", "max_new_tokens", "steps", "micro_batch"),
        SIZES[mode])), "dimensions": dims,
        "reference": {"heldout_pairwise_accuracy": {d: 0.5 for d in dims}, "heldout_overall_accuracy": 0.5},
        "ceiling": {d: round(ceiling_accuracy(scores, k), 4) for k, d in enumerate(dims)},
        "reused_runs": args.reuse_runs, "losses": {}}
    runs = train.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    generator = None
    for loss in args.losses:
        export, wall = train_loss(loss, train, runs, mode, reuse=args.reuse_runs)
        pol = response_logps(export, rows)
        rewards = [[a - b for a, b in zip(pr, rr)] for pr, rr in zip(pol, ref)]
        acc = {d: pairwise_accuracy(rewards, scores, k) for k, d in enumerate(dims)}
        overall, overall_pairs = overall_accuracy(rewards, scores)
        model = resolve_eval_model(export)
        if generator is None:
            generator = ReferenceOnce(settings, model.card.get("reference") or MODEL)
        t_gen = time.time()
        gen = evaluate_by_generation(model, heldout_prompts, scorers=None, settings=settings,
                                     generator=generator.for_policy(),
                                     responses_out=str(runs / loss / "generations.jsonl"))
        first = gen["results"][0]
        results["reference"]["generation"] = {k: gen["reference"][k] for k in (
            "source", "mean_score", "mean_words", "mean_tokens")} | {"num_prompts": gen["num_prompts"]}
        results["losses"][loss] = {
            "train_s": round(wall, 1),
            "heldout_overall_accuracy": round(overall, 4), "overall_pairs": overall_pairs,
            "heldout_pairwise_accuracy": {d: round(a, 4) for d, (a, _) in acc.items()},
            "pairs": {d: n for d, (_, n) in acc.items()},
            "generation": {k: first[k] for k in GEN_KEYS} | {"eval_s": round(time.time() - t_gen, 1)}}
        print(loss, json.dumps(results["losses"][loss]), flush=True)
    results["total_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md = markdown_table(results)
    out.with_suffix(".md").write_text(md)
    plot(results, str(out.with_suffix(".png")))
    if args.write_doc and not write_doc_table(md):
        print(f"{DOC} has no table markers; the table is in {out.with_suffix('.md')}")
    print(md)
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')} "
          f"in {results['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
