"""The project's one benchmark entry point: `python bench.py --help`.

A section is a function `(Options) -> list[dict]` in SECTIONS, with its table columns in COLUMNS and a legend in NOTES;
each section prints one table, and --json writes every row. Sections:

- decoder: our Decoder against transformers' LlamaForCausalLM on the same safetensors, inputs and threads.
- train: optimizer steps as `cprec.py pretrain` runs them, on the default small model (CUDA: also Qwen2.5-0.5B-sized).
- eval: beam search against exact scoring on the built-in world's games domain: users/s and top-10 agreement.
- recommend: `cprec.py recommend` on the world's games: one history's latency (p50/p95), JSONL batch users/s.
- catalogue: beam search and exact scoring on a synthetic catalogue of 100k items: speed and peak memory.
- movies: beam search today vs its frozen old copy vs exact scoring on a movie catalogue: users/s and agreement.
- prepare: Amazon Reviews 2023 conversion of a synthetic category: records/s and peak RSS.
- fsdp: FSDP2 training steps on 1 and 2 CPU processes (CUDA: Qwen2.5-0.5B/1.5B shapes over every GPU): step time,
  tokens/s, MFU and memory per process.
- llm: the small model beside a pretrained LLM (SmolLM2-135M-Instruct, skipped when absent): CPT and SFT tokens/s,
  evaluation users/s.
- memory: the estimated memory per GPU of DDP and FSDP, with and without activation checkpointing, for 0.5B, 1.5B
  and 7B models on 8 x 80 GB (memory_estimate; computed, not measured).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import multiprocessing as mp
import os
import queue
import re
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table
from torch.distributed.tensor import DTensor

from common import UserError, read_json
from config import ModelConfig, config_from_hf, config_to_hf
from cprec import DEFAULT_CPT, DEFAULT_DATA, DEFAULT_MODEL, SMALL, dataset
from data import IGNORE, TEST, VALID, Blocks, Encoder
from eval import Trie, prompt_cache
from model import Decoder, KVCache, init_weights
from tokenizer import Tokenizer
from train import (
    MATMUL_N,
    accumulate,
    autocast,
    checkpoint_layers,
    clip_grad_norm,
    cross_entropy_sum,
    matmul_flops,
    param_groups,
    setup_distributed,
    shard_fsdp,
)

H100_BF16_PEAK = 989e12  # dense bf16, SXM datasheet; an 8k matmul reaches about 800e12
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
    exact_users: int = 40
    prepare_records: int = 1_000_000
    catalogue_items: int = 100_000
    movie_users: int = 200
    movie_reps: int = 3
    llm: Path = Path(os.environ.get("CPREC_SMOLLM2", "/tmp/smollm2-135m-hf"))
    llm_users: int = 40


# --------------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    """What a README table must name: the CPU (or GPU), the cores used and the library versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name, flags = re.search(r"^model name\s*:(.*)$", cpuinfo, re.M), re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    info = {"cpu": name[1].strip() if name else "unknown", "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": bool(flags) and "avx512_bf16" in flags[1].split(), "torch": torch.__version__}
    with contextlib.suppress(ImportError):
        import transformers
        info["transformers"] = transformers.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def timed(run: Callable[[], object], device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - t


def measure_peaks(device: str, precisions: list[str]) -> dict[str, float]:
    """Best-of-10 FLOP/s of one n³ matmul per precision (train.matmul_flops, the probe behind the training MFU)."""
    return {p: matmul_flops(torch.device(device), p, MATMUL_N[torch.device(device).type]) for p in precisions}


def choose_peaks(measured: dict[str, float], device: str, override_tflops: float | None) -> tuple[dict, list[str]]:
    """The MFU denominator per precision, and a line per precision saying where it comes from."""
    peaks, notes = {}, []
    for p, flops in measured.items():
        if override_tflops is not None:
            peaks[p], source = override_tflops * 1e12, "--peak-tflops"
        elif device.startswith("cuda") and p == "bf16":  # the datasheet, so GPU MFU compares with published numbers
            peaks[p], source = H100_BF16_PEAK, "H100 SXM dense bf16 datasheet, assumed"
        else:
            peaks[p], source = flops, f"best {p} matmul, {MATMUL_N[torch.device(device).type]}³"
        source += f"; measured {flops / 1e12:.3g}" if peaks[p] != flops else ""
        notes.append(f"{p} {peaks[p] / 1e12:.3g} TFLOP/s ({source})")
    return peaks, notes


# --------------------------------------------------------------------------------------------------- timing
Step = tuple[Callable[[], None], Callable[[], None]]  # (reset, run): only run is timed


def time_interleaved(steps: dict[Any, Step], warmup: int, reps: int, device: str) -> dict[Any, list[float]]:
    """Seconds per run of each step, interleaved so noise from the other developers on this box hits all alike."""
    names = list(steps)
    times: dict[Any, list[float]] = {name: [] for name in names}
    for i in range(warmup + reps):
        # Alternate the order too: whoever runs second inherits the first one's warm caches and clock state.
        for name in names if i % 2 == 0 else names[::-1]:
            reset, run = steps[name]
            reset()
            seconds = timed(run, device)
            if i >= warmup:
                times[name].append(seconds)
    for reset, _ in steps.values():
        reset()  # free the last gradients before whatever runs next
    return times


def throughput(times: list[float], tokens: int, flops_per_token: float) -> dict:
    median = statistics.median(times)
    return dict(tokens_per_s=tokens / median, flops_per_s=tokens / median * flops_per_token, step_s=median,
                spread=(max(times) - min(times)) / 2 / median, step_s_all=times, flops_per_token=flops_per_token)


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
    ctx.set_forkserver_preload(["__main__", *preload])
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


# --------------------------------------------------------------------------------------------------- decoder
IMPLS = ("ours", "transformers")


def quiet_transformers() -> None:
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # its "Loading weights" bars would bury the table


def write_hf_checkpoint(o: Options, path: str) -> None:
    """A random transformers Llama saved as safetensors: both implementations then load the very same bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM
    quiet_transformers()
    torch.manual_seed(o.seed)
    LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(o.shape))).save_pretrained(path)


def load_impl(impl: str, path: str, device: str) -> nn.Module:
    if impl == "ours":
        return Decoder.from_pretrained(path, device=device)
    from transformers import LlamaForCausalLM
    quiet_transformers()
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device, torch.float32)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.config.use_cache = False  # a full-sequence forward needs no KV cache; ours builds none either
    return model


def logits_of(model: nn.Module, impl: str, ids: torch.Tensor) -> torch.Tensor:
    return model(ids) if impl == "ours" else model(input_ids=ids, use_cache=False).logits


def make_inputs(o: Options) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(o.seed + 1)
    return tuple(torch.randint(0, o.shape.vocab_size, (o.batch, o.seq), generator=g).to(o.device) for _ in range(2))


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Outside both models, so neither's built-in loss (HF shifts labels, upcasts) changes the work timed.
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def make_step(model: nn.Module, impl: str, mode: str, precision: str, ids: torch.Tensor, targets: torch.Tensor,
              device: str) -> Step:
    model.train(mode == "train")  # no dropout in either; HF's SDPA path reads self.training

    def run():
        with torch.set_grad_enabled(mode == "train"), autocast(precision, torch.device(device)):
            logits = logits_of(model, impl, ids)
            loss = loss_of(logits, targets) if mode == "train" else None
        if loss is not None:
            loss.backward()  # outside autocast, as its documentation asks
    return (lambda: model.zero_grad(set_to_none=True)), run


def decoder_step(path: str, impl: str, mode: str, precision: str, o: Options) -> Step:
    """A row's step on its own freshly loaded model and inputs: what add_memory measures."""
    return make_step(load_impl(impl, path, o.device), impl, mode, precision, *make_inputs(o), o.device)


def check_parity(models: dict[str, nn.Module], ids: torch.Tensor, targets: torch.Tensor, device: str) -> None:
    """Refuse to time a broken comparison: fp32 logits, loss and a first-layer gradient must agree."""
    with torch.no_grad():
        logits = {impl: logits_of(m.eval(), impl, ids) for impl, m in models.items()}
    diff = (logits["ours"] - logits["transformers"]).abs().max().item()
    assert diff <= 1e-4, f"logits differ from transformers by {diff:.2e} (> 1e-4): the comparison is broken"
    losses = {impl: loss_of(x, targets).item() for impl, x in logits.items()}
    assert abs(losses["ours"] - losses["transformers"]) <= 1e-4, f"losses differ: {losses}"
    del logits
    grads = {}
    for impl, model in models.items():
        reset, run = make_step(model, impl, "train", "fp32", ids, targets, device)
        run()
        layer0 = model.layers[0] if impl == "ours" else model.model.layers[0]
        grads[impl] = layer0.self_attn.q_proj.weight.grad.clone()
        reset()
    rel = ((grads["ours"] - grads["transformers"]).norm() / grads["transformers"].norm()).item()
    assert rel <= 1e-3, f"layer-0 q_proj gradients differ by {rel:.2e} relative"


def bench_decoder(o: Options) -> list[dict]:
    device, rows, probes = o.device, [], []
    with tempfile.TemporaryDirectory(prefix="bench-decoder-") as path:
        write_hf_checkpoint(o, path)
        models = {impl: load_impl(impl, path, device) for impl in IMPLS}
        ids, targets = make_inputs(o)
        check_parity(models, ids, targets, device)
        for mode in ("train", "infer"):
            # Forward is a third of forward+backward's FLOPs (2N of 6N; the same share of attention).
            flops = o.shape.train_flops_per_token(o.seq) / (1 if mode == "train" else 3)
            for precision in o.precisions:
                steps = {impl: make_step(m, impl, mode, precision, ids, targets, device) for impl, m in models.items()}
                times = time_interleaved(steps, o.warmup, o.reps, device)
                for impl in IMPLS:
                    rows.append(dict(section="decoder", impl=impl, mode=mode, precision=precision,
                                     **throughput(times[impl], o.batch * o.seq, flops)))
                    probes.append((rows[-1], decoder_step, (path, impl, mode, precision, o)))
                # Ratio of adjacent interleaved reps, then the median: a slow spell hits both runs of a pair.
                rows[-2]["ratio"] = statistics.median(b / a for a, b in zip(times["ours"], times["transformers"]))
        del models, steps
        gc.collect()
        add_memory(o, probes, ("transformers.models.llama.modeling_llama",))
    return rows


# --------------------------------------------------------------------------------------------------- train
QWEN_05B = ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                       intermediate_size=4864, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                       max_positions=32768, architecture="Qwen2ForCausalLM")


