"""Weights on disk: safetensors only (pickles can run code), one file or a sharded index, every tensor finite.

Reading streams tensor by tensor, in chunks, straight into the dtype the model will use: a process never holds the
stored copy and a converted copy of the model together. Plain reads rather than a memory map, because mapped pages
count in every process's resident memory until the file is closed (measured: 3x the model when converting fp32 to
bf16); read pages stay in the page cache once for all processes.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Container
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from infra.files import UserError, atomic_dir, read_json, write_json

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CHUNK = 1 << 22  # bytes read, checked and converted at a time: no second copy of a large tensor


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder: those its index names, else model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: no weight_map; expected {{\"weight_map\": {{tensor name: file name}}}}")
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    if [p for p in (*path.glob("*.bin"), *path.glob("*.pt")) if p.name != "state.pt"]:  # state.pt: training state
        raise UserError(f"{path}: only pickle weights (*.bin/*.pt) found; convert them to safetensors first "
                        "(loading pickles can run arbitrary code)")
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_header(file: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data, {tensor name: {dtype, shape, data_offsets}}) of one file, validated by safetensors
    itself (offsets inside the file, sizes matching shapes) before any weight is read."""
    try:
        with safe_open(file, framework="pt"):
            pass
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({e}); expected complete weights as "
                        "save_pretrained or transformers write them") from None
    header.pop("__metadata__", None)
    if unknown := sorted({v["dtype"] for v in header.values()} - DTYPES.keys()):
        raise UserError(f"{file}: tensor dtype {unknown[0]} is not supported; expected one of {', '.join(DTYPES)}")
    return 8 + n, header


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a checkpoint folder, from the file headers alone (nothing is read)."""
    return {k: tuple(v["shape"]) for file in safetensors_files(path) for k, v in read_header(file)[1].items()}


def read_weights(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 names: Container[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder (only `names`, when given), floating ones converted to `dtype` on the way
    in. A non-finite weight is refused by file and name (a NaN checkpoint would otherwise evaluate to all-zero
    metrics without a word)."""
    tensors, scratch = {}, torch.empty(CHUNK, dtype=torch.uint8)
    for file in safetensors_files(path):
        start, header = read_header(file)
        with open(file, "rb", buffering=0) as f:
            for key, info in header.items():
                if names is None or key in names:
                    f.seek(start + info["data_offsets"][0])
                    tensors[key] = read_tensor(f, file, key, info, dtype, scratch).to(device)
    return tensors


def read_tensor(f, file: Path, key: str, info: dict, dtype: torch.dtype | None, scratch: torch.Tensor):
    """One tensor from the file's current position, chunk by chunk into its final dtype (same dtype: in place).
    Finite when its extremes are: min and max propagate NaN, and they need no temporary the size of the chunk."""
    stored = DTYPES[info["dtype"]]
    dtype = dtype if dtype is not None and stored.is_floating_point else stored
    out = torch.empty(info["shape"], dtype=dtype)
    flat, step = out.view(-1), CHUNK // stored.itemsize
    for a in range(0, flat.numel(), step):
        n = min(step, flat.numel() - a)
        chunk = flat[a:a + n] if dtype == stored else scratch[:n * stored.itemsize].view(stored)
        if f.readinto(chunk.view(torch.uint8).numpy()) != n * stored.itemsize:
            raise UserError(f"{file}: truncated at tensor {key}; expected complete weights")
        if stored.is_floating_point and not bool(torch.isfinite(torch.stack(torch.aminmax(chunk))).all()):
            raise UserError(f"{file}: tensor {key} holds NaN or infinite values; expected finite weights")
        if dtype != stored:
            flat[a:a + n] = chunk
    return out


def write_peft_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """A LoRA adapter in PEFT's own layout, atomically: adapter_config.json and adapter_model.safetensors.

    `tensors` are named by the HF module they adapt ("model.layers.0.self_attn.q_proj.lora_A"); PEFT's files name them
    "base_model.model.<module>.lora_A.weight". `config` holds r, lora_alpha, target_modules, base_model_name_or_path.
    """
    state = {f"base_model.model.{k}.weight": v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "modules_to_save": None, **config}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", config)


def model_fingerprint(path: Path, samples: int = 16, size: int = 4096) -> str:
    """A cheap fingerprint of the checkpoint folder `path` (seconds for 15 GB): config.json, every weight file's
    safetensors header and size, and `samples` evenly spaced `size`-byte reads of its data, hashed. Another base
    changes it (a LoRA run's checkpoints hold adapters only, so --resume must find the same base); a tokenizer file
    or a rewritten copy of the same weights does not."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in safetensors_files(path):
        start, header = read_header(file)
        total = file.stat().st_size
        digest.update(json.dumps(header, sort_keys=True).encode() + str(total).encode())
        with open(file, "rb") as f:
            for i in range(samples):
                f.seek(start + (total - start - size) * i // max(samples - 1, 1) if total - start > size else start)
                digest.update(f.read(size))
    return digest.hexdigest()[:16]
