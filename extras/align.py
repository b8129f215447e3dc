"""`cprec align`: preference post-training after SFT, the step CPRec's authors announce as their future work.

Softmax DPO (S-DPO, Chen et al., NeurIPS 2024): for each training user of the domain, the next training item is the
chosen one and k items are rejected; the policy's and the reference's log-likelihoods of each item's text after the
user's prompt (the evaluation's scoring rule) give r = log pi(y|x) - log pi_ref(y|x), and the loss is
    -log sigmoid( -log sum_j exp( beta (r_rejected_j - r_chosen) ) ),
which with k = 1 is DPO's -log sigmoid(beta (r_chosen - r_rejected)). Rejected items are by default the starting
model's own highest-ranked wrong items from the trie beam search (hard negatives, RosePO's "rejected sampling"),
never the chosen item nor (unless --history-negatives) the user's history; --negatives random draws them from the
catalogue. The reference is the starting checkpoint: its log-likelihoods are computed once, before the first step,
and kept in the run folder (reference.npz), so training holds one model. Training is train.train (exact accumulation
over preference cases, resume, atomic checkpoints, best by validation NDCG@10), then the test evaluation with 50
beams reports, beside NDCG@10, what post-training may cost: Recall@50, catalogue coverage and popularity of the
top-10, and the held-out items' mean log-likelihood before and after.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import eval as evaluation
from data import (
    IGNORE,
    TEST,
    VALID,
    Dataset,
    Encoder,
    eval_cases,
    item_text,
    length_buckets,
    limited_users,
    pad,
    sample,
    train_sequences,
)
from extras.init import not_a_checkpoint, written_by_init
from extras.options import (
    CONFIG,
    SAVE_EVERY,
    LoRA,
    check,
    lora_lr_factor,
    multiple,
    option,
    recipe,
    run_config,
    run_settings,
    train_config,
)
from extras.world import open_dataset
from infra.cache import load_checked, save_checked
from infra.cli import OVERWRITE, PRECISION, PROGRESS, RESUME, TRACKER, positive, show
from infra.config import DEFAULT_DATA, INIT_MARKER
from infra.console import say, warn
from infra.device import DTYPES, autocast, resolve_precision
from infra.distributed import agreed, setup_distributed
from infra.files import UserError, quote, read_json
from infra.runs import open_run, save_result
from infra.tokenizer import Tokenizer
from model import Decoder
from schedule import Schedule
from train import train

NEGATIVES = ("hard", "random")


@dataclass
class AlignConfig:
    beta: float = option(1.0, "DPO's KL weight beta (S-DPO: 1).")
    k: int = option(3, "Rejected items per case (S-DPO: 3).", "--k", "-k")
    negatives: str = option("hard", "hard (the model's own top wrong items, by beam search) or random (uniform over "
                            "the catalogue).")
    history_negatives: bool = option(False, "Let rejected items be from the user's history.")
    window: int = option(20, "History items in a prompt.")  # as in SFT and evaluation

    def check(self, catalogue: int) -> None:
        if not self.beta > 0:
            raise UserError(f"--beta {self.beta}: expected a value > 0 (the KL weight of DPO)")
        if not 1 <= self.k < catalogue:
            raise UserError(f"--k {self.k}: expected 1 to {catalogue - 1} rejected items (the catalogue has "
                            f"{catalogue})")
        if self.negatives not in NEGATIVES:
            raise UserError(f"--negatives {quote(self.negatives)}: expected {' or '.join(NEGATIVES)}")
        if self.window < 1:
            raise UserError(f"--window {self.window}: expected a positive number of history items")


# --------------------------------------------------------------------------------------------------- the loss
def item_logps(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its supervised tokens (an item's text after the prompt), (rows,)."""
    supervised = targets != IGNORE
    hidden = model(inputs, hidden=True, select=supervised)
    logp = torch.log_softmax((hidden @ model.lm_head.weight.t()).float(), -1)
    token = logp.gather(1, targets[supervised][:, None])[:, 0]
    row = torch.arange(len(targets), device=targets.device)[:, None].expand_as(targets)[supervised]
    return torch.zeros(len(targets), device=token.device).index_add(0, row, token)


