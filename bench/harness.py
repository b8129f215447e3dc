"""What every benchmark section shares: its options, the interleaved timing, peak memory in fresh processes and the
MFU denominators. A section is a function `(Options) -> list[dict]` in one of bench/'s area files."""
from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from rich.console import Console

from infra.config import DEFAULT_DATA, ModelConfig
from infra.device import MATMUL_N, matmul_flops, peak_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
console = Console(width=None if Console().is_terminal else 120)  # rich falls back to 80 columns in a pipe


# --------------------------------------------------------------------------------------------------- options
# The decoder section's model and batch (seq, batch): the shape, ~1 TFLOP a step (heavy on 2 CPU cores).
DECODER = dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, intermediate_size=1408, seq=512, batch=8)
QUICK = dict(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=176, seq=64, batch=4)


@dataclass
class Options:
    """What every section may read; a new section adds its fields here and the matching flags in main()."""
    device: str
    threads: int
    precisions: list[str]
    reps: int
    warmup: int
    seed: int
    memory: bool
    quick: bool
    shape: ModelConfig  # the decoder section's
    seq: int
    batch: int
    compile: bool = False
    data: Path = DEFAULT_DATA
    model: Path | None = None
    eval_users: int = 1000
    beams: int = 20
    exact_users: int = 40
    prepare_records: int = 1_000_000
    catalogue_items: int = 100_000
    movie_users: int = 200
    movie_reps: int = 3
    llm: Path = Path(os.environ.get("CPREC_SMOLLM2", "/tmp/smollm2-135m-hf"))
    llm_users: int = 40
    baseline_data: Path = Path("data/ml-100k")
    baseline_domains: tuple[str, ...] = ("ml-100k",)
    baseline_epochs: int = 200
    baseline_recbole_epochs: int = 0  # 0: baseline_epochs
    baseline_before: bool = True
    baseline_recbole: bool = True
    baseline_window: int = 0  # both pipelines' history window (0: each one's default)
    scale_reviews: tuple[int, ...] = (1_000_000, 4_000_000, 16_000_000)
    scale_dir: str | None = None  # where the scale section's datasets are written (default: the temporary folder)
    scale_eval_items: tuple[int, ...] = (10_000, 100_000)
    scale_eval_users: int = 200
    scale_eval_train_users: int = 300
    generate_users: int = 60  # the generate section's test users: the small model's
    generate_llm_users: int = 30  # and the LLM's
    generate_exact_users: int = 10  # of those, users also ranked exhaustively
    generate_precision: str = "auto"


