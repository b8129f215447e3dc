"""Weights on disk: safetensors only (pickles can run code), one file or a sharded index, every tensor finite; and
a model folder's fingerprint, to tell whether a model is still the one a finished run was made from."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from infra.files import UserError, read_json


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


def read_safetensors(file: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; an unreadable file or a non-finite weight is refused by name (a NaN
    checkpoint would otherwise evaluate to all-zero metrics without a word)."""
    try:
        tensors = load_file(file, device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({e}); expected complete weights as "
                        "save_pretrained or transformers write them") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{file}: tensor {key} holds NaN or infinite values; expected finite weights")
    return tensors


def read_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, under its file's names."""
    return {k: v for file in safetensors_files(path) for k, v in read_safetensors(file, device).items()}


SAMPLES, SAMPLE_BYTES = 64, 4096  # bytes read of a large file: 256 KiB, wherever it lies, so 15 GB cost milliseconds


def model_fingerprint(path: Path) -> str:
    """A model folder's fingerprint, cheap even for 15 GB of weights: every file's name and size, the small files
    (config, tokenizer: up to 1 MiB) whole, and of each large one its safetensors header (names, shapes, dtypes,
    offsets) and SAMPLES evenly spaced blocks of bytes. Another `init`, another training run or a file replaced
    changes it; a change of a few weights between two sampled blocks of the same sizes would not."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= 1 << 20:
                digest.update(f.read())
                continue
            if file.suffix == ".safetensors":
                (length,) = struct.unpack("<Q", f.read(8))
                digest.update(f.read(min(length, 100 << 20)))  # the header; bounded for a damaged file
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]
