"""An item-ID baseline on the LLM's own split: a SASRec-style next-item transformer (Kang and McAuley, ICDM 2018).

Each item of the domain is one token of a vocabulary of catalogue size + 1 (the last id pads), run through the
project's decoder (model.Decoder: pre-norm causal attention, SwiGLU MLP) with dropout on the embeddings and on both
residual branches, the decoder's RoPE (or SASRec's learned absolute positions; RoPE ranked better on MovieLens-100k)
and input embeddings tied to the output layer. Training reads each user's TRAIN items of the domain as one sequence
with a cross-entropy over every item of the domain at every position, so one forward pass serves every target; the
epoch with the best validation NDCG@10 is kept (early stopping). Ranking is exact: one forward pass over a user's
history, then scores = last hidden state @ item embeddings for the whole catalogue, ranked with eval.py's
pessimistic-tie rank.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common import UserError, atomic_dir, read_json, write_json
from config import ModelConfig
from data import TEST, VALID, Dataset, eval_cases, train_sequences
from eval import KS, metrics, popularity, rank_in_scores, sample
from model import Decoder, init_weights
from train import Interrupted, StopRequest, autocast, cross_entropy_sum, point_latest, restore_rng, rng_state

POSITIONS = ("learned", "rope")


@dataclass
class BaselineConfig:
    max_len: int = 200  # items the model sees; SASRec's MovieLens setting (50 on sparse data)
    dim: int = 64
    layers: int = 2
    heads: int = 1  # SASRec found one head enough
    ffn: int = 64  # SASRec's point-wise feed-forward is dim -> dim
    dropout: float = 0.2  # SASRec on dense data (MovieLens); 0.5 on sparse data
    positions: str = "rope"  # the decoder's RoPE: better than SASRec's learned positions on MovieLens-100k
    lr: float = 1e-3
    batch: int = 128  # users per step
    epochs: int = 200  # at most; early stopping usually ends sooner
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping (RecBole's stopping_step)
    val_users: int = 0  # a seeded subset of validation users (0 = all)
    mask_history: bool = False  # RecBole's and the LLM evaluation's default: history items stay candidates
    precision: str = "fp32"
    seed: int = 0

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
            raise UserError(f"--positions {self.positions!r}: expected {' or '.join(POSITIONS)}")
        if self.val_users < 0:
            raise UserError(f"--val-users {self.val_users}: expected 0 (all) or a positive count")


# --------------------------------------------------------------------------------------------------- model
class SASRec(nn.Module):
    """The decoder over item ids plus what SASRec adds: dropout and (optionally) learned positions."""

    def __init__(self, n_items: int, cfg: BaselineConfig):
        super().__init__()
        self.n_items, self.pad = n_items, n_items
        self.decoder = Decoder(ModelConfig(vocab_size=n_items + 1, dim=cfg.dim, n_layers=cfg.layers,
                                           n_heads=cfg.heads, n_kv_heads=cfg.heads, head_dim=cfg.dim // cfg.heads,
                                           intermediate_size=cfg.ffn, max_positions=cfg.max_len,
                                           tie_embeddings=True))
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
        for i, block in enumerate(d.layers):
            x = x + self.dropout(block.self_attn(block.input_layernorm(x), cos, sin, None, None, i))
            x = x + self.dropout(block.mlp(block.post_attention_layernorm(x)))
        return d.norm(x)

    @property
    def items(self) -> torch.Tensor:
        """The item embeddings (n_items, dim): the input table, tied to the output layer (the pad row left out)."""
        return self.decoder.embed_tokens.weight[:self.n_items]


def right_pad(sequences: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded after each sequence with `pad`, and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, lengths


@torch.no_grad()
def catalogue_scores(model: SASRec, histories: list[np.ndarray], batch: int = 256) -> torch.Tensor:
    """Scores (U, n_items) of every item for each history (catalogue positions, oldest first, at most max_len):
    one forward pass per history, then its last hidden state against every item embedding."""
    model.eval()
    device = model.items.device
    out = []
    for start in range(0, len(histories), batch):
        ids, lengths = right_pad(histories[start:start + batch], model.pad)
        hidden = model(ids.to(device))
        last = hidden[torch.arange(len(lengths)), lengths.to(device) - 1]
        out.append((last @ model.items.t()).float().cpu())
    return torch.cat(out)


def catalogue_positions(ds: Dataset, catalogue: np.ndarray) -> np.ndarray:
    """Dataset item index -> its position in the catalogue (= its id in the model's vocabulary), -1 elsewhere."""
    position = np.full(len(ds.item_ids), -1)
    position[catalogue] = np.arange(len(catalogue))
    return position


def evaluate(model: SASRec, ds: Dataset, key: str, cfg: BaselineConfig, split: str = "test", users: int = 0) -> dict:
    """Full-ranking evaluation in the shape of eval.evaluate's result (metrics, popularity, per-user ranks)."""
    catalogue = ds.catalogue(key)
    position = catalogue_positions(ds, catalogue)
    cases = eval_cases(ds, key, {"test": TEST, "valid": VALID}[split], cfg.max_len)
    cases = sample(cases, users, cfg.seed)  # the same users as the LLM's evaluation of the same seed
    if not cases:
        raise UserError(f"domain {key!r} has no {split} cases (users need 3+ interactions there)")
    began = time.perf_counter()
    scores = catalogue_scores(model, [position[c.history] for c in cases]).numpy()
    targets = [int(position[c.target]) for c in cases]
    excluded = [position[c.history] if cfg.mask_history else [] for c in cases]
    ranks = [rank_in_scores(s, t, ex) for s, t, ex in zip(scores, targets, excluded)]
    counts = popularity(ds, key)
    pop_ranks = [rank_in_scores(counts, t, ex) for t, ex in zip(targets, excluded)]
    for row, ex in enumerate(excluded):
        scores[row, ex] = -np.inf
    top10 = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    seconds = time.perf_counter() - began
    protocol = (f"full ranking over all {len(catalogue)} items of {ds.domain(key).name} ({key}); SASRec-style "
                f"item-ID model, exact scores of every item; history masking {'on' if cfg.mask_history else 'off'}; "
                f"{split} split (chronological leave-one-out); {len(cases)} users; history window {cfg.max_len}; "
                "ties pessimistic; popularity from training interactions")
    return {
        "protocol": protocol, "domain": key, "split": split, "users": len(cases), "items": len(catalogue),
        "beams": None, "exact": True, "mask_history": cfg.mask_history,
        "model": metrics(ranks, KS), "popularity": metrics(pop_ranks, KS),
        "seconds": seconds, "users_per_s": len(cases) / seconds,
        "per_user": [{"user": ds.user_ids[c.user], "target": ds.item_ids[c.target], "rank": int(r),
                      "popularity_rank": int(p), "top10": [ds.item_ids[catalogue[i]] for i in top]}
                     for c, r, p, top in zip(cases, ranks, pop_ranks, top10)]}


# --------------------------------------------------------------------------------------------------- training
@dataclass
class EarlyStopping:
    """Keep the epoch with the highest validation score; stop after `patience` epochs without a higher one."""
    patience: int
    best: float = -math.inf
    best_epoch: int = 0
    waited: int = 0

    def update(self, epoch: int, score: float) -> bool:
        """Record one validation; True when it is a new best (ties keep the earlier, smaller-budget epoch)."""
        if score > self.best:
            self.best, self.best_epoch, self.waited = score, epoch, 0
            return True
        self.waited += 1
        return False

    @property
    def stop(self) -> bool:
        return self.waited >= self.patience


def training_batches(lengths: np.ndarray, batch: int, seed: int, epoch: int, bucket: int = 4) -> list[list[int]]:
    """Users in a fresh seeded order each epoch (a function of seed and epoch alone, so a resumed run repeats it).

    Each run of `bucket` batches of the shuffled users is sorted by length before it is cut into batches, and the
    batches are then shuffled: similar lengths share a batch, so little is computed on padding (a random batch of
    MovieLens users is 60% padding), while which users meet in a batch still changes every epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    span = batch * bucket
    order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                            for chunk in np.split(order, range(span, len(order), span))])
    batches = [order[i:i + batch].tolist() for i in range(0, len(order), batch)]
    return [batches[k] for k in rng.permutation(len(batches))]


def train_epoch(model: SASRec, optimizer, sequences: list[np.ndarray], cfg: BaselineConfig, epoch: int,
                device: torch.device) -> tuple[float, int]:
    """One pass over the users: inputs are items 0..n-2, targets items 1..n-1, a loss at every real position.

    Returns the mean loss per target and the number of targets."""
    model.train()
    total, count = 0.0, 0
    lengths = np.array([len(s) for s in sequences])
    for rows in training_batches(lengths, cfg.batch, cfg.seed, epoch):
        ids, lengths = right_pad([sequences[r] for r in rows], model.pad)
        ids = ids.to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        real = torch.arange(inputs.shape[1], device=device) < (lengths.to(device) - 1)[:, None]
        with autocast(cfg.precision, device):
            hidden = model(inputs)[real]
            loss = cross_entropy_sum(hidden, model.items, targets[real])
        n = int(real.sum())
        (loss / n).backward()  # the mean over this batch's targets, as SASRec and RecBole average
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total, count = total + float(loss.detach()), count + n
    return total / count, count


def save_state(run: Path, model: SASRec, optimizer, epoch: int, stopper: EarlyStopping, done: bool) -> None:
    """A resumable checkpoint after each epoch: weights (safetensors), optimizer and RNG state, early-stopping state;
    written atomically, `latest` switched once it is complete."""
    with atomic_dir(run / "checkpoint") as tmp:
        write_weights(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        write_json(tmp / "progress.json", {"epoch": epoch, "early_stopping": asdict(stopper), "done": done})
    point_latest(run, "checkpoint")


def write_weights(model: SASRec, directory: Path) -> None:
    """The weights as safetensors; the output layer is the item embedding table (tied), stored once."""
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if k != "decoder.lm_head.weight"}, str(directory / "model.safetensors"))


def load_weights(model: SASRec, path: Path) -> None:
    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict({**state, "decoder.lm_head.weight": state["decoder.embed_tokens.weight"]})


def read_records(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def train_baseline(ds: Dataset, key: str, cfg: BaselineConfig, run: Path, device: torch.device | str = "cpu",
                   resume: bool = False, say=print) -> tuple[dict, dict]:
    """Train on the domain's TRAIN sequences, select the epoch by validation NDCG@10 with early stopping, and
    evaluate the selected weights on the test split. Returns (training summary, test result)."""
    cfg.check()
    device = torch.device(device)
    catalogue = ds.catalogue(key)
    position = catalogue_positions(ds, catalogue)
    # The last max_len + 1 items give max_len inputs, each with its next item as target; one item has no target.
    sequences = [position[s[-(cfg.max_len + 1):]] for s in train_sequences(ds, key) if len(s) >= 2]
    if not sequences:
        raise UserError(f"domain {key!r}: no user has 2 or more training items, nothing to train on")
    torch.manual_seed(cfg.seed)  # dropout; weights use their own seeded generators
    model = SASRec(len(catalogue), cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))  # SASRec's betas
    stopper, start = EarlyStopping(cfg.patience), 0
    if resume:
        progress = read_json(run / "checkpoint" / "progress.json")
        if progress["done"]:
            raise UserError(f"{run}: the run already finished (early stopping or --epochs); nothing to resume")
        load_weights(model, run / "checkpoint")
        state = torch.load(run / "checkpoint" / "state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        stopper, start = EarlyStopping(**progress["early_stopping"]), progress["epoch"]
        # An epoch logged after the checkpoint was taken is trained again: its log line must not appear twice.
        kept = [r for r in read_records(run / "metrics.jsonl") if r["epoch"] <= start]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    say(f"SASRec baseline on {key}: {len(sequences):,} training sequences, {len(catalogue):,} items, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; at most {cfg.epochs} epochs, patience "
        f"{cfg.patience}")
    with StopRequest() as stop, open(run / "metrics.jsonl", "a") as log:
        for epoch in range(start + 1, cfg.epochs + 1):
            began, cpu = time.perf_counter(), time.process_time()  # CPU time: comparable on a busy shared machine
            loss, targets = train_epoch(model, optimizer, sequences, cfg, epoch, device)
            trained = time.perf_counter() - began
            with autocast(cfg.precision, device):
                valid = evaluate(model, ds, key, cfg, "valid", cfg.val_users)
            if stopper.update(epoch, valid["model"]["ndcg@10"]):
                with atomic_dir(run / "best") as tmp:
                    write_weights(model, tmp)
                    write_json(tmp / "best.json", {"epoch": epoch, "ndcg@10": stopper.best})
            record = {"epoch": epoch, "loss": round(loss, 5), "targets": targets, "seconds": round(trained, 3),
                      "sequences_per_s": round(len(sequences) / trained, 1),
                      "targets_per_s": round(targets / trained), "validation": valid["model"],
                      "validation_seconds": round(valid["seconds"], 3),
                      "cpu_seconds": round(time.process_time() - cpu, 3)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            done = stopper.stop or epoch == cfg.epochs
            save_state(run, model, optimizer, epoch, stopper, done)
            say(f"epoch {epoch}: loss {loss:.4f}, validation NDCG@10 {valid['model']['ndcg@10']:.4f} (best "
                f"{stopper.best:.4f} at epoch {stopper.best_epoch}), {len(sequences) / trained:,.0f} sequences/s")
            if done:
                break
            if stop.requested:
                raise Interrupted(f"interrupted after epoch {epoch}; checkpoint saved in {run}; continue with the "
                                  "same command plus --resume")
    records = read_records(run / "metrics.jsonl")
    load_weights(model, run / "best")
    with autocast(cfg.precision, device):
        result = evaluate(model, ds, key, cfg, "test")
    summary = {"epochs": records[-1]["epoch"], "best_epoch": stopper.best_epoch, "best_valid_ndcg@10": stopper.best,
               "early_stopped": stopper.stop, "train_sequences": len(sequences),
               "parameters": sum(p.numel() for p in model.parameters()),
               "seconds": sum(r["seconds"] + r["validation_seconds"] for r in records),
               "train_seconds": sum(r["seconds"] for r in records),
               "cpu_seconds": sum(r["cpu_seconds"] for r in records),
               "sequences_per_s": len(sequences) * len(records) / sum(r["seconds"] for r in records)}
    return summary, result