def train_step(config: ModelConfig, batch: tuple[int, int, int], precision: str, o: Options,
               supervised: int = 0, compiled: bool = False) -> Step:
    """One optimizer step of `cprec.py pretrain` on packed random blocks (block, micro-batch, accumulation): collate,
    train.accumulate, gradient clipping, AdamW, as train.train does them. `supervised` > 0: a `finetune` step, whose
    loss is only on the last `supervised` tokens of each row (the next item's title after a prompt). `compiled`: the
    model through torch.compile (the step's first run, untimed, compiles it)."""
    (block, micro, accum), device = batch, o.device
    model = Decoder(config)
    init_weights(model, o.seed)
    model.to(device).train()
    net = torch.compile(model) if compiled else model
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    stream = np.random.default_rng(o.seed).integers(0, config.vocab_size, micro * accum * block + 1, dtype=np.uint32)
    blocks = Blocks(stream, block, micro, o.seed)
    plan = blocks.micro_batches(0)[:accum]

    def run():
        batches = [blocks.collate(b) for b in plan]
        if supervised:  # targets are a view of the inputs (shifted by one): mask a copy
            batches = [(inputs, np.where(np.arange(block) < block - supervised, IGNORE, targets))
                       for inputs, targets in batches]
        loss = accumulate(net, model.lm_head.weight, batches, (supervised or block) * micro * accum, 1, precision,
                          torch.device(device))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # train.train reads the loss every step: a device sync
    return (lambda: None), run


def bench_train(o: Options) -> list[dict]:
    runs = [("small", SMALL, (64, 4, 1) if o.quick else (256, 16, 4), o.precisions)]
    if o.device.startswith("cuda"):
        runs.append(("qwen2.5-0.5b", QWEN_05B, (2048, 4, 2), ["bf16"]))
    rows, probes = [], []
    for name, config, batch, precisions in runs:
        variants = [(p, compiled) for p in precisions for compiled in ([False, True] if o.compile else [False])]
        steps = {v: train_step(config, batch, v[0], o, compiled=v[1]) for v in variants}
        times = time_interleaved(steps, max(o.warmup, int(o.compile)), o.reps, o.device)  # compiling: untimed
        del steps
        gc.collect()
        flops_per_token = config.train_flops_per_token(batch[0])
        for p, compiled in variants:
            rows.append(dict(section="train", model=name + " compiled" * compiled, params=config.n_params,
                             precision=p, batch="×".join(map(str, batch)), config=asdict(config),
                             **throughput(times[p, compiled], math.prod(batch), flops_per_token)))
            if not compiled:  # memory of the eager step; a fresh process would spend the probe compiling
                probes.append((rows[-1], train_step, (config, batch, p, o)))
    add_memory(o, probes)
    return rows


# --------------------------------------------------------------------------------------------------- loss
LOSSES = ("chunked (train.py)", "full logits")


