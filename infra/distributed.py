"""Several processes: torchrun's environment, DDP or FSDP2 around the model and its loss, the gradient-sync toggle,
the gradient norm over shards, and FSDP's sharded checkpoints. PyTorch's own DDP and FSDP2, nothing home-made."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh

from infra.files import UserError, atomic_dir, quote
from infra.runs import point_latest, prune

# FSDP2, DTensor and torch.distributed.checkpoint are imported where they are used: together they cost about a second
# at the start of every command, FSDP or not (`cprec.py evaluate --help`: 4.4 s with them, 2.7 s without).


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun one process per GPU (NCCL), or per CPU process (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def end_distributed(clean: bool) -> None:
    """Destroy the process group before the interpreter ends: gloo's worker threads would otherwise outlive it and
    abort a finished process ("terminate called without an active exception", pytorch#190489). After a failure only
    gloo's: NCCL's destroy may wait for ranks that never come."""
    if dist.is_initialized() and (clean or dist.get_backend() == "gloo"):
        with contextlib.suppress(Exception):  # the command's work is done: its exit status stands, not a teardown's
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def process() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def deal(costs: list[float], world: int) -> list[list[int]]:
    """Jobs of these costs dealt to `world` processes, whole: the costliest first, each to the least loaded process
    (ties: the lower rank), so the largest load is within one job of the best split (Graham's LPT rule). The same
    deal on every process (no randomness, no communication); each hand in the jobs' order."""
    loads, hands = [0.0] * world, [[] for _ in range(world)]
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        least = min(range(world), key=lambda r: (loads[r], r))
        hands[least].append(job)
        loads[least] += costs[job]
    return [sorted(hand) for hand in hands]


def gather_rows(rows: dict[int, object]) -> dict[int, object]:
    """Every process's {row: result} merged, on every process (all_gather_object pickles: gloo and NCCL alike), so
    that each holds the whole result and decides alike; one process's own rows as they are."""
    if process()[1] == 1:
        return rows
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return {row: result for part in parts for row, result in part.items()}


def least(value: int, device: torch.device) -> int:
    """The smallest `value` over the processes (a setting every process must share, such as a batch size)."""
    x = torch.tensor(value, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return int(x)


def resolve_shard(shard: str, world: int) -> str:
    """none, ddp or fsdp: auto is DDP on several processes, and DDP over one process is plain training."""
    if shard not in ("auto", "none", "ddp", "fsdp"):
        raise UserError(f"--shard {quote(shard)}: expected auto, none, ddp or fsdp")
    if shard in ("auto", "ddp"):
        return "ddp" if world > 1 else "none"
    if shard == "none" and world > 1:
        raise UserError(f"--shard none with {world} processes would train {world} separate models; use ddp or fsdp")
    return shard


class Supervised(nn.Module):
    """The model and its loss as one forward, `(*batch) -> summed loss`: what DDP and FSDP wrap. FSDP gathers a
    module's parameters only inside its forward, so the loss must run there to see the whole lm_head (tied to the
    embedding or not); DDP then sees every parameter used in its forward."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model, *batch)


def wrap(model: nn.Module, loss: Callable, device: torch.device, precision: str, shard: str,
         activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """`model` on its device with its loss, under DDP, FSDP2 or neither (one process), optionally compiled."""
    if activation_checkpointing:
        checkpoint_layers(model)
    if shard != "fsdp":
        model.to(device)  # FSDP moves one layer at a time, sharding it
    inner = torch.compile(model) if compile else model  # compiles at the first micro-batch, again at a new shape
    net = Supervised(inner, loss)
    if shard == "ddp":
        return nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if shard == "fsdp":
        return shard_fsdp(model, net, device, precision)
    return net


def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing: each decoder layer keeps only its input for backward and recomputes the rest there
    (non-reentrant autograd, so gradients are exact); parameter names and state dicts are unchanged."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)


DTENSOR = ("torch.distributed.tensor", "DTensor")  # FSDP2's shards


def instance(obj: object, module: str, name: str) -> bool:
    """isinstance(obj, module.name) without importing `module`: no object of its type exists before it is imported."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(obj, getattr(loaded, name))


def shard_fsdp(model: nn.Module, root: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """FSDP2 over all processes: each decoder layer, then the root (embedding, final norm, lm_head, which stay tied).

    Master weights, AdamW's state and gradients stay fp32 and sharded; under bf16 on CUDA each layer computes with a
    gathered bf16 copy and gradients are reduced in fp32. One process gets a one-member process group, so a sharded
    run resumes on any count (torch.distributed.checkpoint reshards on load).

    A model built on the meta device (Decoder.from_pretrained(device="meta")) is read one part at a time right before
    that part is sharded (model.materialize): a process never holds more than its shards and one layer whole. LoRA's
    frozen base may keep the compute dtype beside fp32 adapters: FSDP2 needs one dtype among the trainable parameters
    of a unit only, and gathers the others as they are (bf16 frozen weights stay bf16)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = device.type == "cuda" and precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for part in (*model.layers, model):
        if any(p.is_meta for p in part.parameters()):
            model.materialize(part)
        fully_shard(part if part is not model else root, mesh=mesh, mp_policy=policy)
    return root


@contextlib.contextmanager
def gradient_sync(net: nn.Module, last: bool):
    """Reduce gradients over the processes only on a step's last micro-batch: DDP's no_sync, FSDP's
    set_requires_gradient_sync (the others accumulate unreduced gradients locally)."""
    if instance(net, "torch.distributed.fsdp", "FSDPModule"):
        net.set_requires_gradient_sync(last)
    with (net.no_sync() if not last and hasattr(net, "no_sync") else contextlib.nullcontext()):
        yield


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def agreed(flag: bool, device: torch.device) -> bool:
    """Whether any process raised `flag`, so every process follows one decision (rank 0 alone may hold the reason)."""
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)) > 0)


def largest_weight(model: nn.Module) -> tuple[float, str]:
    """The largest |weight| of `model` and its parameter's name, over FSDP's shards of every process (one pass over the
    parameters, one all-reduce); inf if any weight is not finite."""
    names, maxima = [], []
    for name, p in model.named_parameters():
        local = (p.to_local() if instance(p, *DTENSOR) else p).detach()
        names.append(name)
        maxima.append(local.abs().amax().float() if local.numel() else local.new_zeros((), dtype=torch.float32))
    largest = torch.stack(maxima).nan_to_num(nan=torch.inf)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    at = int(largest.argmax())
    return largest[at].item(), names[at]


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ that also takes FSDP's sharded gradients; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if instance(norm, *DTENSOR):  # FSDP: each process holds its shards' part of the norm
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


def consolidate(model: nn.Module, rank: int, dtype: torch.dtype | None = None) -> nn.Module | None:
    """The whole sharded model as a plain copy built as `model.blank()`: on rank 0's CPU (None on the others) in the
    dtypes it trains in (fp32 masters; LoRA's frozen base in its compute dtype), or with a `dtype`, in it on every
    process's own device (evaluation's copies). Every process takes part; the tensors are gathered one at a time, so a
    process holds about one copy besides its shards."""
    tied, everywhere = model.config.tie_embeddings, dtype is not None
    # Full training's fp32 masters go to `dtype`; a LoRA model's frozen base already is in it, and its adapters stay in
    # fp32, as they compute in one process.
    cast = dtype if all(p.requires_grad for p in model.parameters()) else None
    full = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # the embedding, again
        whole = tensor.full_tensor() if instance(tensor, *DTENSOR) else tensor  # an all-gather: every process has it
        if everywhere or rank == 0:
            full[name] = whole.detach().to("cpu" if not everywhere else whole.device, cast)
        del whole
    if not (everywhere or rank == 0):
        return None
    copy = model.blank()
    copy.load_state_dict(full, strict=not tied, assign=True)
    if tied:
        copy.lm_head.weight = copy.embed_tokens.weight
    return copy


def trained_state(net: nn.Module, optimizer) -> dict:
    """What a sharded checkpoint holds: the trained parameters and their AdamW state, with LoRA the adapters alone.
    ignore_frozen_params misses a frozen parameter's second name (a tied lm_head): dropped here by every name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, optimizer_state = get_state_dict(net, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    frozen = {name.replace(_CHECKPOINT_PREFIX, "") for name, p in net.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    return {"model": {k: v for k, v in model_state.items() if k not in frozen}, "optimizer": optimizer_state}


def save_sharded_checkpoint(run: Path, step: int, net: nn.Module, optimizer, state: dict, keep: int,
                            rank: int) -> None:
    """FSDP's resumable checkpoint: each process writes its shards of the model and AdamW's state with
    torch.distributed.checkpoint, rank 0 the rest of the training `state`; all into rank 0's temporary directory,
    renamed once complete, and only then `latest` is switched."""
    import torch.distributed.checkpoint as dcp
    name = f"step-{step:07d}"
    with (atomic_dir(run / "checkpoints" / name) if rank == 0 else contextlib.nullcontext()) as tmp:
        where = [tmp]
        dist.broadcast_object_list(where, src=0)
        dcp.save(trained_state(net, optimizer), checkpoint_id=where[0])
        if rank == 0:  # dcp.save returns once every process's shards and the metadata are written
            torch.save({"step": step, **state}, tmp / "state.pt")
    if rank == 0:
        point_latest(run, name)
        prune(run, keep)


def load_sharded_checkpoint(net: nn.Module, optimizer, path: Path) -> None:
    """Load a sharded checkpoint's model and AdamW state into this run's shards, whatever the process count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    state = trained_state(net, optimizer)
    dcp.load(state, checkpoint_id=path)  # every tensor asked for must be in the checkpoint: nothing is left out
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # the frozen base: as loaded