# --------------------------------------------------------------------------------------------------- MFU
def timed(run: Callable[[], object], device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - t


def measure_peaks(device: str, precisions: list[str]) -> dict[str, float]:
    """Best-of-10 FLOP/s of one n³ matmul per precision (infra.device.matmul_flops, the training MFU's probe)."""
    return {p: matmul_flops(torch.device(device), p, MATMUL_N[torch.device(device).type]) for p in precisions}


def choose_peaks(measured: dict[str, float], device: str, override_tflops: float | None) -> tuple[dict, list[str]]:
    """The MFU denominator per precision, and a line per precision saying where it comes from: on a GPU the
    datasheet (infra.device.peak_flops, as training's MFU), so GPU MFU compares with published numbers."""
    peaks, notes = {}, []
    for p, flops in measured.items():
        if override_tflops is not None:
            peaks[p], source = override_tflops * 1e12, "--peak-tflops"
        elif device.startswith("cuda"):
            peaks[p] = peak_flops(torch.device(device), p)
            source = f"{torch.cuda.get_device_name(torch.device(device))} dense datasheet"
        else:
            peaks[p], source = flops, f"best {p} matmul, {MATMUL_N[torch.device(device).type]}³"
        source += f"; measured {flops / 1e12:.3g}" if peaks[p] != flops else ""
        notes.append(f"{p} {peaks[p] / 1e12:.3g} TFLOP/s ({source})")
    return peaks, notes


# --------------------------------------------------------------------------------------------------- timing
Step = tuple[Callable[[], None], Callable[[], None]]  # (reset, run): only run is timed


def time_interleaved(steps: dict[Any, Step], warmup: int, reps: int,
                     device: str) -> tuple[dict[Any, list[float]], dict[Any, list[int]]]:
    """Seconds per run of each step, interleaved so noise from other work on the machine hits all alike; and where
    in each repetition each step ran (0 = first), which alternates."""
    names = list(steps)
    times: dict[Any, list[float]] = {name: [] for name in names}
    slots: dict[Any, list[int]] = {name: [] for name in names}
    for i in range(warmup + reps):
        # Alternate the order too: whoever runs second inherits the first one's warm caches and clock state.
        for slot, name in enumerate(names if i % 2 == 0 else names[::-1]):
            reset, run = steps[name]
            reset()
            seconds = timed(run, device)
            if i >= warmup:
                times[name].append(seconds)
                slots[name].append(slot)
    for reset, _ in steps.values():
        reset()  # free the last gradients before whatever runs next
    return times, slots


def throughput(times: list[float], tokens: int, flops_per_token: float, slots: list[int] | None = None) -> dict:
    median = statistics.median(times)
    return dict(tokens_per_s=tokens / median, flops_per_s=tokens / median * flops_per_token, step_s=median,
                spread=(max(times) - min(times)) / 2 / median, step_s_all=times, flops_per_token=flops_per_token,
                slots=slots)


ROOT = Path(__file__).resolve().parents[1]


def cprec(args: list, log: Path) -> tuple[int, float]:
    """Run `python cprec.py ARGS` as a user types it, its output written to `log`: its exit status and seconds."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "cprec.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)
    log.write_text(done.stdout + done.stderr)
    return done.returncode, time.perf_counter() - began


def rss_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s*(\d+)", Path("/proc/self/status").read_text(), re.M)[1])


def peak_memory(run: Callable[[], object], device: str) -> tuple[object, dict]:
    """Run `run()` once; return its result and the memory it needed on top of what was resident before it, and the
    peak in all. CUDA: max_memory_allocated. CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) against the
    RSS before; no numbers where the peak cannot be reset."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return result, {"peak_mem_mib": (peak - before) / 2 ** 20, "peak_total_mib": peak / 2 ** 20}
    before = rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS (Linux >= 4.0)
    except OSError:
        return run(), {}  # not Linux, or no permission: no honest number to give
    result = run()
    peak = rss_kib("VmHWM")
    return result, {"peak_mem_mib": (peak - before) / 1024, "peak_total_mib": peak / 1024}


def step_memory(make: Callable[..., Step], args: tuple, threads: int, device: str) -> dict:
    """Memory one warmed-up step of `make(*args)` needs on top of what is resident before it (weights, optimizer
    state, inputs): activations, gradients, temporaries; and the peak in all (see peak_memory)."""
    torch.set_num_threads(threads)
    reset, run = make(*args)
    reset()
    run()  # one-time allocations (thread pools, oneDNN primitives, RoPE table, optimizer state) are not the step's
    reset()
    gc.collect()
    return peak_memory(run, device)[1]


@contextlib.contextmanager
def fresh_processes(preload: tuple = ()):
    """A pool whose every task runs in a fresh child of a fork server that imported everything once (a fresh
    interpreter costs ~5 s), so no other task's tensors or caches are there. The fixed glibc mmap threshold returns
    every large tensor to the OS on free: glibc's default raises it as large blocks are freed, and memory cached by a
    warm-up would then hide in the baseline."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["bench.harness", *preload])
    # The fork server copies os.environ when it starts; its glibc reads these then.
    with mock.patch.dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072"), \
            ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
        yield pool


def add_memory(o: Options, probes: list[tuple[dict, Callable[..., Step], tuple]], preload: tuple = ()) -> None:
    """With --memory, add step_memory(make, args) to each (row, make, args); on CPU each in a fresh process."""
    if not o.memory:
        return
    if o.device.startswith("cuda"):
        for row, make, args in probes:
            row.update(step_memory(make, args, o.threads, o.device))
        return
    with fresh_processes(preload) as pool:
        for row, make, args in probes:
            row.update(pool.submit(step_memory, make, args, o.threads, o.device).result())