# run_config.json's entries that reference.npz is made from (with --seed): the start model, the data, the cases
REFERENCE_INPUTS = ("domain", "data_fingerprint", "model", "tokenizer_fingerprint", "align", "cases", "users",
                    "users_fraction")


def sdpo(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """Each case's S-DPO loss from the policy's and the reference's log-likelihoods, (cases, 1 + k), chosen first."""
    reward = policy - reference
    return -F.logsigmoid(-torch.logsumexp(beta * (reward[:, 1:] - reward[:, :1]), dim=1))


def dpo_loss(model, inputs: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor, *,
             beta: float) -> torch.Tensor:
    """Summed S-DPO loss of a micro-batch of cases (train.train's `loss`); rows come chosen first, then the k
    rejected, case by case."""
    return sdpo(item_logps(model, inputs, targets).view(reference.shape), reference, beta).sum()


# --------------------------------------------------------------------------------------------------- the cases
@dataclass
class Cases:
    """One preference case per training user: the prompt of its history, the chosen item and k rejected ones
    (catalogue positions)."""
    prompts: list[list[int]]
    items: np.ndarray  # (cases, 1 + k): the chosen first


def preference_cases(model: Decoder, encoder: Encoder, ds: Dataset, key: str, cfg: AlignConfig, seed: int,
                     users: int = 0, fraction: float = 1.0) -> Cases:
    """The chosen item is each training user's last training item, its prompt the items before it; the users are
    SFT's `fraction` of them (the same users for the same seed), then a seeded `users` of those."""
    catalogue = ds.catalogue(key)
    position = {int(item): p for p, item in enumerate(catalogue)}
    sft_users = limited_users(train_sequences(ds, key), fraction, seed)
    sequences = sample([s for s in sft_users if len(s) >= 2], users, seed)
    if not sequences:
        raise UserError(f"domain {quote(key)}: no user has 2 or more training items, nothing to prefer")
    histories = [s[:-1][-cfg.window:] for s in sequences]
    chosen = [position[int(s[-1])] for s in sequences]
    banned = [[c] + ([] if cfg.history_negatives else [position[int(i)] for i in s[:-1]])
              for s, c in zip(sequences, chosen)]
    if short := [k for k, b in enumerate(banned) if len(catalogue) - len(set(b)) < cfg.k]:
        raise UserError(f"--k {cfg.k}: {len(short)} users have fewer allowed rejected items (the catalogue's "
                        f"{len(catalogue)} minus the chosen one and their history); lower --k or pass "
                        "--history-negatives")
    prompts = evaluation.user_prompts(encoder, ds, histories, key)
    if cfg.negatives == "random":
        rng = np.random.default_rng(seed)
        rejected = [rng.choice(np.setdiff1d(np.arange(len(catalogue)), b), cfg.k, replace=False) for b in banned]
    else:
        trie = evaluation.build_trie(evaluation.catalogue_tokens(encoder, ds, key), model.embed_tokens.weight.device)
        beams, rejected = max(20, cfg.k), [None] * len(prompts)
        order = np.argsort([len(p) for p in prompts], kind="stable")
        step = evaluation.auto_batch_users(model, beams, max(map(len, prompts)), trie.depth)
        model.eval()
        for start in range(0, len(order), step):
            rows = order[start:start + step]
            found, _ = evaluation.beam_search(model, [prompts[r] for r in rows], trie, beams,
                                              encoder.tokenizer.pad_id, [banned[r] for r in rows])
            for r, items in zip(rows, found.cpu().numpy()):
                rejected[r] = items[:cfg.k]  # the model's own best wrong items (filled: beam_search searches on)
    items = np.column_stack([chosen, np.stack(rejected)]).astype(np.int64)
    return Cases(prompts, items)


class Preferences:
    """The cases as micro-batches for train.train: each case's 1 + k rows (prompt + item text, the item's tokens
    supervised), and the reference's log-likelihoods of them; a step's targets are its cases."""

    def __init__(self, cases: Cases, item_tokens: list[list[int]], pad_id: int, batch: int, seed: int,
                 reference: np.ndarray | None = None):
        self.cases, self.item_tokens, self.pad_id, self.batch, self.seed = cases, item_tokens, pad_id, batch, seed
        self.reference = reference
        self.lengths = np.array([len(p) for p in cases.prompts])

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """Batches of `batch` cases, bucketed by prompt length (less padding)."""
        return length_buckets(self.lengths, self.seed, epoch, rows=self.batch)

    def n_targets(self, batch: list[int]) -> int:
        return len(batch)

    def n_tokens(self, batch: list[int]) -> int:
        return sum(len(self.cases.prompts[c]) + len(self.item_tokens[i]) - 1 for c in batch
                   for i in self.cases.items[c])

    def rows(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of the batch's rows: targets are the item's tokens, IGNORE elsewhere."""
        ids, targets = [], []
        for c in batch:
            prompt = self.cases.prompts[c]
            for i in self.cases.items[c]:
                tokens = self.item_tokens[i]
                ids.append(prompt + tokens)
                targets.append([IGNORE] * (len(prompt) - 1) + tokens)
        ids, targets = pad(ids, self.pad_id), pad(targets, IGNORE)
        return ids[:, :-1], targets

    def collate(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        inputs, targets = self.rows(batch)
        return inputs, targets, self.reference[batch].astype(np.float32)


def note_other_users(start: Path, fraction: float, seed: int) -> None:
    """Say so when the finetune run of `start` (its run_config.json) drew its users with another fraction or seed:
    post-training on more users than SFT saw measures more data, not the objective (docs/results.md)."""
    path = start.parent / "run_config.json"
    try:
        sft = read_json(path) if path.is_file() else {}
    except UserError:
        return  # only a note: a run folder we cannot read says nothing about its users
    drawn = (sft.get("users_fraction"), (sft.get("train") or {}).get("seed"))
    if sft.get("command") == "finetune" and drawn != (fraction, seed):
        say(f"note: {start} was fine-tuned with --users-fraction {drawn[0]} --seed {drawn[1]}; pass the same to "
            "post-train on its users")


@torch.no_grad()
def reference_logps(model: Decoder, data: Preferences, precision: str) -> np.ndarray:
    """The starting model's log-likelihood of every case's items, (cases, 1 + k), computed once."""
    device = model.embed_tokens.weight.device
    out = np.zeros(data.cases.items.shape, np.float64)
    model.eval()
    order = list(range(len(data.lengths)))
    with autocast(precision, device):
        for start in range(0, len(order), data.batch):
            batch = order[start:start + data.batch]
            inputs, targets = (torch.as_tensor(a, device=device) for a in data.rows(batch))
            out[batch] = item_logps(model, inputs, targets).view(len(batch), -1).double().cpu().numpy()
    return out


@torch.no_grad()
def held_out_loglik(model: Decoder, encoder: Encoder, ds: Dataset, key: str, users: int, seed: int,
                    window: int) -> float:
    """The mean log-likelihood of the test users' held-out items (title and terminator) after their history."""
    cases = sample(eval_cases(ds, key, TEST, window), users, seed)
    device = model.embed_tokens.weight.device
    prompts = evaluation.user_prompts(encoder, ds, [c.history for c in cases], key)
    items = [encoder(item_text(ds.titles[c.target])) for c in cases]
    total = 0.0
    for start in range(0, len(cases), 64):
        rows = range(start, min(start + 64, len(cases)))
        ids = pad([prompts[r] + items[r] for r in rows], encoder.tokenizer.pad_id)
        targets = pad([[IGNORE] * (len(prompts[r]) - 1) + items[r] for r in rows], IGNORE)
        total += float(item_logps(model, torch.as_tensor(ids[:, :-1], device=device),
                                  torch.as_tensor(targets, device=device)).sum())
    return total / len(cases)


# --------------------------------------------------------------------------------------------------- the command
@dataclass
class Align:
    config: Optional[Path] = option(CONFIG)
    domain: str = option(..., "Domain of the fine-tuned model.")
    data: Path = option(DEFAULT_DATA, "Dataset.")
    model: Optional[Path] = option(None, "The SFT checkpoint to post-train (default: runs/finetune-DOMAIN/best); it "
                                   "is also the reference.")
    out: Optional[Path] = option(None, "Run directory (default: runs/align-DOMAIN).")
    align: AlignConfig = field(default_factory=AlignConfig)
    epochs: float = option(1.0, "Passes over the training users' cases.")
    lr: Optional[float] = option(None, "Peak learning rate (default: 3e-5 for a model `init` made, chosen on "
                                 "validation; 1e-5 for a pretrained LLM, S-DPO's).")
    batch_cases: int = option(32, "Preference cases per optimizer step.")
    micro_cases: int = option(8, "Cases per micro-batch and process.")
    users_fraction: float = option(1.0, "Fraction of training users, drawn as finetune draws it: give the SFT run's "
                                   "to post-train on its users.")
    users: int = option(0, "Training users, a seeded subset of those (0 = all).")
    val_users: int = option(500, "Validation users (0 = all).")
    test_users: int = option(0, "Test users, a seeded subset (0 = all).")
    beams: int = option(50, "Beam width of the evaluations (>= 50 for Recall@50).")
    eval_every: int = option(0, "Steps between validations (0 = four over the run).")
    precision: str = option(PRECISION)
    lora: LoRA = field(default_factory=LoRA)
    seed: int = option(0, "Seed for data order, user samples and random negatives.")
    save_every: int = option(0, SAVE_EVERY)
    resume: bool = option(RESUME)
    overwrite: bool = option(OVERWRITE)
    progress: bool = option(PROGRESS)
    tracker: str = option(TRACKER)


@recipe(Align)
def command(o: Align):
    """Preference post-training (softmax DPO) of a fine-tuned model on its domain's training users, validation-
    selected, then the full-ranking test evaluation with the costs post-training may bring."""
    cfg = o.align
    positive(epochs=o.epochs, batch_cases=o.batch_cases, micro_cases=o.micro_cases)
    accum = multiple(o.batch_cases, o.micro_cases, "--batch-cases", "--micro-cases")
    if o.beams < 50:
        raise UserError(f"--beams {o.beams}: expected at least 50 (the test reports Recall@50)")
    rank, world, device = setup_distributed()
    ds = open_dataset(o.data, rank)
    start = o.model or Path(f"runs/finetune-{o.domain}") / "best"
    if not (start / "config.json").exists():
        raise UserError(not_a_checkpoint(start) if o.model else f"{start}: no checkpoint; run `python cprec.py "
                        f"finetune --domain {o.domain}` first or pass --model")
    if written_by_init(start):  # allowed (a smoke test), but rarely meant
        warn(f"{start}: a model `init` made and nothing trained; align post-trains a fine-tuned model (finetune "
             "first)", rank)
    cfg.check(len(ds.catalogue(o.domain)))
    if not eval_cases(ds, o.domain, VALID):
        raise UserError(f"domain {quote(o.domain)} has no validation cases, so no checkpoint could be chosen")
    tokenizer = Tokenizer.from_pretrained(start)
    encoder = Encoder(tokenizer)
    net = o.lora.load(start, resolve_precision(o.precision, device), o.seed, device)
    default_lr = 3e-5 if INIT_MARKER in net.config.extra else 1e-5  # docs/results.md#learning-rate
    lr = o.lr if o.lr is not None else default_lr * lora_lr_factor(o.lora.lora_rank)
    # refuses a bad --users-fraction
    cases = preference_cases(net, encoder, ds, o.domain, cfg, o.seed, o.users, o.users_fraction)
    note_other_users(start, o.users_fraction, o.seed)
    item_tokens = evaluation.catalogue_tokens(encoder, ds, o.domain)
    prefs = Preferences(cases, item_tokens, tokenizer.pad_id, o.micro_cases, o.seed)
    steps = max(1, math.ceil(o.epochs * len(prefs.micro_batches(0)) / accum))
    train_cfg = train_config(o, steps, accum, lr=lr, weight_decay=0.0, eval_every=o.eval_every or max(1, steps // 4),
                             schedule=Schedule("cosine", warmup=0.1, floor=0.1), select="ndcg@10")
    config = run_config(o, {"command": "align", "domain": o.domain, "data": str(o.data),
                            "data_fingerprint": ds.fingerprint, "model": str(start),
                            "tokenizer_fingerprint": tokenizer.fingerprint(), "align": asdict(cfg),
                            "cases": len(cases.prompts), "batch_cases": o.batch_cases, "micro_cases": o.micro_cases,
                            "users_fraction": o.users_fraction, "users": o.users, "val_users": o.val_users,
                            "test_users": o.test_users, "beams": o.beams, "train": run_settings(train_cfg),
                            **o.lora.record(start)})
    check(train_cfg, device, world, "--batch-cases", lora=o.lora)
    run = open_run(o.out or Path(f"runs/align-{o.domain}"), config, o.resume, o.overwrite, rank, [o.data, start],
                   [o.config])
    say(f"S-DPO on {o.domain}: {len(cases.prompts):,} cases of 1 chosen + {cfg.k} {cfg.negatives} rejected items, "
        f"beta {cfg.beta:g}, {steps} steps of {o.batch_cases} cases, lr {lr:g}")
    saved, precision = run / "reference.npz", resolve_precision(train_cfg.precision, device)
    # this run's cases and reference, kept: after a resume the model is no longer the reference, and the negatives
    # drawn again may differ (another GPU batch, near-ties). Rank 0 verifies its checksums; a damaged one is rebuilt.
    made_from = {"seed": o.seed, **{k: config[k] for k in REFERENCE_INPUTS}}
    kept = o.resume and saved.exists()
    stored, problem = load_checked(saved, made_from) if kept and rank == 0 else (None, "")
    if problem:
        warn(f"{saved}: {problem}; computing the reference again from {start}")
    if kept and not agreed(rank == 0 and stored is None, device):
        stored = stored or dict(np.load(saved))
        if "items" in stored:  # (runs begun before the items were kept hold the log-likelihoods only)
            cases.items[:] = stored["items"]  # the same shape: open_run refused other cases or another --k
        prefs.reference = stored["logps"]
    else:
        prefs.reference = reference_logps(net, prefs, precision)
        if rank == 0:
            save_checked(saved, {"logps": prefs.reference, "items": cases.items}, made_from)
    options = dict(beams=o.beams, seed=o.seed, window=cfg.window, progress=o.progress)
    with autocast(precision, device):  # as "after" is measured: the two differ by training, not by precision
        before = held_out_loglik(net, encoder, ds, o.domain, o.test_users, o.seed, cfg.window) if rank == 0 else None
    summary = train(net, prefs, train_cfg, run, loss=functools.partial(dpo_loss, beta=cfg.beta), tokenizer=tokenizer,
                    device=device, rank=rank, world=world, resume=o.resume, base=str(start),
                    validate=lambda m: evaluation.evaluate(m, encoder, ds, o.domain, split="valid", users=o.val_users,
                                                           **options)["model"])
    best = Decoder.from_pretrained(run / "best", DTYPES[precision], device)  # every process tests its share of users
    with autocast(precision, device):
        result = evaluation.evaluate(best, encoder, ds, o.domain, split="test", users=o.test_users, **options)
        after = held_out_loglik(best, encoder, ds, o.domain, o.test_users, o.seed, cfg.window) if rank == 0 else None
    if rank == 0:
        result["held_out_loglik"] = {"before": before, "after": after}
        save_result(result, run / "results.json", {"config": config, "training": summary})
        show(result)
        say(f"held-out items' mean log-likelihood: {before:.3f} before, {after:.3f} after")