def loss_step(impl: str, tokens: int, precision: str, o: Options) -> Step:
    """Forward+backward of the training loss from N supervised hidden states at Qwen2.5-0.5B's vocabulary and width:
    ours (train.cross_entropy_sum) or the usual N x V logits, upcast to fp32 for the cross-entropy."""
    gen = torch.Generator().manual_seed(o.seed)
    config, device = QWEN_05B, o.device
    hidden = torch.randn(tokens, config.dim, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(config.vocab_size, config.dim, generator=gen) * 0.02).to(device).requires_grad_()
    targets = torch.randint(0, config.vocab_size, (tokens,), generator=gen).to(device)

    def reset():
        hidden.grad = weight.grad = None

    def run():
        with autocast(precision, torch.device(device)):
            loss = (cross_entropy_sum(hidden, weight, targets) if impl == LOSSES[0] else
                    F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum"))
        loss.backward()  # outside autocast, as its documentation asks
    return reset, run


def bench_loss(o: Options) -> list[dict]:
    tokens = 256 if o.quick else 2048
    flops = 6 * QWEN_05B.dim * QWEN_05B.vocab_size  # the projection's forward and backward, per token
    rows, probes = [], []
    for precision in o.precisions:
        times = time_interleaved({impl: loss_step(impl, tokens, precision, o) for impl in LOSSES}, o.warmup, o.reps,
                                 o.device)
        for impl in LOSSES:
            rows.append(dict(section="loss", impl=impl, precision=precision, tokens=tokens, vocab=QWEN_05B.vocab_size,
                             **throughput(times[impl], tokens, flops)))
            probes.append((rows[-1], loss_step, (impl, tokens, precision, o)))
    add_memory(o, probes)
    return rows


# --------------------------------------------------------------------------------------------------- eval
def only_users(ds, users: set[str]):
    """`ds` with the test items of every other user marked VALID, so evaluate() on the test split sees exactly
    `users`; their histories and the popularity counts (TRAIN only) are unchanged."""
    others = ~np.isin(np.asarray(ds.user_ids), list(users))[ds.user]
    return replace(ds, split=np.where((ds.split == TEST) & others, VALID, ds.split).astype(ds.split.dtype))


def bench_eval(o: Options) -> list[dict]:
    from eval import evaluate
    ds = dataset(o.data)  # the built-in world is created on first use
    console.print(f"eval: {o.model} on {o.data}, domain games")
    model = Decoder.from_pretrained(o.model, device=o.device)
    encoder = Encoder(Tokenizer.from_pretrained(o.model))
    rows = []
    for precision in o.precisions:
        with autocast(precision, torch.device(o.device)):
            beam = evaluate(model, encoder, ds, "games", beams=20, users=o.eval_users, seed=o.seed)
            beam_top = {r["user"]: r["top10"] for r in beam["per_user"]}
            # Exact scoring is far slower: a seeded subset of the beam run's users, scored again exactly.
            chosen = np.random.default_rng(o.seed).choice(list(beam_top), min(o.exact_users, len(beam_top)), False)
            exact = evaluate(model, encoder, only_users(ds, set(chosen)), "games", exact=True)
        pairs = [(beam_top[r["user"]], r["top10"]) for r in exact["per_user"]]
        assert len(pairs) == len(chosen), "the exact run did not score the chosen users"
        common = dict(section="eval", precision=precision, items=beam["items"], model=str(o.model))
        rows += [dict(common, ranker="beam search, 20 beams", users=beam["users"], users_per_s=beam["users_per_s"],
                      speedup=beam["users_per_s"] / exact["users_per_s"],
                      overlap=statistics.mean(len(set(b) & set(e)) / max(len(e), 1) for b, e in pairs),
                      same_order=statistics.mean(b == e for b, e in pairs)),
                 dict(common, ranker="exact scoring", users=exact["users"], users_per_s=exact["users_per_s"])]
    return rows


# --------------------------------------------------------------------------------------------------- llm
LLM_CPT, LLM_SFT = (256, 4, 1), (128, 8, 1)  # (block, micro-batch, accumulation): 1,024 tokens a step
SFT_SUPERVISED = 8  # tokens with a loss per SFT row: about one title after a 120-token prompt


def bench_llm(o: Options) -> list[dict]:
    """The default small model beside a pretrained LLM (SmolLM2-135M-Instruct): CPT and SFT optimizer steps (random
    weights: speed does not depend on their values) and evaluation users/s of the real checkpoints on games."""
    from eval import evaluate
    if not (o.llm / "config.json").exists():
        console.print(f"llm: skipped, no checkpoint in {o.llm} (build it with ../shared/tools/smollm2, or --llm)")
        return []
    ds = dataset(o.data)
    models = {"small": (SMALL, o.model), o.llm.name: (config_from_hf(read_json(o.llm / "config.json")), o.llm)}
    rows = []
    for name, (config, path) in models.items():
        steps = {(kind, p): train_step(config, batch, p, o, supervised)
                 for kind, batch, supervised in (("cpt", LLM_CPT, 0), ("sft", LLM_SFT, SFT_SUPERVISED))
                 for p in o.precisions}
        times = time_interleaved(steps, o.warmup, o.reps, o.device)
        del steps
        gc.collect()
        model = Decoder.from_pretrained(path, device=o.device)
        encoder = Encoder(Tokenizer.from_pretrained(path))
        for p in o.precisions:
            with autocast(p, torch.device(o.device)):
                result = evaluate(model, encoder, ds, "games", beams=20, users=o.llm_users, seed=o.seed)
            cpt, sft = (throughput(times[kind, p], math.prod(batch), 0)["tokens_per_s"]
                        for kind, batch in (("cpt", LLM_CPT), ("sft", LLM_SFT)))
            rows.append(dict(section="llm", model=name, params=config.n_params, precision=p, cpt_tokens_per_s=cpt,
                             sft_tokens_per_s=sft, users=result["users"], users_per_s=result["users_per_s"],
                             ndcg=result["model"]["ndcg@10"]))
    return rows


def bench_recommend(o: Options) -> list[dict]:
    """One recommendation at a time (latency, as `cprec.py recommend --history ...` spends it after loading) and
    the JSONL batch mode (`--input`, 256 histories a batch): the test histories of the world's games users as titles."""
    from data import eval_cases
    from recommend import Recommender
    ds = dataset(o.data)
    console.print(f"recommend: {o.model} on {o.data}, domain games")
    model = Decoder.from_pretrained(o.model, device=o.device)
    cases = eval_cases(ds, "games", TEST)
    chosen = np.random.default_rng(o.seed).choice(len(cases), min(o.eval_users, len(cases)), replace=False)
    histories = [[ds.titles[i] for i in cases[c].history] for c in chosen]
    rows = []
    for precision in o.precisions:
        rec = Recommender(model, Encoder(Tokenizer.from_pretrained(o.model)), ds, precision=precision)
        rows.append(dict(section="recommend", precision=precision, items=len(ds.catalogue("games")),
                         **recommend_probe(rec, histories, o.device)))
    return rows


def recommend_probe(rec, histories: list[list[str]], device: str) -> dict:
    from recommend import recommend_file
    rec.recommend(histories[:1], "games")  # the trie and title index are built once, on first use
    singles = histories[:RECOMMEND_LATENCY_CALLS]
    times = [timed(lambda h=h: rec.recommend([h], "games", k=10), device) for h in singles]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "users.jsonl"
        source.write_text("".join(json.dumps({"id": n, "titles": h}) + "\n" for n, h in enumerate(histories)))
        seconds = timed(lambda: recommend_file(rec, source, Path(tmp) / "out.jsonl", "games", 10), device)
    p50, p95 = np.percentile(times, [50, 95]) * 1000
    return dict(calls=len(singles), p50_ms=p50, p95_ms=p95, users=len(histories), users_per_s=len(histories) / seconds)


RECOMMEND_LATENCY_CALLS = 50


# --------------------------------------------------------------------------------------------------- catalogue
CATALOGUE_USERS = {"beam": 16, "exact": 2}  # beam: all in one beam_search batch
CATALOGUE_BEAMS, PROMPT_TOKENS, PAD, TERMINATOR = 20, 100, 0, 1


def synthetic_catalogue(n: int, vocab: int, seed: int) -> list[list[int]]:
    """`n` distinct items of 3-8 random tokens and then TERMINATOR (like a title's closing newline), which occurs in
    no item's body: so no item is another's prefix, as with real items."""
    rng, items = np.random.default_rng(seed), {}
    while len(items) < n:
        k = n - len(items)
        bodies, lengths = rng.integers(TERMINATOR + 1, vocab, (k, 8)).tolist(), rng.integers(3, 9, k).tolist()
        items.update(dict.fromkeys(tuple(body[:m]) + (TERMINATOR,) for body, m in zip(bodies, lengths)))
    return [list(item) for item in items]


def catalogue_probe(ranker: str, n: int, precision: str, o: Options) -> dict:
    """One ranker on a synthetic catalogue of `n` items, in this (fresh) process: the trie's build time and peak
    memory (beam), users/s, and the memory ranking needs beyond the resident model, items and trie, after a warm-up
    on one user (exact: and 1,000 items)."""
    from eval import beam_search, build_trie, exact_scores
    torch.set_num_threads(o.threads)
    device, users = o.device, CATALOGUE_USERS[ranker]
    model = Decoder(SMALL)
    init_weights(model, o.seed)
    model.to(device).eval()
    items = synthetic_catalogue(n, SMALL.vocab_size, o.seed)
    prompts = np.random.default_rng(o.seed + 1).integers(TERMINATOR + 1, SMALL.vocab_size, (users, PROMPT_TOKENS))
    prompts = prompts.tolist()
    row = dict(section="catalogue", precision=precision, items=n, users=users)
    if ranker == "beam":
        t = time.perf_counter()
        trie, memory = peak_memory(lambda: build_trie(items, device), device)
        row.update(ranker=f"beam search, {CATALOGUE_BEAMS} beams", trie_s=time.perf_counter() - t,
                   trie_peak_mib=memory.get("peak_mem_mib"))
        rank = lambda some: beam_search(model, some, trie, CATALOGUE_BEAMS, PAD)  # noqa: E731
        warm_up = lambda: rank(prompts[:1])  # noqa: E731
    else:
        row.update(ranker="exact scoring")
        rank = lambda some: [exact_scores(model, p, items, PAD) for p in some]  # noqa: E731
        warm_up = lambda: exact_scores(model, prompts[0], items[:1000], PAD)  # noqa: E731
    with autocast(precision, torch.device(device)):
        warm_up()  # one-time allocations (thread pools, oneDNN primitives, RoPE table) are not the ranking's
        gc.collect()
        t = time.perf_counter()
        _, memory = peak_memory(lambda: rank(prompts), device)
        seconds = time.perf_counter() - t
    if memory:
        row["resident_mib"] = memory["peak_total_mib"] - memory["peak_mem_mib"]
    return dict(row, users_per_s=users / seconds, seconds=seconds, **memory)


def bench_catalogue(o: Options) -> list[dict]:
    console.print(f"catalogue: {o.catalogue_items:,} synthetic items, model cprec.SMALL (random init)")
    rows = []
    with fresh_processes() as pool:  # a fresh process per probe: no other probe's memory in its peak
        for precision in o.precisions:
            for ranker in CATALOGUE_USERS:
                rows.append(pool.submit(catalogue_probe, ranker, o.catalogue_items, precision, o).result())
    return rows


# --------------------------------------------------------------------------------------------------- movies
MOVIE_BEAMS, MOVIE_PROMPT, MOVIE_ITEMS, MOVIE_EXACT = 20, 150, 3000, 10


def movie_catalogue(seed: int) -> tuple[list[list[int]], str]:
    """Item token sequences of a movie catalogue, and where they come from: MovieLens-100k's titles (recbole's copy,
    when installed) through a 1,024-piece SentencePiece model trained on them (7.9 tokens a title with the closing
    newline, up to 34); else MOVIE_ITEMS synthetic titles of 3-40 tokens with a long tail (median 7)."""
    with contextlib.suppress(ImportError):
        import recbole
        path = Path(recbole.__file__).parent / "dataset_example" / "ml-100k" / "ml-100k.item"
        if path.exists():
            from tokenizer import train_tokenizer
            lines = path.read_text(encoding="latin-1").splitlines()[1:]
            titles = list(dict.fromkeys(line.split("\t")[1] + "\n" for line in lines))  # 1,659 distinct
            with tempfile.TemporaryDirectory(prefix="bench-movies-") as tmp:
                train_tokenizer(titles, Path(tmp), 1024)
                tokenizer = Tokenizer.from_pretrained(tmp)
            return [tokenizer.encode(t) for t in titles], f"MovieLens-100k titles ({path})"
    rng, items = np.random.default_rng(seed), {}
    while len(items) < MOVIE_ITEMS:
        length = int(np.clip(np.round(rng.lognormal(np.log(7), 0.5)), 3, 40))
        items[tuple(rng.integers(TERMINATOR + 1, 1024, length - 1).tolist()) + (TERMINATOR,)] = None
    return [list(item) for item in items], "synthetic titles (MovieLens-100k not installed)"


def movie_prompts(items: list[list[int]], users: int, seed: int) -> list[list[int]]:
    """Each user's last MOVIE_PROMPT tokens of a random history of whole titles, as in a 20-item prompt."""
    rng, prompts = np.random.default_rng(seed), []
    for _ in range(users):
        history: list[int] = []
        while len(history) < MOVIE_PROMPT:
            history += items[rng.integers(len(items))]
        prompts.append(history[-MOVIE_PROMPT:])
    return prompts


def bench_movies(o: Options) -> list[dict]:
    """Beam search today against the frozen copy of the old one and against exact scoring, on a movie-sized catalogue
    and the default model with random weights. Each repetition is a whole pass over the users, new and old in
    alternating order, and users/s is the median pass: alternating batch by batch instead had each ranker start
    right after the other freed its caches (about 1.7 GB for the old one), which cost the new one about 20%."""
    from eval import auto_batch_users, beam_search, build_trie, exact_scores
    items, source = movie_catalogue(o.seed)
    lengths = [len(i) for i in items]
    console.print(f"movies: {len(items):,} items from {source}, {statistics.mean(lengths):.1f} tokens a title (max "
                  f"{max(lengths)}), {MOVIE_PROMPT}-token prompts, cprec.SMALL with random weights")
    model = Decoder(SMALL)
    init_weights(model, o.seed)
    model.to(o.device).eval()
    trie = build_trie(items, o.device)
    prompts = movie_prompts(items, o.movie_users, o.seed)
    step = auto_batch_users(model, MOVIE_BEAMS, MOVIE_PROMPT, trie.depth)
    batches = [prompts[start:start + step] for start in range(0, len(prompts), step)]
    rankers = {"new": beam_search, "old": frozen_beam_search}
    rows = []
    for precision in o.precisions:
        speed, results = {name: [] for name in rankers}, {}
        with autocast(precision, torch.device(o.device)):
            for ranker in rankers.values():  # warm-up: thread pools, oneDNN primitives
                ranker(model, prompts[:2], trie, MOVIE_BEAMS, PAD)
            for rep in range(o.movie_reps):
                for name in list(rankers) if rep % 2 == 0 else list(rankers)[::-1]:  # alternate who runs first
                    t = time.perf_counter()
                    out = [[x.cpu() for x in rankers[name](model, b, trie, MOVIE_BEAMS, PAD)] for b in batches]
                    speed[name].append(len(prompts) / (time.perf_counter() - t))  # .cpu() above: a device sync
                    results[name] = [torch.cat(x) for x in zip(*out)]  # items (U, B), scores (U, B)
                assert torch.equal(results["new"][0], results["old"][0]), "beam search changed its results"
            diff = results["new"][1] - results["old"][1]
            worst = diff.masked_fill(results["new"][1] == results["old"][1], 0.0).abs().max().item()  # -inf slots
            seconds, exact_top = 0.0, {}
            for u in range(min(o.exact_users, MOVIE_EXACT, len(prompts))):
                t = time.perf_counter()
                scores = exact_scores(model, prompts[u], items, PAD).cpu()
                seconds += time.perf_counter() - t
                exact_top[u] = torch.argsort(scores, descending=True, stable=True)[:10].tolist()
        new, old, exact = statistics.median(speed["new"]), statistics.median(speed["old"]), len(exact_top) / seconds
        tops = results["new"][0][:, :10].tolist()
        common = dict(section="movies", precision=precision, items=len(items), source=source, batch_users=step)
        rows += [dict(common, ranker="beam search (new)", users=len(prompts), users_per_s=new, passes=speed["new"],
                      vs_old=new / old, vs_exact=new / exact, max_score_diff=worst,
                      overlap=statistics.mean(len(set(tops[u]) & set(e)) / 10 for u, e in exact_top.items()),
                      same_order=statistics.mean(tops[u] == e for u, e in exact_top.items())),
                 dict(common, ranker="beam search (old, 47acd71)", users=len(prompts), users_per_s=old,
                      passes=speed["old"]),
                 dict(common, ranker="exact scoring", users=len(exact_top), users_per_s=exact)]
    return rows


class FrozenBeamCache:
    """eval.BeamCache as of commit 47acd71: every row keeps `steps` slots, all copied when beams are reordered."""

    def __init__(self, prompt: KVCache, width: int, steps: int):
        layers, users, heads, _, dim = prompt.k.shape
        self.prompt, self.width, self.length = prompt, width, 0
        self.k = torch.zeros(layers, users * width, heads, steps, dim, dtype=prompt.k.dtype, device=prompt.k.device)
        self.v = torch.zeros_like(self.k)
        self.next_pos = prompt.next_pos.repeat_interleave(width)

    def extend(self, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        T = attention_mask.shape[1]
        start, self.length = self.length, self.length + T
        if self.length > self.k.shape[3]:
            raise ValueError(f"beam cache overflow: {self.length} > {self.k.shape[3]} slots")
        self.next_pos = position_ids[:, -1] + 1  # continuations are right-padded at most: positions just go on
        slots = torch.arange(self.length, device=self.k.device)
        return slots <= start + torch.arange(T, device=self.k.device)[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: torch.Tensor):
        rows, n_q, T, dim = q.shape
        users, width, n_kv = rows // self.width, self.width, k.shape[1]
        group, prompt_len = n_q // n_kv, self.prompt.length  # query head h reads key head h // group (GQA)
        self.k[layer, :, :, self.length - T:self.length] = k
        self.v[layer, :, :, self.length - T:self.length] = v
        by_user = lambda x: x.view(users, width, n_kv, -1, x.shape[-1]).transpose(1, 2).reshape(  # noqa: E731
            users, n_kv, -1, x.shape[-1])
        by_row = lambda x: x.view(users, n_kv, width, -1, x.shape[-1]).transpose(1, 2).reshape(  # noqa: E731
            rows, n_kv, -1, x.shape[-1])
        q = q.reshape(rows, n_kv, group * T, dim)
        prompt_k, prompt_v = self.prompt.k[layer, :, :, :prompt_len], self.prompt.v[layer, :, :, :prompt_len]
        # A user's continuations are extra queries against its prompt's keys; each row's own keys are per row.
        to_prompt = (by_user(q) @ prompt_k.transpose(-1, -2)).float().masked_fill(
            ~self.prompt.valid[:, None, None, :prompt_len], -torch.inf)
        to_own = (q @ self.k[layer, :, :, :self.length].transpose(-1, -2)).float().masked_fill(
            ~causal.repeat(group, 1), -torch.inf)
        probs = torch.softmax(torch.cat([by_row(to_prompt), to_own], -1) * dim ** -0.5, -1).to(v.dtype)
        from_prompt, from_own = probs.split([prompt_len, self.length], -1)
        y = by_row(by_user(from_prompt) @ prompt_v) + from_own @ self.v[layer, :, :, :self.length]
        return y.reshape(rows, n_q, T, dim)

    def select(self, rows: torch.Tensor) -> FrozenBeamCache:
        out = copy.copy(self)
        out.k, out.v, out.next_pos = self.k[:, rows], self.v[:, rows], self.next_pos[rows]
        return out


@torch.no_grad()
def frozen_beam_search(model: Decoder, prompts: list[list[int]], trie: Trie, beams: int, pad_id: int,
                       exclude: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """eval.beam_search as of commit 47acd71 (the same signature and results): the speed and equality reference
    for today's; every user runs to the deepest item and each step copies every beam's whole cache."""
    device = model.embed_tokens.weight.device
    U = len(prompts)
    prompt, logp = prompt_cache(model, prompts, pad_id, last_only=False)
    cache = FrozenBeamCache(prompt, beams, trie.depth)
    banned = torch.full((U, max(1, max(map(len, exclude or [[]])))), -2, dtype=torch.long, device=device)
    for row, items in enumerate(exclude or []):
        banned[row, :len(items)] = torch.as_tensor(items, dtype=torch.long)
    node = torch.zeros((U, 1), dtype=torch.long, device=device)
    score = torch.zeros((U, 1), device=device)
    pool_item = torch.full((U, beams), -1, dtype=torch.long, device=device)
    pool_score = torch.full((U, beams), -torch.inf, device=device)
    for _ in range(trie.depth):
        width = node.shape[1]
        tokens, child = trie.children(node.flatten())  # (U·W, F)
        fan = max(tokens.shape[1], -(-beams // width))  # at least `beams` candidates per user
        tokens = F.pad(tokens, (0, fan - tokens.shape[1]), value=-1)
        child = F.pad(child, (0, fan - child.shape[1]), value=trie.sink)
        gained = logp.gather(1, tokens.clamp(min=0)).masked_fill(tokens < 0, -torch.inf)
        cand = (score.flatten()[:, None] + gained).view(U, width * fan)
        child, item = child.view(U, width * fan), trie.item[child].view(U, width * fan)
        finished = (item >= 0) & ~(item[..., None] == banned[:, None, :]).any(-1)
        merged = torch.cat([pool_score, cand.masked_fill(~finished, -torch.inf)], 1).topk(beams, dim=1)
        pool_item = torch.cat([pool_item, item.masked_fill(~finished, -1)], 1).gather(1, merged.indices)
        pool_score = merged.values  # (the exclusion fix applied to the frozen copy too: only speed differs)
        score, pick = cand.masked_fill(item >= 0, -torch.inf).topk(beams, dim=1)
        if not (score[:, 0] > pool_score[:, -1]).any():
            break
        cache = cache.select((torch.arange(U, device=device)[:, None] * beams + pick // fan).flatten())
        token = tokens.view(U, width * fan).gather(1, pick).clamp(min=0)  # dead beams (-inf) feed any token
        hidden = model(token.view(-1, 1), kv_cache=cache, hidden=True)[:, -1]
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
        node = child.gather(1, pick)
    return pool_item, pool_score


# --------------------------------------------------------------------------------------------------- prepare
CATEGORY = "Bench_Synthetic"
WORDS = ("dragon ocean star forest desert frost city jazz robot garden pirate knight ninja safari mystery ghost "
         "retro spice summit fairy steam viking zen great fun quality price works well love bought gift battery "
         "easy sturdy small cheap fast nice broke after week return again recommend son daughter").split()


def amazon_source(n: int, seed: int = 0, root: Path | None = None) -> Path:
    """A synthetic Amazon Reviews 2023 category of `n` reviews: the real files' fields and ~500-byte lines, a user
    per ~8 reviews, an item per ~25 with skewed popularity. Cached under /tmp by `n`: 1M reviews are ~0.5 GB."""
    out = (root or Path(tempfile.gettempdir())) / f"cprec-bench-amazon2023-v2-{n}-{seed}"
    if (out / "done").exists():
        return out
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1, n // 8), max(1, n // 25)

    def ids(k: int, width: int) -> list[str]:  # k random upper-case ids, vectorised
        return rng.integers(65, 91, (k, width), np.uint8).view(f"S{width}")[:, 0].astype(str).tolist()
    users, items = ids(n_users, 28), ["B0" + s for s in ids(n_items, 8)]
    texts = [" ".join(rng.choice(WORDS, 45)).capitalize() + "." for _ in range(997)]
    user, item = rng.integers(0, n_users, n), (n_items * rng.random(n) ** 2).astype(int)  # popular items first
    stamp = rng.integers(1_300_000_000_000, 1_700_000_000_000, n)  # milliseconds, as in the 2023 files
    rating, votes = rng.integers(1, 6, n), rng.geometric(0.5, n) - 1
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{CATEGORY}.jsonl", "w") as f:
        for k, (u, i, t, r, v) in enumerate(zip(user.tolist(), item.tolist(), stamp.tolist(), rating.tolist(),
                                                votes.tolist())):
            f.write(f'{{"rating": {r}.0, "title": "{texts[k % 997][:30]}", "text": "{texts[(k * 7) % 997]}", '
                    f'"images": [], "asin": "{items[i]}", "parent_asin": "{items[i]}", "user_id": "{users[u]}", '
                    f'"timestamp": {t}, "helpful_vote": {v}, "verified_purchase": true}}\n')
    with open(out / f"meta_{CATEGORY}.jsonl", "w") as f:
        for i, asin in enumerate(items):
            f.write(f'{{"main_category": "Synthetic", "title": "{texts[i % 997][:40]} {i}", "average_rating": 4.1, '
                    f'"rating_number": {i % 500}, "features": [], "description": [], "price": null, "images": [], '
                    f'"videos": [], "store": "Store {i % 97}", "categories": [], "details": {{}}, '
                    f'"parent_asin": "{asin}", "bought_together": null}}\n')
    (out / "done").touch()
    return out


def prepare_probe(phase: str, source: Path) -> dict:
    """Time one phase in this (fresh) process: parse = prepare._read_reviews consumed, convert = convert_amazon."""
    import prepare
    before, report = rss_kib("VmRSS"), {"files": {}}
    path = source / f"{CATEGORY}.jsonl"
    t = time.perf_counter()
    if phase == "parse":
        for _ in prepare._read_reviews(path, prepare.AMAZON[2023][2], report, False):
            pass
    else:
        with tempfile.TemporaryDirectory(prefix="bench-prepare-") as out:
            report = prepare.convert_amazon(2023, source, [CATEGORY], Path(out) / "data")["report"]
    seconds = time.perf_counter() - t
    stats = report["files"][str(path)]
    assert stats["malformed"] == 0, f"the synthetic reviews have malformed lines: {stats}"
    records = stats["lines"]
    return dict(records=records, seconds=seconds, records_per_s=records / seconds, rss_before_mib=before / 1024,
                peak_rss_mib=rss_kib("VmHWM") / 1024)


def bench_prepare(o: Options) -> list[dict]:
    t = time.perf_counter()
    source = amazon_source(o.prepare_records, o.seed)
    console.print(f"prepare: {source} ({sum(f.stat().st_size for f in source.glob('*.jsonl')) / 1e6:,.0f} MB, "
                  f"ready in {time.perf_counter() - t:.1f} s)")
    rows = []
    for phase in ("parse", "convert"):  # spawn: a fresh interpreter, so its peak RSS is this phase's alone
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            rows.append(dict(section="prepare", phase=phase, **pool.submit(prepare_probe, phase, source).result()))
    return rows


# --------------------------------------------------------------------------------------------------- fsdp
QWEN_15B = replace(QWEN_05B, dim=1536, n_layers=28, n_heads=12, head_dim=128, intermediate_size=8960)
QWEN_7B = replace(QWEN_05B, vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
                  intermediate_size=18944, tie_embeddings=False)


def fsdp_rank(results, rank: int, world: int, port: int, config: ModelConfig, batch: tuple[int, int, int],
              precision: str, checkpointing: bool, o: Options) -> None:
    """One process of an FSDP run as `cprec.py pretrain --shard fsdp` trains (train.shard_fsdp, accumulate,
    clip_grad_norm, AdamW): warm-up steps, then timed steps; puts its times and memory on `results`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    # CPU: every process gets half the threads, so 2 processes use them all and 1 shows the cost per process alone.
    torch.set_num_threads(max(1, o.threads // 2) if o.device == "cpu" else o.threads)
    _, _, device = setup_distributed()
    model = Decoder(config)
    init_weights(model, o.seed)
    if checkpointing:
        checkpoint_layers(model)
    root = shard_fsdp(model, device, precision)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    block, micro, accum = batch
    stream = np.random.default_rng(o.seed).integers(0, config.vocab_size, micro * accum * block + 1, dtype=np.uint32)
    blocks = Blocks(stream, block, micro, o.seed)
    mine = [blocks.collate(b) for b in blocks.micro_batches(0)[:accum][rank::world]]  # this process's share

    def step():
        loss = accumulate(root, model.lm_head.weight, mine, block * micro * accum, world, precision, device)
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(max(1, o.warmup)):  # the first step allocates AdamW's state
        step()
    state = [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values() if t.dim())]
    state_bytes = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in state)  # this process's shards
    times = []

    def timed_steps():
        for _ in range(o.reps):
            torch.distributed.barrier()
            times.append(timed(step, o.device))
    gc.collect()
    _, memory = peak_memory(timed_steps, o.device)
    results.put(dict(rank=rank, step_s_all=times, state_mib=state_bytes / 2**20, **memory))
    torch.distributed.destroy_process_group()


def fsdp_run(world: int, *args) -> list[dict]:
    """Each rank of an FSDP run in a fresh spawned process (no inherited threads or CUDA state); their results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # Spawned children copy os.environ when they start; glibc returns freed tensors to the OS (see fresh_processes).
    with mock.patch.dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072"):
        procs = [ctx.Process(target=fsdp_rank, args=(results, rank, world, port, *args)) for rank in range(world)]
        for p in procs:
            p.start()
    ranks = []
    while len(ranks) < world:
        try:
            ranks.append(results.get(timeout=5))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"an FSDP benchmark process failed: exit codes {codes}") from None
    for p in procs:
        p.join()
    return sorted(ranks, key=lambda r: r["rank"])


def bench_fsdp(o: Options) -> list[dict]:
    cuda = o.device.startswith("cuda")
    if cuda:
        gpus = torch.cuda.device_count()
        runs = [(name, config, (2048, 4, gpus), gpus, "bf16", ac) for name, config in
                (("qwen2.5-0.5b", QWEN_05B), ("qwen2.5-1.5b", QWEN_15B)) for ac in (False, True)]
    else:
        runs = [("small", SMALL, (64, 4, 2) if o.quick else (256, 8, 2), world, "fp32", False) for world in (1, 2)]
    rows = []
    for name, config, batch, world, precision, checkpointing in runs:
        ranks = fsdp_run(world, config, batch, precision, checkpointing, o)
        tokens, flops = math.prod(batch), config.train_flops_per_token(batch[0])
        speed = throughput(ranks[0]["step_s_all"], tokens, flops)
        speed["flops_per_s"] /= world if cuda else 1  # per device: GPUs each have their own, CPU processes share one
        rows.append(dict(section="fsdp", model=name, params=config.n_params, processes=world, precision=precision,
                         checkpointing=checkpointing, batch="×".join(map(str, batch)), **speed,
                         state_mib=max(r["state_mib"] for r in ranks),
                         peak_total_mib=max(r.get("peak_total_mib", math.nan) for r in ranks)))
    if not cuda:
        rows += [dict(section="fsdp", model=name, params=config.n_params, note="needs a GPU")
                 for name, config in (("qwen2.5-0.5b", QWEN_05B), ("qwen2.5-1.5b", QWEN_15B))]
    return rows


# --------------------------------------------------------------------------------------------------- memory
def memory_estimate(n_params: int, n_layers: int, dim: int, embedding: int, tokens: int, gpus: int = 8,
                    shard: str = "fsdp", checkpointing: bool = False, accumulating: bool = False) -> dict[str, float]:
    """GiB per GPU of a bf16 mixed-precision training step, from byte counts.

    Model state: fp32 weights 4 + gradients 4 + AdamW's two moments 8 = 16 bytes per parameter. DDP keeps all of it
    on every GPU, plus its gradient buckets (a flat copy of the gradients, 4) and autocast's bf16 weight copies (2,
    alive from forward to backward). FSDP shards the 16 bytes over the GPUs and gathers bf16 compute copies (2 bytes)
    of the root (`embedding`: embeddings and lm_head, gathered for the whole step) and of two layers (the one
    computing and the one prefetched); a process running several micro-batches per step also keeps an unsharded fp32
    gradient accumulator (4), as the reduce-scatter waits for the last one.
    Activations per token and layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", eq. 2, 16-bit, the 5·a·s/h attention term gone with flash attention): 34·d bytes; with each layer
    recomputed in backward, 2·d bytes (its input) plus one layer's 34·d while it is recomputed. `tokens`: one
    micro-batch of one GPU. Not counted: the chunked loss (< 0.5 GiB), CUDA context and allocator slack (~1-3 GiB).
    """
    layer = (n_params - embedding) / n_layers
    if shard == "ddp":
        state = (16 + 4 + 2) * n_params
    else:
        state = 16 * n_params / gpus + 2 * (embedding + 2 * layer) + 4 * n_params * accumulating
    activations = (2 * n_layers + 34) * dim * tokens if checkpointing else 34 * dim * n_layers * tokens
    return dict(state_gib=state / 2**30, activations_gib=activations / 2**30, total_gib=(state + activations) / 2**30)


def bench_memory(o: Options) -> list[dict]:
    rows = []
    for name, config in (("qwen2.5-0.5b", QWEN_05B), ("qwen2.5-1.5b", QWEN_15B), ("qwen2.5-7b", QWEN_7B)):
        embedding = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)
        for shard in ("ddp", "fsdp"):
            for checkpointing in (False, True):
                estimate = memory_estimate(config.n_params, config.n_layers, config.dim, embedding, MEMORY_TOKENS,
                                           8, shard, checkpointing)
                fits = estimate["total_gib"] < 0.9 * 80e9 / 2**30
                rows.append(dict(section="memory", model=name, params=config.n_params, shard=shard,
                                 checkpointing=checkpointing, **estimate, fits=fits))
    return rows


MEMORY_TOKENS = 2048 * 4  # the README's pretrain micro-batch: --block-len 2048 --micro-batch 4

# --------------------------------------------------------------------------------------------------- sections
SECTIONS: dict[str, Callable[[Options], list[dict]]] = {
    "decoder": bench_decoder, "train": bench_train, "loss": bench_loss, "eval": bench_eval,
    "recommend": bench_recommend, "catalogue": bench_catalogue, "movies": bench_movies, "prepare": bench_prepare,
    "fsdp": bench_fsdp, "memory": bench_memory, "llm": bench_llm}
NOTES = {  # printed under each section's table
    "decoder": "train = forward+backward with a full-vocabulary cross-entropy, infer = no-grad forward; tokens/s: "
               "median of interleaved reps; MFU = tokens/s x FLOPs/token (6N + 12·L·d·T, forward a third) / peak; "
               "step peak mem = memory of a warmed-up step beyond the resident weights and inputs (CPU: VmHWM - VmRSS "
               "before, a fresh process per row; CUDA: max_memory_allocated); ratio = ours / transformers tokens/s, "
               "median over adjacent rep pairs.",
    "train": "`cprec.py pretrain` optimizer steps (collate, train.accumulate, clip, AdamW) on packed random blocks of "
             "block×micro-batch×accumulation tokens; small = cprec.SMALL, random init; columns as in decoder, resident "
             "= weights + optimizer state; peak MiB = the process (CUDA: all allocated) at the step's peak.",
    "loss": "the training loss from N supervised hidden states at Qwen2.5-0.5B's vocabulary (151,936) and width "
            "(896), forward+backward: chunked = train.cross_entropy_sum (256-token chunks of logits, gradients "
            "computed in forward), full logits = the N x V logits then an fp32 cross-entropy, as a plain training loop "
            "does; columns as in decoder.",
    "eval": "full ranking of the games catalogue (items), test split, one evaluate() run each; exact users = a seeded "
            "subset of the beam users; speed-up = beam / exact users/s; on the exact users, overlap = mean |beam ∩ "
            "exact top-10| / 10, same order = share of identical top-10 lists.",
    "recommend": "top-10 of the games catalogue (items), 20 beams, history = a test user's (window 20) as titles; "
                 "latency over `calls` single histories (Recommender.recommend, model loaded, trie built); batch = "
                 "recommend_file over `users` histories of a JSONL file, 256 a batch, output written.",
    "catalogue": "memory bound of full ranking: random distinct items of 3-8 tokens + a terminator, cprec.SMALL with "
                 "random weights, 100-token random prompts; beam = one beam_search batch of all users, exact = "
                 "exact_scores per user with its default chunks; each row in a fresh process; resident = RSS before "
                 "ranking (model, items, trie), ranking peak = VmHWM growth over it (CUDA: allocated). It shows peak "
                 "memory independent of users x items: beam's follows users (prompt cache, beams x item-length keys, "
                 "beams x vocabulary logits), not items; exact's is one chunk (~1k items here) at any size.",
    "movies": "beam search on a movie catalogue (MovieLens-100k's real titles when recbole is installed), 150-token "
              "prompts, 20 beams, cprec.SMALL with random weights, the batches of eval.auto_batch_users; new = "
              "eval.beam_search, old = bench.frozen_beam_search (47acd71), whole passes over the users in "
              "alternating order, asserted to return the same items; users/s = the median pass; vs old / vs exact = "
              "users/s ratios; exact = exact_scores on the first 10 users; overlap = mean |beam ∩ exact top-10| / 10, "
              "same order = identical top-10 lists.",
    "prepare": "synthetic Amazon Reviews 2023 category; parse = prepare._read_reviews consumed, convert = "
               "convert_amazon end to end (titles, dedup, splits, dataset written); each in a fresh process: RSS "
               "before = after imports, peak = VmHWM. Target: parse >= 200k records/s.",
    "fsdp": "optimizer steps of `cprec.py pretrain --shard fsdp` (train.shard_fsdp, accumulate, clip, AdamW) on "
            "random blocks of block×micro-batch×accumulation tokens (the global batch, split over the processes), "
            "each process spawned fresh; CPU: half the threads per process, fp32; CUDA: one process per GPU, "
            "bf16 compute, fp32 master weights and reduction. step s = rank 0's median; MFU per device (CPU: the "
            "processes share one); state MiB = the largest process's local weights + AdamW state shards; peak MiB = "
            "the largest process's peak over the timed steps (CPU: VmHWM, CUDA: max_memory_allocated).",
    "llm": "the default small model (cprec.SMALL) beside a pretrained LLM (--llm): CPT = a `pretrain` step of "
           "256×4 packed random tokens, every position supervised; SFT = a `finetune` step of 128×8 tokens, loss on "
           "the last 8 of each row; both on random weights, median of interleaved reps; eval = evaluate() on the "
           "games test split (users, 20 beams) with the real checkpoints (small: --model), N@10 its NDCG@10.",
    "memory": "bench.memory_estimate per GPU on 8 GPUs, bf16 compute, micro-batch of 2048×4 tokens per GPU, no "
              "gradient accumulator (one micro-batch per process and step); fits = total < 90% of 80 GB. Formula "
              "and sources in memory_estimate's docstring.",
}
NUM, PCT, SPREAD = "{:,.0f}".format, "{:.1%}".format, ("spread", "spread", "±{:.0%}".format)
SPEED = [("precision", "precision", str), ("tokens_per_s", "tokens/s", NUM), ("mfu", "MFU", PCT),
         ("peak_mem_mib", "step peak mem MiB", NUM)]
COLUMNS = {  # (row key, header, format); format str = a text column
    "decoder": [("impl", "impl", str), ("mode", "mode", str), *SPEED, SPREAD, ("ratio", "ratio", "{:.2f}x".format)],
    "train": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e6:,.1f}M"),
              ("batch", "tokens/step", str), *SPEED, ("peak_total_mib", "peak MiB", NUM), SPREAD],
    "loss": [("impl", "loss", str), ("tokens", "tokens", NUM), *[c for c in SPEED if c[0] != "mfu"], SPREAD],
    "eval": [("ranker", "ranker", str), ("precision", "precision", str), ("items", "items", NUM),
             ("users", "users", NUM), ("users_per_s", "users/s", "{:,.1f}".format),
             ("speedup", "speed-up", "{:.1f}x".format), ("overlap", "top-10 overlap", PCT),
             ("same_order", "same top-10 order", PCT)],
    "recommend": [("precision", "precision", str), ("items", "items", NUM), ("calls", "calls", NUM),
                  ("p50_ms", "p50 ms", "{:,.1f}".format), ("p95_ms", "p95 ms", "{:,.1f}".format),
                  ("users", "batch users", NUM), ("users_per_s", "batch users/s", "{:,.1f}".format)],
    "catalogue": [("ranker", "ranker", str), ("precision", "precision", str), ("items", "items", NUM),
                  ("users", "users", NUM), ("trie_s", "trie build s", "{:.2f}".format),
                  ("trie_peak_mib", "trie build peak MiB", NUM), ("users_per_s", "users/s", "{:,.2f}".format),
                  ("resident_mib", "resident MiB", NUM), ("peak_mem_mib", "ranking peak MiB", NUM)],
    "fsdp": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e6:,.1f}M"),
             ("processes", "processes", str), ("checkpointing", "act. ckpt", str), ("batch", "tokens/step", str),
             ("precision", "precision", str), ("step_s", "step s", "{:.3f}".format), ("tokens_per_s", "tokens/s", NUM),
             ("mfu", "MFU", PCT), ("state_mib", "state MiB/process", NUM), ("peak_total_mib", "peak MiB/process", NUM),
             SPREAD, ("note", "note", str)],
    "memory": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e9:,.2f}B"), ("shard", "shard", str),
               ("checkpointing", "act. ckpt", str), ("state_gib", "state GiB", "{:.1f}".format),
               ("activations_gib", "activations GiB", "{:.1f}".format), ("total_gib", "total GiB", "{:.1f}".format),
               ("fits", "fits 80 GB", str)],
    "llm": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e6:,.1f}M"),
            ("precision", "precision", str), ("cpt_tokens_per_s", "CPT tokens/s", NUM),
            ("sft_tokens_per_s", "SFT tokens/s", NUM), ("users", "eval users", NUM),
            ("users_per_s", "eval users/s", "{:,.2f}".format), ("ndcg", "N@10", "{:.3f}".format)],
    "movies": [("ranker", "ranker", str), ("precision", "precision", str), ("items", "items", NUM),
               ("users", "users", NUM), ("users_per_s", "users/s", "{:,.1f}".format),
               ("passes", "each pass", lambda v: " / ".join(f"{x:.1f}" for x in v)),
               ("vs_old", "vs old", "{:.1f}x".format), ("vs_exact", "vs exact", "{:.1f}x".format),
               ("overlap", "top-10 overlap", PCT), ("same_order", "same top-10 order", PCT)],
    "prepare": [("phase", "phase", str), ("records", "records", NUM), ("seconds", "seconds", "{:.1f}".format),
                ("records_per_s", "records/s", NUM), ("rss_before_mib", "RSS before MiB", NUM),
                ("peak_rss_mib", "peak RSS MiB", NUM)],
}


