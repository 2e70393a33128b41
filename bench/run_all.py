"""Run every benchmark, check the targets, write ``results.json`` and ``results.md``.

    python -m bench.run_all                 # full run (~10-15 minutes on 2 shared CPU cores)
    python -m bench.run_all --smoke         # tiny sizes, seconds; checks that every benchmark runs (output
                                            # in a temporary directory unless --out is given)
    python -m bench.run_all --only prefix_sharing head
    python -m bench.run_all --docs          # full run, and the results also replace the tables in
                                            # docs/performance.md (below its RESULTS_MARKER line)

Targets (docs/performance.md):

* prefix sharing: shared forward+backward >= 0.7 of the ideal rho at N = 8, P/R = 4;
* flat-in-N response chunking: chunked peak memory at N = 16 <= 1.3 x the peak at N = 4 (fixed chunk);
* end to end: raypo at N = 2 at least as fast per pair as TRL's DPOTrainer (also with TRL's compact head);
* the trainer loop (``raypo train`` on the quickstart, CPU): steady loop efficiency >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench import common

BENCHES = ("memory_selfcheck", "prefix_sharing", "head", "response_chunks", "trl", "trainer_loop")


def _run_bench(name: str, smoke: bool) -> dict:
    if name == "memory_selfcheck":
        return {"rows": [] if smoke else common.selfcheck()}
    if name == "prefix_sharing":
        from bench import prefix_sharing

        return prefix_sharing.run(smoke=smoke)
    if name == "head":
        from bench import logprob_head

        return logprob_head.run(smoke=smoke)
    if name == "response_chunks":
        from bench import response_chunks_memory

        return response_chunks_memory.run(smoke=smoke)
    if name == "trl":
        from bench import trl_compare

        return trl_compare.run(smoke=smoke)
    if name == "trainer_loop":
        from bench import trainer_loop

        return trainer_loop.run(smoke=smoke)
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")


def check_targets(results: dict) -> list[dict]:
    """Each target: name, measured value, threshold, met."""
    out = []
    ps = results.get("prefix_sharing")
    if ps:
        point = [r for r in ps["rows"] if r["n"] == 8 and r["p_over_r"] == 4.0]
        labels = (("", "dense mask (model.attention=sdpa)"), ("_blocks", "prefix_sdpa (the default, auto)"),
                  ("_cascade", "cascade (model.attention=cascade)"))
        for suffix, label in labels:
            if point and "of_rho" + suffix in point[0]:
                value = point[0]["of_rho" + suffix]
                out.append({"target": f"shared fwd+bwd speedup / rho at N=8, P/R=4, {label}", "value": value,
                            "threshold": ">= 0.7", "met": value >= 0.7})
    mb = results.get("response_chunks")
    if mb and "chunked_peak_ratio_last_vs_first" in mb:
        value = mb["chunked_peak_ratio_last_vs_first"]
        out.append({"target": "chunked peak memory N=16 / N=4", "value": value, "threshold": "<= 1.3",
                    "met": value <= 1.3})
    loop = results.get("trainer_loop")
    if loop:
        point = [r for r in loop["rows"] if r["case"] == "quickstart"]
        if point:
            value = point[0]["steady_loop_efficiency"]
            out.append({"target": "raypo train loop efficiency, quickstart (steady state, CPU)",
                        "value": value, "threshold": ">= 0.85", "met": value >= 0.85})
    trl = results.get("trl")
    if trl:
        point = [r for r in trl["rows"] if r["n"] == 2]
        if point:
            value = point[0]["trl_over_raypo_time"]
            out.append({"target": "TRL time per pair / raypo time per pair at N=2", "value": value,
                        "threshold": ">= 1.0", "met": value >= 1.0})
            if "trl_compact_over_raypo_time" in point[0]:  # TRL's compact head forced on: the fair peer
                value = point[0]["trl_compact_over_raypo_time"]
                out.append({"target": "TRL (compact head) time per pair / raypo time per pair at N=2",
                            "value": value, "threshold": ">= 1.0", "met": value >= 1.0})
    return out


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _mib(row: dict, key: str) -> str:
    return f"{row[key]:.0f}" if key in row else "-"


def _ps_row(r: dict) -> list[str]:
    def spread(suffix: str) -> str:
        return (f"{r['speedup' + suffix]:.2f} ({r['speedup' + suffix + '_median']:.2f}; "
                f"{r['speedup' + suffix + '_min']:.2f}-{r['speedup' + suffix + '_max']:.2f})")

    return [str(r["n"]), f"{r['p']}/{r['r']}", str(r["vocab"]), f"{r['rho']:.2f}", f"{r['rho_flops']:.2f}",
            f"{r['unshared_s']:.3f}", f"{r['shared_s']:.3f}", spread(""), f"**{r['of_rho']:.2f}**",
            f"{r['shared_blocks_s']:.3f}", spread("_blocks"), f"**{r['of_rho_blocks']:.2f}**",
            _mib(r, "unshared_peak_mib"), _mib(r, "shared_peak_mib"), _mib(r, "shared_blocks_peak_mib"),
            f"{r['shared_cascade_s']:.3f}" if "shared_cascade_s" in r else "-",
            f"**{r['of_rho_cascade']:.2f}**" if "of_rho_cascade" in r else "-",
            _mib(r, "shared_cascade_peak_mib")]


def md_prefix_sharing(res: dict) -> str:
    header = ["N", "P/R tokens", "vocab", "rho", "rho_flops", "unshared s", "shared s",
              "speedup (median; range)", "speedup/rho", "blocks s", "blocks speedup (median; range)",
              "blocks speedup/rho", "unshared peak MiB", "shared peak MiB", "blocks peak MiB", "cascade s",
              "cascade speedup/rho", "cascade peak MiB"]
    rows = [_ps_row(r) for r in res["rows"] + res.get("vocab_32k", [])]
    return (f"Model: {res['model']}. shared = dense block mask (model.attention=sdpa); blocks = "
            "prefix_sdpa, attention on the allowed blocks only (the default: model.attention=auto); "
            "cascade = prompt keys once per group, merged by log-sum-exp (model.attention=cascade)\n\n"
            + _table(header, rows))


def _head_row(r: dict) -> list[str]:
    ratio = f"{r['memory_ratio']:.1f}x" if "memory_ratio" in r else "-"
    return [str(r["vocab"]), str(r["hidden"]), str(r["tokens"]), str(r["chunk"]),
            f"{r['logits_fp32_mib']:.0f}", f"{r['full_s']:.2f}", f"{r['chunked_s']:.2f}",
            f"{r['time_ratio']:.2f} ({r['time_ratio_median']:.2f})", _mib(r, "full_peak_mib"),
            _mib(r, "chunked_peak_mib"), ratio]


def md_head(res: dict) -> str:
    header = ["vocab", "hidden", "tokens", "chunk", "[T,V] fp32 MiB", "full s", "chunked s",
              "time chunked/full (median)", "full peak MiB", "chunked peak MiB", "memory full/chunked"]
    return _table(header, [_head_row(r) for r in res["rows"]])


def _mb_row(r: dict) -> list[str]:
    return [str(r["n"]), f"{r['p']}/{r['r']}", str(r["chunk"]), f"{r['direct_s']:.3f}",
            f"{r['chunked_s']:.3f}", f"{r['time_ratio']:.2f} ({r['time_ratio_median']:.2f})",
            _mib(r, "direct_peak_mib"),
            _mib(r, "chunked_peak_mib")]


def md_response_chunks(res: dict) -> str:
    header = ["N", "P/R tokens", "chunk", "direct s", "chunked s", "time chunked/direct (median)",
              "direct peak MiB",
              "chunked peak MiB"]
    text = f"Model: {res['model']}\n\n" + _table(header, [_mb_row(r) for r in res["rows"]])
    if "chunked_peak_ratio_last_vs_first" in res:
        text += (f"\n\nPeak N={res['rows'][-1]['n']} / N={res['rows'][0]['n']}: chunked "
                 f"{res['chunked_peak_ratio_last_vs_first']:.2f}x, "
                 f"direct {res['direct_peak_ratio_last_vs_first']:.2f}x")
    return text


def _trl_row(r: dict) -> list[str]:
    spread = (f"**{r['trl_over_raypo_time']:.2f}** ({r['ratio_median']:.2f}; "
              f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
    compact = "-"
    if "trl_compact_over_raypo_time" in r:
        compact = (f"**{r['trl_compact_over_raypo_time']:.2f}** / "
                   f"{r['trl_compact_over_raypo_unshared_time']:.2f}")
    measures = r.get("measures", "time per pair" if r["n"] == 2 else "cost per listwise group")
    return [r["case"], measures, str(r["n"]), str(r["pairs_per_group"]), f"{r['raypo_s_per_group']:.3f}",
            f"{r['raypo_unshared_s_per_group']:.3f}", f"{r['trl_s_per_group']:.3f}",
            f"{r['trl_compact_s_per_group']:.3f}" if "trl_compact_s_per_group" in r else "-", spread,
            f"{r['trl_over_raypo_unshared_time']:.2f}", compact, f"{r['raypo_group_tokens_per_s']:.0f}",
            f"{r['trl_group_tokens_per_s']:.0f}", _mib(r, "raypo_peak_mib"), _mib(r, "trl_peak_mib")]


def md_trl(res: dict) -> str:
    header = ["case", "measures", "N", "TRL pairs/group", "raypo s/group", "raypo unshared s/group",
              "TRL s/group", "TRL compact s/group", "TRL/raypo time (median; range)", "TRL/raypo-unshared",
              "TRL compact/raypo / compact/raypo-unshared", "raypo group tok/s", "TRL group tok/s",
              "raypo peak MiB", "TRL peak MiB"]
    return (f"Model: {res['model']}; prompts ~{res['prompt_mean']}, responses ~{res['response_mean']} "
            "tokens (+-50 %). TRL compact = TRL's compact log-prob head forced on (on CPU it scores every "
            "position otherwise). N = 8 rows are the cost per listwise group (different losses; TRL takes "
            "several optimizer steps per group, raypo one), not a like-for-like speed ratio.\n\n"
            + _table(header, [_trl_row(r) for r in res["rows"]]))


def _loop_row(r: dict) -> list[str]:
    return [r["case"], f"{r['wall_s']:.0f}", f"{r['loop_efficiency']:.2f}",
            f"**{r['steady_loop_efficiency']:.2f}**",
            f"{r['trainer_tokens_per_s']:.0f}", f"{r['train_step_tokens_per_s']:.0f}",
            f"{r['mean_step_s'] * 1000:.0f}", f"{r['mean_data_wait_s'] * 1000:.0f}",
            f"{r['mean_report_wait_s'] * 1000:.0f}",
            f"{r['final_eval_pairwise_accuracy']:.3f}" if r.get("final_eval_pairwise_accuracy") is not None
            else "-"]


def md_trainer_loop(res: dict) -> str:
    header = ["case", "wall s", "loop eff. (all steps)", "loop eff. (steady)", "trainer tok/s",
              "train_step tok/s", "step ms", "data wait ms/step", "report wait ms/step", "final eval acc"]
    return (f"`raypo train {res['config']}` (2 CPU workers, ZeRO-3/gloo); trainer tok/s / train_step tok/s "
            "= loop efficiency, both from the same run\n\n"
            + _table(header, [_loop_row(r) for r in res["rows"]]))


def md_selfcheck(res: dict) -> str:
    rows = [[f"{r['allocated_mib']:.0f}", f"{r['peak_mib']:.1f}"] for r in res["rows"]]
    return _table(["allocated MiB", "measured peak MiB"], rows)


def to_markdown(results: dict) -> str:
    parts = [f"# raypo benchmarks ({results['environment']['time']})", "",
             "```", json.dumps(results["environment"], indent=1), "```", ""]
    targets = results.get("targets", [])
    if targets:
        rows = [[t["target"], f"{t['value']:.2f}", t["threshold"], "yes" if t["met"] else "**no**"]
                for t in targets]
        parts += ["## Targets", "", _table(["target", "value", "threshold", "met"], rows), ""]
    sections = (("memory_selfcheck", "Memory method self-check", md_selfcheck),
                ("prefix_sharing", "Prefix sharing", md_prefix_sharing),
                ("head", "Log-prob head vs full logits", md_head),
                ("response_chunks", "Flat-in-N response chunking", md_response_chunks),
                ("trl", "End to end vs TRL DPOTrainer", md_trl),
                ("trainer_loop", "The trainer loop (raypo train)", md_trainer_loop))
    for key, title, fmt in sections:
        if key in results:
            parts += [f"## {title}", "", fmt(results[key]), f"\n({results[key]['_seconds']:.0f} s)", ""]
    return "\n".join(parts)


RESULTS_MARKER = "<!-- python -m bench.run_all --docs writes everything below this line -->"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_PATH = os.path.join(REPO_ROOT, "docs", "performance.md")


def write_docs(markdown: str, path: str = DOCS_PATH) -> None:
    """Replace what follows :data:`RESULTS_MARKER` in ``path`` with ``markdown``, its title made a section."""
    with open(path) as f:
        text = f.read()
    if RESULTS_MARKER not in text:
        raise ValueError(f"{path} has no line {RESULTS_MARKER!r}; add it where the results should start")
    head = text.split(RESULTS_MARKER)[0]
    body = markdown.replace("\n## ", "\n### ").replace("# raypo benchmarks (", "## Latest run (", 1)
    with open(path, "w") as f:
        f.write(head + RESULTS_MARKER + "\n\n" + body + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every benchmark runs")
    parser.add_argument("--only", nargs="*", choices=BENCHES, default=None)
    parser.add_argument("--out", default=None,
                        help="output directory (default bench/results; a temporary directory with --smoke)")
    parser.add_argument("--docs", action="store_true",
                        help="also write the results into docs/performance.md (not with --smoke)")
    args = parser.parse_args()
    if args.docs and args.smoke:
        parser.error("--docs records a full run; drop --smoke")
    common.setup_torch(1)
    results: dict = {"environment": common.environment(), "smoke": args.smoke}
    for name in args.only or BENCHES:
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        results[name] = _run_bench(name, args.smoke)
        results[name]["_seconds"] = time.perf_counter() - start
        print(f"[bench] {name} done in {results[name]['_seconds']:.0f} s", flush=True)
    results["targets"] = check_targets(results)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="raypo-bench-smoke-") if args.smoke else \
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(args.out, exist_ok=True)
    stem = "smoke" if args.smoke else "results"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1)
    markdown = to_markdown(results)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(markdown + "\n")
    print(markdown)
    print(f"[bench] wrote {os.path.join(args.out, stem)}.json and .md", flush=True)
    if args.docs:
        write_docs(markdown)
        print(f"[bench] wrote the results into {DOCS_PATH}", flush=True)


if __name__ == "__main__":
    main()
