"""Shared pieces of the benchmarks: the model, random listwise data, interleaved timing, peak memory.

Timing. Variants that are compared are timed in one process, interleaved round by round (the order
alternates every round), after one warm-up round. Times are the process's CPU time
(``time.process_time``, :func:`clock`), not wall time: the two cores are shared with other jobs, whose
load (a 1-minute load average of 2-8 during these runs) stretches wall times by 1-3x at random, while the
CPU time a single-threaded computation consumes barely moves (cache and SMT-sibling contention remain).
A time is the best (minimum) over rounds and a ratio the ratio of the best times (as ``timeit``
recommends: disturbances only add time); the median and range of the per-round ratios are reported next
to it to show the remaining noise. torch runs on one thread: two OpenMP threads that must meet at every
op's barrier are much slower and noisier on shared cores than one.

Peak memory. torch's CPU tensors bypass tracemalloc, and the process's peak RSS includes imports and the
model. Each measurement runs in a fresh process (:func:`peak_in_subprocess`, forked from a server that
has only imported the libraries): it builds the case, runs
one warm-up step (so parameter gradients and optimizer states that persist exist already), resets the
kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs`` resets VmHWM to the current RSS), runs the
measured steps and reports ``VmHWM - VmRSS(before)``: the extra resident memory the step needed at its
peak. glibc is told to serve every allocation above 64 KiB with mmap and to trim freed heap at once
(``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``), so freed tensors leave the RSS instead of
staying in malloc's arenas; ``python -m bench.common selfcheck`` checks that a step allocating k MiB
reads as about k MiB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from raypo.model.shape import ModelShape

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
MiB = 2**20


def clock() -> float:
    """Seconds of CPU time used by this process (all threads); see the module docstring."""
    return time.process_time()


#: The benchmarks' model: a 25 % lm_head share of the per-token matmul FLOPs (vocab 4096, hidden 256), like
#: 1B-class models (Llama-3.2-1B: 21 %); an 8B model has 7 %.
BENCH_MODEL = ModelShape(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                         intermediate_size=768)
#: The ``--smoke`` runs' model: seconds on a CPU.
SMOKE_MODEL = ModelShape(vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=128)


def describe_model(shape: ModelShape) -> str:
    """The model line of a results file, with the lm_head's share V h / (V h + D) of the per-token matmul
    FLOPs (D: :meth:`ModelShape.decoder_matmul_params`)."""
    head = shape.embedding_params
    share = head / (head + shape.decoder_matmul_params())
    return (f"Llama, hidden {shape.hidden_size}, {shape.num_layers} layers, {shape.num_heads} heads / "
            f"{shape.num_kv_heads} KV, MLP {shape.intermediate_size}, vocab {shape.vocab_size} (lm_head "
            f"{share:.0%} of matmul FLOPs/token)")


def setup_torch(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_llama(shape: ModelShape = BENCH_MODEL, *, seed: int = 0, attention: str = "sdpa"):
    """A random fp32 ``LlamaForCausalLM`` of ``shape`` (no dropout, so train and eval mode agree)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape.llama_config_kwargs(), max_position_embeddings=8192, use_cache=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def random_ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(5, vocab, (n,), generator=gen).tolist()


def uniform_rows(num_groups: int, n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """Groups with one prompt of ``prompt_len`` and ``n`` responses of ``response_len`` tokens each."""
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": random_ids(prompt_len, vocab, gen),
             "response_ids": [random_ids(response_len, vocab, gen) for _ in range(n)],
             "scores": [float(n - i) for i in range(n)]} for _ in range(num_groups)]


def ragged_rows(num_groups: int, n: int, prompt_mean: int, response_mean: int, vocab: int, seed: int = 0,
                spread: float = 0.5):
    """Groups with lengths uniform in [mean (1 - spread), mean (1 + spread)] and distinct scalar scores."""
    gen = torch.Generator().manual_seed(seed)

    def length(mean: int) -> int:
        lo, hi = int(mean * (1 - spread)), int(mean * (1 + spread))
        return int(torch.randint(max(lo, 1), hi + 1, (1,), generator=gen))

    rows = []
    for _ in range(num_groups):
        scores = torch.randperm(n, generator=gen).float().tolist()
        rows.append({"prompt_ids": random_ids(length(prompt_mean), vocab, gen),
                     "response_ids": [random_ids(length(response_mean), vocab, gen) for _ in range(n)],
                     "scores": scores})
    return rows


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def interleaved_times(variants: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 1
                      ) -> dict[str, list[float]]:
    """CPU seconds per call of each variant, one call per variant per round, the order reversed every
    round."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            start = clock()
            variants[name]()
            elapsed = clock() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """``best``: min(numerator) / min(denominator), the ratio of the least-disturbed runs (the headline:
    load from other jobs only ever adds time); ``median``, ``min``, ``max``: of the per-round ratios
    numerator[r] / denominator[r] (the spread shows how noisy the machine was)."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {"best": min(numerator) / min(denominator), "median": median(ratios), "min": min(ratios),
            "max": max(ratios)}