def render(section: str, rows: list[dict]) -> Table:
    table = Table(title=section, title_justify="left")
    for _, header, fmt in COLUMNS[section]:
        table.add_column(header, justify="left" if fmt is str else "right")
    for row in rows:
        table.add_row(*(fmt(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS[section]))
    return table


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
Opt = typer.Option


@app.command(help="Run benchmark sections; print a table per section (all rows also to --json).")
def main(
    only: Annotated[str, Opt(help=f"comma-separated sections of: {', '.join(SECTIONS)}")] = ",".join(SECTIONS),
    device: Annotated[str, Opt(help="cpu or cuda[:i]")] = "cpu",
    threads: Annotated[int, Opt(help="torch threads; 0 = every core this process may use")] = 0,
    precisions: Annotated[str | None, Opt(help="fp32,bf16 (bf16 = autocast) [CPU: fp32,bf16; CUDA: bf16]")] = None,
    quick: Annotated[bool, Opt(help="smoke test: decoder shape d=64 L=2 T=64 B=4, train batch 64×4×1, "
                                    "20 eval users, 5k catalogue items, 20k prepare records")] = False,
    shape: Annotated[str, Opt(help="decoder shape changes, e.g. dim=1024,seq=256; fields and defaults: "
                                   + ",".join(f"{k}={v}" for k, v in DECODER.items()))] = "",
    reps: Annotated[int | None, Opt(help="timed reps per step [5; quick 20]")] = None,
    warmup: Annotated[int, Opt(help="untimed reps first")] = 1,
    seed: Annotated[int, Opt(help="seed of weights, inputs, user subsets and synthetic reviews")] = 0,
    memory: Annotated[bool, Opt(help="measure each row's step peak memory (CPU: a process per row)")] = True,
    compiled: Annotated[bool, Opt("--compile", help="train section: also torch.compile each model, timed beside "
                                                    "eager")] = False,
    data: Annotated[Path, Opt(help="eval/recommend dataset, with a games domain [the built-in world]")] = DEFAULT_DATA,
    model: Annotated[Path | None, Opt(help=f"eval checkpoint [{DEFAULT_CPT / 'final'}, else {DEFAULT_MODEL}]")] = None,
    eval_users: Annotated[int | None, Opt(help="eval beam-search and recommend users [1,000; quick 20]")] = None,
    exact_users: Annotated[int, Opt(help="of those, users also scored exactly (slow)")] = 40,
    catalogue_items: Annotated[int | None, Opt(help="synthetic catalogue items [100,000; quick 5,000]")] = None,
    movie_users: Annotated[int | None, Opt(help="users of the movies section's beam searches [200; quick 8]")] = None,
    movie_reps: Annotated[int | None, Opt(help="movies section: passes over the users per ranker [3; quick 1]")] = None,
    prepare_records: Annotated[int | None, Opt(help="synthetic reviews [1,000,000; quick 20,000]")] = None,
    llm: Annotated[Path, Opt(help="pretrained LLM of the llm section [$CPREC_SMOLLM2, else /tmp/smollm2-135m-hf]")] = (
        Options.llm),
    llm_users: Annotated[int | None, Opt(help="eval users of the llm section [40; quick 4]")] = None,
    peak_tflops: Annotated[float | None, Opt(help="MFU denominator for every precision, TFLOP/s "
                                                  "[CPU: measured matmul; CUDA bf16: 989, H100]")] = None,
    json_path: Annotated[Path | None, Opt("--json", help="also write machine, peaks and rows here")] = None,
) -> None:
    sections = [name.strip() for name in only.split(",") if name.strip()]
    if unknown := [name for name in sections if name not in SECTIONS]:
        raise typer.BadParameter(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}", param_hint="--only")
    cuda = device.startswith("cuda")
    precision_list = [p.strip() for p in (precisions or ("bf16" if cuda else "fp32,bf16")).split(",")]
    if bad := [p for p in precision_list if p not in DTYPES]:
        raise typer.BadParameter(f"unknown precision(s) {bad}; choose fp32, bf16", param_hint="--precisions")
    try:
        s = dict(QUICK if quick else DECODER)
        s.update({k.strip(): int(v) for k, v in (kv.split("=") for kv in shape.split(",") if kv.strip())})
        seq, batch = s.pop("seq"), s.pop("batch")
        config = ModelConfig(**s, head_dim=s["dim"] // s["n_heads"], tie_embeddings=False, max_positions=max(2048, seq))
    except (ValueError, TypeError, ZeroDivisionError):
        raise typer.BadParameter(f"{shape!r}: want name=int pairs of {list(DECODER)}", param_hint="--shape") from None
    if config.dim % config.n_heads or config.n_heads % config.n_kv_heads:
        raise typer.BadParameter("need n_heads | dim and n_kv_heads | n_heads", param_hint="--shape")
    for name, value in (("--reps", reps), ("--movie-users", movie_users), ("--movie-reps", movie_reps)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"{value}: expected a count >= 1", param_hint=name)
    model = model or next((p for p in (DEFAULT_CPT / "final", DEFAULT_MODEL) if (p / "config.json").exists()), None)
    if {"eval", "recommend", "llm"} & set(sections) and not (model and (model / "config.json").exists()):
        raise typer.BadParameter(f"no checkpoint in {model or DEFAULT_CPT / 'final'}: pass another, or run `python "
                                 "cprec.py pretrain` first", param_hint="--model")
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    eval_users = eval_users or (20 if quick else 1000)
    o = Options(device=device, threads=torch.get_num_threads(), precisions=precision_list,
                reps=reps or (20 if quick else 5), warmup=warmup, seed=seed, memory=memory, quick=quick,
                shape=config, seq=seq, batch=batch, compile=compiled, data=data, model=model, eval_users=eval_users,
                exact_users=min(exact_users, eval_users),
                catalogue_items=catalogue_items or (5_000 if quick else 100_000),
                movie_users=movie_users or (8 if quick else 200), movie_reps=movie_reps or (1 if quick else 3),
                prepare_records=prepare_records or (20_000 if quick else 1_000_000), llm=llm,
                llm_users=llm_users or (4 if quick else 40))
    machine = machine_info(device)
    console.print("[bold]machine[/]: " + ", ".join(f"{k} {v}" for k, v in machine.items()), highlight=False)
    if "decoder" in sections:
        console.print(f"[bold]decoder shape[/]: {s}, seq {seq}, batch {batch}")
    mfu = {"decoder", "train", "fsdp"} & set(sections)  # only they report FLOP/s: skip the peak matmuls otherwise
    measured = measure_peaks(device, precision_list) if mfu else {}
    rows = []
    for name in sections:
        t = time.perf_counter()
        rows += SECTIONS[name](o)
        console.print(f"section {name}: {time.perf_counter() - t:.0f} s")
    # Peaks are measured before and after the sections and the best kept: on a shared box one measurement can land
    # in someone else's busy spell, and an MFU above 100% would follow.
    again = measure_peaks(device, precision_list) if mfu else {}
    measured = {p: max(measured[p], again[p]) for p in measured}
    peaks, peak_notes = choose_peaks(measured, device, peak_tflops)
    if mfu:
        console.print("[bold]peak[/]: " + "; ".join(peak_notes))
    for row in rows:  # sections report achieved FLOP/s; MFU is one division by the peak, done here for all
        if row.get("flops_per_s") is not None and row.get("precision") in peaks:
            row["mfu"] = row["flops_per_s"] / peaks[row["precision"]]
    for name in sections:
        console.print(render(name, [r for r in rows if r["section"] == name]))
        console.print(f"{name}: {NOTES[name]}", style="dim")
    if any(row.get("mfu", 0) > 1 for row in rows):
        console.print("MFU above 100%: the peak matmuls ran in a busy spell; rerun, or pass --peak-tflops",
                      style="yellow")
    if json_path:
        json_path.write_text(json.dumps({"machine": machine, "peaks": peaks, "measured_peaks": measured,
                                         "options": asdict(o), "rows": rows}, indent=2, default=str) + "\n")
        console.print(f"wrote {json_path}")


if __name__ == "__main__":
    try:
        app()
    except UserError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise SystemExit(2) from None
