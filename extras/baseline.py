"""`cprec baseline`: an item-ID baseline on the LLM's own split, a SASRec-style next-item transformer (Kang and
McAuley, ICDM 2018).

Each item of the domain is one token of a vocabulary of catalogue size + 1 (the last id pads), run through the
project's decoder (model.Decoder: pre-norm causal attention, SwiGLU MLP) with dropout on the embeddings and on both
residual branches, the decoder's RoPE (or SASRec's learned absolute positions; RoPE ranked better on MovieLens-100k)
and input embeddings tied to the output layer. Training reads each user's TRAIN items of the domain as one sequence
with a cross-entropy over every item of the domain at every position, so one forward pass serves every target. It is
the project's one training loop (train.train: its optimizer step, clipping, non-finite-step skip, checkpoints and
resume), one step per batch of users, validated once per epoch; the epoch with the best validation NDCG@10 is kept
(early stopping). Ranking is exact: one forward pass over a user's history, then scores = last hidden state @ item
embeddings for the whole catalogue, ranked with eval.py's pessimistic-tie rank.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data import IGNORE, TEST, VALID, Dataset, eval_cases, length_buckets, pad, sample, train_sequences
from eval import KS, evaluation_result, metrics, popularity, rank_in_scores
from extras.init import init_weights
from extras.options import CONFIG, option, recipe, run_config, train_config
from extras.world import open_dataset
from infra.cli import OVERWRITE, PROGRESS, RESUME, TRACKER, show
from infra.config import DEFAULT_DATA, ModelConfig
from infra.console import say
from infra.device import autocast, resolve_precision
from infra.distributed import setup_distributed
from infra.files import UserError, atomic_dir, quote, write_json
from infra.runs import open_run, save_result
from infra.trackers import check_tracker
from model import Decoder
from schedule import Schedule
from train import cross_entropy_sum, train

POSITIONS = ("learned", "rope")


@dataclass
class BaselineConfig:
    max_len: int = option(200, "Items of history the model sees (SASRec: 200 on MovieLens, 50 on sparse data).")
    dim: int = option(64, "Hidden size (= item embedding size).")
    layers: int = option(2, "Self-attention blocks.")
    heads: int = option(1, "Attention heads.")  # SASRec found one head enough
    ffn: int = option(64, "MLP intermediate size (SASRec: = hidden size).")  # SASRec's feed-forward is dim -> dim
    dropout: float = option(0.2, "Dropout on embeddings and block outputs (SASRec: 0.2 dense, 0.5 sparse data).")
    # the decoder's RoPE: better than SASRec's learned positions on MovieLens-100k
    positions: str = option("rope", "rope (the decoder's; better on MovieLens) or learned (SASRec's).")
    lr: float = option(1e-3, "Adam learning rate.")
    # 16 users per step reached its best validation in fewer seconds than 32, 64 or 128
    batch: int = option(16, "Users per step.")
    epochs: int = option(200, "Most epochs; early stopping usually ends sooner.")
    # RecBole's stopping_step
    patience: int = option(10, "Epochs without a better validation NDCG@10 before stopping.")
    val_users: int = option(0, "Validation users, a seeded subset (0 = all).")
    # RecBole's and the LLM evaluation's default: history items stay candidates
    mask_history: bool = option(False, "Exclude items already in the history.")
    precision: str = option("fp32", "fp32, bf16, auto (bf16 where supported).")
    seed: int = option(0, "Seed for initialisation, dropout and data order.")

    def check(self) -> None:
        """Refuse impossible settings, naming the option, before anything is trained or written."""
        positive = {"max-len": self.max_len, "dim": self.dim, "layers": self.layers, "heads": self.heads,
                    "ffn": self.ffn, "batch": self.batch, "epochs": self.epochs, "patience": self.patience}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"--{name} {value}: expected a positive integer")
        if self.dim % self.heads or (self.positions == "rope" and (self.dim // self.heads) % 2):
            raise UserError(f"--dim {self.dim} must split into --heads {self.heads} equal heads (of even size for "
                            "RoPE)")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout {self.dropout}: expected a value in [0, 1)")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr}: expected a positive learning rate")
        if self.positions not in POSITIONS:
            raise UserError(f"--positions {quote(self.positions)}: expected {' or '.join(POSITIONS)}")
        if self.val_users < 0:
            raise UserError(f"--val-users {self.val_users}: expected 0 (all) or a positive count")


# --------------------------------------------------------------------------------------------------- model
class SASRec(nn.Module):
    """The decoder over item ids plus what SASRec adds: dropout and (optionally) learned positions."""

    def __init__(self, n_items: int, cfg: BaselineConfig):
        super().__init__()
        self.n_items, self.pad, self.cfg = n_items, n_items, cfg
        self.decoder = Decoder(ModelConfig(vocab_size=n_items + 1, dim=cfg.dim, n_layers=cfg.layers,
                                           n_heads=cfg.heads, n_kv_heads=cfg.heads, head_dim=cfg.dim // cfg.heads,
                                           intermediate_size=cfg.ffn, max_positions=cfg.max_len,
                                           tie_embeddings=True), dropout=cfg.dropout)
        self.config = self.decoder.config  # the shape the training loop's MFU counts
        self.positions = nn.Embedding(cfg.max_len, cfg.dim) if cfg.positions == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        init_weights(self.decoder, cfg.seed)
        if self.positions is not None:
            with torch.no_grad():
                generator = torch.Generator().manual_seed(cfg.seed + 1)
                self.positions.weight.copy_(torch.randn(self.positions.weight.shape, generator=generator) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states (B, T, dim) of right-padded item ids: under causal attention no real
        position sees the padding after it, so no mask is needed. Without dropout and with RoPE this is exactly
        Decoder.forward(ids, hidden=True)."""
        d = self.decoder
        T = ids.shape[1]
        x = d.embed_tokens(ids)
        if self.positions is not None:
            x = x + self.positions.weight[:T]
            head_dim = d.config.head_dim
            cos, sin = x.new_ones(1, 1, T, head_dim), x.new_zeros(1, 1, T, head_dim)  # RoPE as the identity
        else:
            cos, sin = (t.to(x.dtype) for t in d.rope(torch.arange(T, device=ids.device)[None]))
        x = self.dropout(x)
        for i, block in enumerate(d.layers):  # each block's dropout on its attention's and its MLP's output
            x = block(x, cos, sin, None, None, i)
        return d.norm(x)

    @property
    def items(self) -> torch.Tensor:
        """The item embeddings (n_items, dim): the input table, tied to the output layer (the pad row left out)."""
        return self.decoder.embed_tokens.weight[:self.n_items]

    # What the training loop's checkpoints ask of a model (as of model.Decoder): files in, files out.
    def write_checkpoint(self, directory: Path, tokenizer=None) -> None:
        """model.safetensors (the output layer is the item table, tied: stored once) and the settings."""
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                   if k != "decoder.lm_head.weight"}, str(directory / "model.safetensors"))
        write_json(directory / "baseline.json", {"n_items": self.n_items, **asdict(self.cfg)})

    def save_pretrained(self, path: Path, tokenizer=None) -> None:
        with atomic_dir(path) as tmp:
            self.write_checkpoint(tmp)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({**tensors, "decoder.lm_head.weight": tensors["decoder.embed_tokens.weight"]})


