"""The device side of training and ranking: precision and autocast, the peak FLOP/s behind MFU, peak memory, the
machine's description, the memory model of DDP and FSDP, and the users per beam-search batch (`auto_batch_users`):
one copy for training, evaluation, the benchmarks and the tools."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import time

import torch

from infra.cache import user_cache
from infra.files import UserError, quote, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for `precision` on `device`; auto = bf16 where it is fast, else fp16 (CUDA) or fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32"  # emulated bf16 would be slower
    if precision not in DTYPES:
        raise UserError(f"--precision {quote(precision)}: expected auto, fp32, bf16 or fp16")
    return precision  # fp16 on CPU runs (slowly): the loss scaler's path, proven without a GPU


def autocast(precision: str, device: torch.device):
    """Mixed precision for bf16 and fp16 (weights stay fp32); nothing for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------------------------------- peak FLOP/s
MATMUL_N = {"cpu": 2048, "cuda": 8192}  # the peak probe's matmul size per device type
DATASHEET = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # dense bf16 FLOP/s


def matmul_flops(device: torch.device, precision: str, n: int | None = None, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of one n x n matmul after a warm-up: the practical peak of this device and thread count
    (the best repetition, because a busy machine only ever makes a repetition slower). Without an `n`, the size grows
    from 256 to MATMUL_N while one product takes under 50 ms: bf16 on a CPU without AVX-512 BF16 runs at well under a
    GFLOP/s, where one 2048 x 2048 product takes a minute."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def operands(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(size, size, device=device).to(DTYPES.get(precision, torch.float32)) for _ in range(2))
    if n is None:
        n = 256
        while n < MATMUL_N[device.type]:
            a, b = operands(n)
            a @ b  # warm-up: thread pool, kernel selection, weight packing
            sync()
            start = time.perf_counter()
            a @ b
            sync()
            if time.perf_counter() - start > 0.05:
                break
            n *= 2
    a, b = operands(n)
    a @ b
    best = math.inf
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, precision: str, remeasure: bool = False) -> float:
    """The device's peak FLOP/s for MFU: datasheet dense numbers on known GPUs; on CPU the best matmul probe ever
    seen on this machine (cached in ~/.cache/cprec), since one probe on a busy machine under-measures the peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in DATASHEET.items() if k in name), 312e12) / (2 if precision == "fp32" else 1)
    cache = user_cache() / "peak_flops.json"
    key = f"{cpu_name()} | {torch.get_num_threads()} threads | {precision} | torch {torch.__version__}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known and not remeasure:
        return known[key]
    known[key] = max(matmul_flops(device, precision, reps=10), known.get(key, 0.0))
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a probe
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, known)
    return known[key]


# --------------------------------------------------------------------------------------------------- the machine
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"


def machine(device: torch.device | str = "cpu") -> dict:
    """What a table of figures must name: the CPU (and GPU), the cores used and the library versions."""
    device = torch.device(device)
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in flags.split(),
            "torch": torch.__version__}
    with contextlib.suppress(ImportError):
        import transformers
        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocated tensors, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# --------------------------------------------------------------------------------------------------- memory model
def memory_estimate(n_params: int, n_layers: int, dim: int, embedding: int, tokens: int, gpus: int = 8,
                    shard: str = "fsdp", checkpointing: bool = False, accumulating: bool = False, adapters: int = 0,
                    base_bytes: int = 2) -> dict[str, float]:
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
    One process (shard "none") keeps DDP's bytes without its buckets.
    LoRA (`adapters` > 0 trainable adapter parameters): the frozen base in `base_bytes` per parameter (2: bf16, 4:
    fp32), no gradients or AdamW state for it; the adapters 16 bytes each (DDP: + 4 for its buckets; FSDP shards
    both, and still gathers the root and two layers in bf16). Activations as above: backward through the frozen
    layers to the adapters keeps the same inputs (the adapters' rank-r intermediates are < 1% of 34·d).
    """
    layer = (n_params - embedding) / n_layers
    if adapters and shard == "fsdp":
        state = (base_bytes * n_params + 16 * adapters) / gpus + 2 * (embedding + 2 * layer)
    elif adapters:
        state = base_bytes * n_params + (16 + 4 * (shard == "ddp")) * adapters
    elif shard in ("ddp", "none"):
        state = (16 + 4 * (shard == "ddp") + 2) * n_params
    else:
        state = 16 * n_params / gpus + 2 * (embedding + 2 * layer) + 4 * n_params * accumulating
    activations = (2 * n_layers + 34) * dim * tokens if checkpointing else 34 * dim * n_layers * tokens
    return dict(state_gib=state / 2**30, activations_gib=activations / 2**30, total_gib=(state + activations) / 2**30)


# --------------------------------------------------------------------------------------------------- ranking
def auto_batch_users(model: torch.nn.Module, beams: int, prompt_len: int, depth: int,
                     budget: float | None = None) -> int:
    """Users per beam-search batch so that the caches (the prompt once, each beam's own `depth` slots, twice while
    beams are reordered) and a step's fp32 logits each stay within `budget` bytes: 512 MiB and at most 256 users on
    CPU; on a GPU a quarter of its free memory and at most 4,096 users."""
    c, weight = model.config, model.embed_tokens.weight
    cuda = weight.device.type == "cuda"
    budget = budget or (torch.cuda.mem_get_info(weight.device)[0] / 4 if cuda else 2**29)
    slot = c.n_layers * 2 * c.n_kv_heads * c.head_dim * weight.element_size()
    return max(1, int(min(budget / (slot * (prompt_len + 2 * beams * depth)), budget / (beams * c.vocab_size * 4),
                          4096 if cuda else 256)))
