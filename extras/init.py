"""`cprec init`: a new tokenizer for a dataset's texts and a randomly initialised Llama-architecture model, saved as
an HF checkpoint, from then on loaded exactly like a downloaded one; and the default small model, made on first use."""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from torch import nn

from data import TAG, cpt_sequences, header, item_text, render
from extras.world import open_dataset
from infra.config import DEFAULT_DATA, DEFAULT_MODEL, INIT_MARKER, SMALL, ModelConfig
from infra.console import say
from infra.datasets import Dataset
from infra.distributed import barrier
from infra.files import UserError, atomic_dir, own_output, read_json, write_json
from infra.tokenizer import Tokenizer, train_tokenizer
from model import Decoder

INIT_FILES = {"config.json", "model.safetensors", "tokenizer.model"}  # what init writes


def tokenizer_corpus(ds: Dataset, seed: int = 0, sequences: int = 20000) -> list[str]:
    """Text a new tokenizer should cover: every header, tag and title, plus `sequences` rendered CPT sequences."""
    texts = [header(None)] + [header(d) + TAG.format(name=d.name) for d in ds.domains.values()]
    texts += [item_text(t) for t in ds.titles]
    cpt = cpt_sequences(ds) if any(d.role == "pretrain" for d in ds.domains.values()) else []
    for k in np.random.default_rng(seed).permutation(len(cpt))[:sequences]:
        texts.append(render(ds, *cpt[k]))
    return texts


def init_weights(model: Decoder, seed: int) -> None:
    """GPT-2 style: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2·layers), zero biases."""
    generator = torch.Generator().manual_seed(seed)
    std = model.config.init_std
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            nn.init.ones_(p)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        else:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            scale = 1 / math.sqrt(2 * model.config.n_layers) if residual else 1
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * std * scale)


def create_model(texts, out_dir: str | Path, config: ModelConfig, seed: int = 0) -> Decoder:
    """A tokenizer trained on `texts` and a model initialised with `seed`, written to `out_dir` atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        train_tokenizer(texts, tmp, config.vocab_size)
        tokenizer = Tokenizer.from_pretrained(tmp)
        # The tokenizer decides the vocabulary and special ids; the caller's config is left as it was.
        config = replace(config, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, extra={**config.extra, INIT_MARKER: {"seed": seed}})
        model = Decoder(config)
        init_weights(model, seed)
        model.write_checkpoint(tmp)
        write_json(tmp / "config.json", {**read_json(tmp / "config.json"), INIT_MARKER: {"seed": seed, "fresh": True}})
    return model


def not_a_checkpoint(model: Path) -> str:
    """Why --model (given) holds no checkpoint to train from, and what to pass instead."""
    if (model / "baseline.json").exists():
        return f"--model {model}: a SASRec model of `baseline` (item IDs), not a language model; pass a checkpoint"
    inside = [model / name for name in ("best", "final") if (model / name / "config.json").exists()]
    return f"--model {model}: no checkpoint there (config.json not found)" + (
        f"; a run folder: pass {' or '.join(map(str, inside))}" if inside else "")


def written_by_init(path: str | Path) -> bool:
    """True if `path` holds exactly what `init` writes, with init's marker in config.json, so init may replace it."""
    path = Path(path)
    try:
        marker = read_json(path / "config.json").get(INIT_MARKER)
        return set(os.listdir(path)) <= INIT_FILES and isinstance(marker, dict) and marker.get("fresh") is True
    except (UserError, OSError):
        return False


def model_out(out: Path, overwrite: bool) -> Path:
    """infra.files.own_output for init: it replaces only a model init wrote (init's fresh marker in config.json, no
    other files there), and only on --overwrite. Returns the directory to write."""
    return own_output(out, what="model", overwrite=overwrite, check=lambda p: None if written_by_init(p) else
                      "a model init made holds its config.json, model.safetensors and tokenizer.model, nothing else")


def base_model(path: Optional[Path], data: Path, rank: int) -> Path:
    """--model, or the default small model, created on first use."""
    if path is not None:
        return path
    if not (DEFAULT_MODEL / "config.json").exists():
        model_out(DEFAULT_MODEL, overwrite=False)
        if rank == 0:
            say(f"creating the default small model in {DEFAULT_MODEL} (once)")
            create_model(tokenizer_corpus(open_dataset(data)), DEFAULT_MODEL, ModelConfig())
        barrier()
    return DEFAULT_MODEL


def command(data: Path = typer.Option(DEFAULT_DATA, help="Dataset whose texts train the tokenizer."),
            out: Path = typer.Option(DEFAULT_MODEL, help="Output checkpoint directory (HF layout)."),
            vocab: int = typer.Option(SMALL.vocab_size, help="Tokenizer vocabulary size."),
            dim: int = typer.Option(SMALL.dim), layers: int = typer.Option(SMALL.n_layers),
            heads: int = typer.Option(SMALL.n_heads), kv_heads: int = typer.Option(SMALL.n_kv_heads),
            ffn: int = typer.Option(SMALL.intermediate_size, help="MLP intermediate size."),
            seed: int = typer.Option(0), overwrite: bool = typer.Option(False, help="Replace an existing model.")):
    """Train a SentencePiece tokenizer on a dataset and write a small random Llama-architecture checkpoint."""
    out = model_out(out, overwrite)
    config = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                         head_dim=dim // heads, intermediate_size=ffn)
    model = create_model(tokenizer_corpus(open_dataset(data)), out, config, seed)
    say(f"wrote {out}: {model.config.n_params / 1e6:.2f}M parameters, vocabulary {model.config.vocab_size}")