def sasrec_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over every item of the domain at every real position (train.train's `loss`)."""
    real = targets != IGNORE
    return cross_entropy_sum(model(inputs)[real], model.items, targets[real])


class Sequences:
    """Users' training sequences (catalogue positions, oldest first) as batches of `batch` users for train.train:
    inputs are items 0..n-2, targets items 1..n-1, a loss at every real position.

    Users come in length-bucketed batches (data.length_buckets, by rows): similar lengths share a batch, so little is
    computed on padding (a random batch of MovieLens users is 60% padding)."""

    def __init__(self, sequences: list[np.ndarray], batch: int, pad: int, seed: int):
        self.sequences, self.batch, self.pad, self.seed = sequences, batch, pad, seed
        self.lengths = np.array([len(s) for s in sequences])

    def micro_batches(self, epoch: int) -> list[list[int]]:
        return length_buckets(self.lengths, self.seed, epoch, rows=self.batch)

    def n_targets(self, batch: list[int]) -> int:
        return int(self.lengths[batch].sum()) - len(batch)

    n_tokens = n_targets

    def collate(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = pad([self.sequences[k] for k in batch], self.pad)
        targets = ids[:, 1:].copy()
        targets[np.arange(targets.shape[1]) >= (self.lengths[batch] - 1)[:, None]] = IGNORE
        return ids[:, :-1], targets


@torch.no_grad()
def catalogue_scores(model: SASRec, histories: list[np.ndarray]) -> torch.Tensor:
    """Scores (U, n_items) of every item for each history (catalogue positions, oldest first, at most max_len):
    one forward pass per history, then its last hidden state against every item embedding."""
    model.eval()
    device = model.items.device
    lengths = torch.tensor([len(h) for h in histories], device=device)
    hidden = model(torch.as_tensor(pad(histories, model.pad), device=device))
    last = hidden[torch.arange(len(histories), device=device), lengths - 1]
    return (last @ model.items.t()).float().cpu()


def catalogue_positions(ds: Dataset, catalogue: np.ndarray) -> np.ndarray:
    """Dataset item index -> its position in the catalogue (= its id in the model's vocabulary), -1 elsewhere."""
    position = np.full(len(ds.item_ids), -1)
    position[catalogue] = np.arange(len(catalogue))
    return position


def ranked_cases(model: SASRec, ds: Dataset, key: str, cfg: BaselineConfig, split: str, users: int = 0,
                 top: int = 10, batch: int = 256):
    """The split's cases (a seeded subset of `users`: the same users as the LLM's evaluation of the same seed), each
    one's 0-based rank of its next item among the whole catalogue and its `top` items, a batch of users at a time."""
    position = catalogue_positions(ds, ds.catalogue(key))
    cases = sample(eval_cases(ds, key, {"test": TEST, "valid": VALID}[split], cfg.max_len), users, cfg.seed)
    if not cases:
        raise UserError(f"domain {key!r} has no {split} cases (users need 3+ interactions there)")
    ranks, tops = [], []
    for start in range(0, len(cases), batch):
        some = cases[start:start + batch]
        histories = [position[c.history] for c in some]
        scores = catalogue_scores(model, histories).numpy()
        excluded = histories if cfg.mask_history else [()] * len(some)
        ranks.append(rank_in_scores(scores, [position[c.target] for c in some], excluded))
        for row, ex in enumerate(excluded):
            scores[row, ex] = -np.inf
        tops.append(np.argsort(-scores, axis=1, kind="stable")[:, :top])
    return cases, np.concatenate(ranks), np.concatenate(tops)


def evaluate(model: SASRec, ds: Dataset, key: str, cfg: BaselineConfig, split: str = "test", users: int = 0) -> dict:
    """Full-ranking evaluation, the same result as eval.evaluate's (eval.evaluation_result)."""
    began = time.perf_counter()
    cases, ranks, tops = ranked_cases(model, ds, key, cfg, split, users, top=max(KS))  # the top-K of every K
    position = catalogue_positions(ds, ds.catalogue(key))
    counts = popularity(ds, key)
    pop_ranks = np.concatenate([rank_in_scores(np.broadcast_to(counts, (len(some), len(counts))),
                                               [position[c.target] for c in some],
                                               [position[c.history] if cfg.mask_history else () for c in some])
                                for some in (cases[i:i + 256] for i in range(0, len(cases), 256))])
    return evaluation_result(ds, key, split, cases, ranks, tops, pop_ranks,
                             ranker="SASRec-style item-ID model, exact scores of every item",
                             mask_history=cfg.mask_history, window=cfg.max_len, seconds=time.perf_counter() - began)


def validation(model: SASRec, ds: Dataset, key: str, cfg: BaselineConfig) -> dict:
    """What early stopping reads, every epoch: the validation users' metrics (no popularity or top-10 figures)."""
    return metrics(ranked_cases(model, ds, key, cfg, "valid", cfg.val_users)[1])


# --------------------------------------------------------------------------------------------------- training
def train_baseline(ds: Dataset, key: str, cfg: BaselineConfig, run: Path, device: torch.device | str = "cpu",
                   resume: bool = False, progress: bool = False, tracker: str = "none") -> tuple[dict, dict]:
    """Train on the domain's TRAIN sequences with train.train, one step per batch of users and a validation per
    epoch, keep the epoch with the best validation NDCG@10 (early stopping after cfg.patience epochs without a better
    one), and evaluate it on the test split. Returns (training summary, test result)."""
    cfg.check()
    device = torch.device(device)
    catalogue = ds.catalogue(key)
    position = catalogue_positions(ds, catalogue)
    # The last max_len + 1 items give max_len inputs, each with its next item as target; one item has no target.
    sequences = [position[s[-(cfg.max_len + 1):]] for s in train_sequences(ds, key) if len(s) >= 2]
    if not sequences:
        raise UserError(f"domain {key!r}: no user has 2 or more training items, nothing to train on")
    model = SASRec(len(catalogue), cfg)
    data = Sequences(sequences, cfg.batch, model.pad, cfg.seed)
    per_epoch = len(data.micro_batches(0))
    train_cfg = train_config(cfg, cfg.epochs * per_epoch, 1, weight_decay=0.0, betas=(0.9, 0.98),  # SASRec's Adam
                             schedule=Schedule("constant", warmup=0), save_every=per_epoch, eval_every=per_epoch,
                             select="ndcg@10", progress=progress, shard="none",
                             tracker=tracker)  # lr, precision, seed, patience: cfg's
    say(f"SASRec baseline on {key}: {len(sequences):,} training sequences, {len(catalogue):,} items, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; at most {cfg.epochs} epochs of {per_epoch} steps, "
        f"patience {cfg.patience}")
    began = time.perf_counter()
    summary = train(model, data, train_cfg, run, loss=sasrec_loss, device=device, resume=resume,
                    validate=lambda m: validation(m, ds, key, cfg))
    model.load_weights(load_file(run / "best" / "model.safetensors"))
    with autocast(resolve_precision(cfg.precision, device), device):
        result = evaluate(model, ds, key, cfg, "test")
    epochs = math.ceil(summary["last_step"] / per_epoch)
    summary.update(epochs=epochs, best_epoch=summary["best"]["step"] // per_epoch,
                   best_valid_ndcg_at_10=summary["best"]["ndcg@10"], early_stopped=epochs < cfg.epochs,
                   train_sequences=len(sequences), parameters=sum(p.numel() for p in model.parameters()),
                   wall_seconds=time.perf_counter() - began, sequences_per_s=len(sequences) * epochs /
                   max(summary["seconds"], 1e-9))
    return summary, result


# --------------------------------------------------------------------------------------------------- the command
@dataclass
class Baseline:
    config: Optional[Path] = option(CONFIG)
    domain: str = option(..., "Domain to train on and rank (its whole catalogue).")
    data: Path = option(DEFAULT_DATA, "Dataset; the built-in world is created if missing.")
    out: Optional[Path] = option(None, "Run directory (default: runs/baseline-DOMAIN).")
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    resume: bool = option(RESUME)
    overwrite: bool = option(OVERWRITE)
    progress: bool = option(PROGRESS)
    tracker: str = option(TRACKER)


@recipe(Baseline)
def command(o: Baseline):
    """SASRec-style item-ID baseline on the LLM's split: trained with early stopping on validation NDCG@10, then
    the same full-ranking test evaluation, results and per-user ranks as every other command."""
    _, _, device = setup_distributed()
    ds = open_dataset(o.data)
    ds.domain(o.domain)
    cfg = replace(o.baseline, precision=resolve_precision(o.baseline.precision, device))
    cfg.check()
    check_tracker(o.tracker)
    config = run_config(o, {"command": "baseline", "domain": o.domain, "data": str(o.data),
                            "data_fingerprint": ds.fingerprint, "baseline": asdict(cfg)})
    run = open_run(o.out or Path(f"runs/baseline-{o.domain}"), config, o.resume, o.overwrite, inputs=[o.data],
                   files=[o.config])
    summary, result = train_baseline(ds, o.domain, cfg, run, device, o.resume, o.progress, o.tracker)
    say(f"best epoch {summary['best_epoch']} of {summary['epochs']} (validation NDCG@10 "
        f"{summary['best_valid_ndcg_at_10']:.4f}), {summary['wall_seconds']:.1f} s, {summary['sequences_per_s']:,.0f} "
        "training sequences/s")
    save_result(result, run / "results.json", {"config": config, "training": summary})
    show(result)