# ----------------------------------------------------------------------------------------------------
# Peak memory (run inside a subprocess started by peak_in_subprocess)
# ----------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Free what can be freed, reset VmHWM to the current RSS; returns the current RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def measure_peak(step: Callable[[], object], *, steps: int = 2) -> dict[str, float]:
    """Run ``step`` once (warm-up), then ``steps`` times; the peak extra RSS of the measured steps."""
    step()
    before = reset_peak_rss()
    for _ in range(steps):
        step()
    return {"peak_mib": (peak_rss() - before) / MiB, "baseline_mib": before / MiB}


def peak_in_process(module: str, case: dict) -> dict[str, float]:
    """:func:`peak_in_subprocess` in this process (smoke runs: exercises the code, the peak is not clean)."""
    prepared = importlib.import_module(module).memory_case(case)
    if isinstance(prepared, dict):
        return prepared
    return measure_peak(prepared, steps=int(case.get("steps", 2)))


def measure_memory(module: str, case: dict, *, in_process: bool = False) -> dict[str, float]:
    """Peak extra RSS of ``module.memory_case(case)``: a fresh subprocess, or this process for smoke runs."""
    return peak_in_process(module, case) if in_process else peak_in_subprocess(module, case)


_FORKSERVER = None
_PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "raypo.model.listwise",
            "raypo.model.response_chunks", "raypo.losses", "raypo.train.recipe", "datasets", "trl",
            "bench.common"]


def _forkserver():
    """A multiprocessing context whose server process imported torch, transformers, raypo (and TRL) once
    with :data:`MEMORY_ENV` in its environment; every probe is a fresh fork of it (clean address space,
    no import cost). The server never runs a torch op, so no thread pool is forked."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        saved = {k: os.environ.get(k) for k in MEMORY_ENV}
        os.environ.update(MEMORY_ENV)  # read by glibc when the server process starts
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        from multiprocessing import forkserver

        forkserver.ensure_running()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _FORKSERVER = ctx
    return _FORKSERVER


def _fork_probe(module: str, case_json: str, conn) -> None:
    setup_torch(1)
    try:
        conn.send(("ok", peak_in_process(module, json.loads(case_json))))
    except BaseException as err:  # noqa: BLE001 - report any failure to the parent
        import traceback

        conn.send(("error", f"{err!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def peak_in_subprocess(module: str, case: dict, *, timeout: float = 600) -> dict[str, float]:
    """``module.memory_case(case)`` measured by :func:`measure_peak` in a fresh process forked from
    :func:`_forkserver`."""
    ctx = _forkserver()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_fork_probe, args=(module, json.dumps(case), child))
    proc.start()
    child.close()
    if not parent.poll(timeout):
        proc.kill()
        raise RuntimeError(f"memory probe {module} {case} timed out after {timeout} s")
    status, value = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory probe {module} {case} failed:\n{value}")
    return value


def peak_in_exec_subprocess(module: str, case: dict, *, timeout: float = 600) -> dict[str, float]:
    """The same in a new interpreter (``python -m bench.common probe``): slower, no shared server."""
    env = {**os.environ, **MEMORY_ENV}
    cmd = [sys.executable, "-m", "bench.common", "probe", module, json.dumps(case)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe {module} {case} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def _probe(module: str, case_json: str) -> None:
    setup_torch(1)
    case = json.loads(case_json)
    # a case may measure itself (e.g. inside a trainer's callbacks) and return the result as a dict
    print("PEAK " + json.dumps(peak_in_process(module, case)), flush=True)


def memory_case(case: dict) -> Callable[[], object]:
    """Self-check case: a step that allocates and frees ``mib`` MiB of float32 tensors in 8 pieces."""
    mib = int(case["mib"])

    def step():
        parts = [torch.ones(mib * MiB // 32) for _ in range(8)]  # 8 * mib/8 MiB, all alive at once
        return sum(float(p[0]) for p in parts)

    return step


def selfcheck(sizes=(64, 256)) -> list[dict[str, float]]:
    """Known allocations read back through the subprocess method (expect peak ~= mib)."""
    return [{"allocated_mib": float(mib), **peak_in_subprocess("bench.common", {"mib": mib})}
            for mib in sizes]


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001 - absent or broken: report it as such
        return "not installed"


def environment() -> dict[str, object]:
    """Machine and library versions for the results file."""
    return {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0], "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__,
            "transformers": _version("transformers"), "trl": _version("trl"), "raypo": _version("raypo"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# ----------------------------------------------------------------------------------------------------
# The command line of every benchmark
# ----------------------------------------------------------------------------------------------------


def bench_main(run: Callable[[bool, int, str], dict], doc: str, *, rounds: int = 3,
               argv: list[str] | None = None) -> None:
    """``python -m bench.NAME [--smoke] [--rounds R] [--no-memory]``: print ``run(smoke, rounds, memory)``
    as JSON (``memory``: "subprocess", or "off" with --no-memory). ``doc``'s first line is the description."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (a few seconds)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.smoke, args.rounds, "off" if args.no_memory else "subprocess"), indent=1))


def to_jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        _probe(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 2 and sys.argv[1] == "selfcheck":
        print(json.dumps(selfcheck(), indent=1))
    else:
        raise SystemExit("usage: python -m bench.common probe MODULE CASE_JSON | selfcheck")
