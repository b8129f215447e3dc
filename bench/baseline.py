"""The baseline section: our SASRec (`cprec.py baseline`) beside RecBole 1.2.1's SASRec on the same split, one run.

RecBole is the external reference a reviewer would run; it is a benchmark-only extra, never a runtime dependency:
    pip install --no-deps recbole==1.2.1 && pip install pandas scipy colorlog texttable psutil tensorboard
The shims its numpy-1 era code needs on numpy 2 stay in this file. Each domain is exported to RecBole's atomic files
(a user's items in our time order, timestamps = their positions, so ties keep file order; every catalogue item in
the .item file), split by RecBole itself (leave-one-out, 'LS': valid_and_test) and checked against ours user by user
before anything is trained. Both train with the same epoch budget and early stopping (patience counted in
validations of NDCG@10); RecBole keeps its own SASRec settings (2 heads, inner size 256, dropout 0.5, batch 2,048,
every prefix a sample) except the history length, which is ours. Both models' test scores are then ranked by our
evaluation code on the same users, with the history masked (the published SASRec protocol) and not (ours and
RecBole's: it masks nothing for sequential models); RecBole's own evaluator's NDCG@10 is reported beside, a check
that the two rankings agree.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from safetensors.torch import load_file

from bench.harness import Options, console
from data import TEST, TRAIN, VALID, eval_cases, load_dataset, train_sequences
from eval import KS, metrics, rank_in_scores
from extras.baseline import BaselineConfig, SASRec, catalogue_positions, catalogue_scores, train_baseline
from infra.files import UserError

INSTALL = ("pip install --no-deps recbole==1.2.1 && pip install pandas scipy colorlog texttable psutil tensorboard")
PROTOCOLS = {"masked": True, "unmasked": False}


def recbole():
    """RecBole's modules, imported with the shims for what numpy 2 removed (np.float_ and friends) and a stand-in for
    ray (imported by RecBole's hyper-parameter tuning, which this section does not use)."""
    for alias, real in {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_, "float": float,
                        "int": int, "object": object, "str": str}.items():
        np.__dict__.setdefault(alias, real)
    sys.modules.setdefault("ray", types.ModuleType("ray"))
    try:
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.data.interaction import Interaction
        from recbole.model.sequential_recommender import SASRec as RecBoleSASRec
        from recbole.trainer import Trainer
    except ImportError as e:
        raise UserError(f"the baseline section needs RecBole ({e}); install it with: {INSTALL}") from None

    class Timed(Trainer):
        """RecBole's trainer, timing each epoch and validation; its best model kept in memory (RecBole's own
        checkpoint file would need torch.load without weights_only)."""

        def __init__(self, config, model):
            super().__init__(config, model)
            self.train_seconds, self.valid_seconds, self.scores, self.best_state, self.best_epoch = [], [], [], None, -1

        def _train_epoch(self, *args, **kwargs):
            began = time.perf_counter()
            out = super()._train_epoch(*args, **kwargs)
            self.train_seconds.append(time.perf_counter() - began)
            return out

        def _valid_epoch(self, *args, **kwargs):
            began = time.perf_counter()
            score, result = super()._valid_epoch(*args, **kwargs)
            self.valid_seconds.append(time.perf_counter() - began)
            self.scores.append(score)
            console.print(f"RecBole epoch {len(self.scores)}: {self.train_seconds[-1]:.0f} s, validation NDCG@10 "
                          f"{score:.4f}", highlight=False)  # its own logging is off: a long run shows it is alive
            return score, result

        def _save_checkpoint(self, epoch, *args, **kwargs):
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best_epoch = epoch

    return types.SimpleNamespace(Config=Config, create_dataset=create_dataset, data_preparation=data_preparation,
                                 Interaction=Interaction, SASRec=RecBoleSASRec, Trainer=Timed)


def export(ds, key: str, folder: Path) -> Path:
    """The domain as RecBole atomic files named after `folder` (RecBole's dataset name): items are catalogue
    positions, users dataset indices."""
    position = catalogue_positions(ds, ds.catalogue(key))
    d = ds.domain_index(key)
    rows = np.flatnonzero(ds.item_domain[ds.item] == d)  # interactions are grouped by user in time order
    users, items = ds.user[rows], position[ds.item[rows]]
    first = np.r_[True, users[1:] != users[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(users)), 0))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{folder.name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        f.writelines(f"{u}\t{i}\t{t}\n" for u, i, t in zip(users, items, np.arange(len(users)) - start))
    with open(folder / f"{folder.name}.item", "w") as f:
        f.write("item_id:token\n")
        f.writelines(f"{i}\n" for i in range(len(ds.catalogue(key))))
    return folder.parent


def our_splits(ds, key: str) -> dict[int, tuple]:
    """Each evaluated user's split: (train items in order, validation item, test item), catalogue positions."""
    position = catalogue_positions(ds, ds.catalogue(key))
    d = ds.domain_index(key)
    out = {}
    for u in range(len(ds.user_ids)):
        span = np.arange(ds.user_start[u], ds.user_start[u + 1])
        span = span[ds.item_domain[ds.item[span]] == d]
        split, items = ds.split[span], position[ds.item[span]]
        if (split == TEST).any():
            out[u] = (tuple(items[split == TRAIN]), int(items[split == VALID][0]), int(items[split == TEST][0]))
    return out


def recbole_splits(datasets, rb_dataset) -> dict[int, tuple]:
    """The same from RecBole's three splits (rows: a prefix of at most MAX_ITEM_LIST_LENGTH items -> target); the
    validation item is None where RecBole made none."""
    token = lambda field, ids: rb_dataset.id2token(field, ids).astype(int)  # noqa: E731
    seen: dict[int, dict] = {}
    for name, split in zip(("train", "valid", "test"), datasets):
        feat = split.inter_feat
        for u, t, n, f in zip(token("user_id", feat["user_id"].numpy()), token("item_id", feat["item_id"].numpy()),
                              feat["item_length"].numpy(), token("item_id", feat["item_id_list"][:, 0].numpy())):
            s = seen.setdefault(int(u), {"train": []})
            if name == "train":
                s["train"].append((n, f, int(t)))
            else:
                s[name] = int(t)
    out = {}
    for u, s in seen.items():
        if "test" in s:
            rows = sorted(s["train"], key=lambda r: r[0])  # by prefix length, stable: ties at the window in time order
            out[u] = (tuple([int(rows[0][1])] + [t for _, _, t in rows]) if rows else (), s.get("valid"), s["test"])
    return out


def check_splits(ours: dict, theirs: dict, key: str) -> str:
    """Both pipelines must test every user on the same item after the same history; RecBole makes no validation
    item for users of 3 items (it leaves 2 out of their 2 prefixes' targets only when there are 3), so it trains on
    the one we validate on: counted, and said."""
    same, trained = 0, 0
    for u, (train, valid, test) in ours.items():
        if u not in theirs:
            raise UserError(f"{key}: RecBole does not test user {u}; the pipelines are not comparable")
        t_train, t_valid, t_test = theirs[u]
        if (t_test, t_train + ((t_valid,) if t_valid is not None else ())) != (test, train + (valid,)):
            raise UserError(f"{key}: user {u}'s history or test item differs between the pipelines")
        same += t_valid == valid
        trained += t_valid is None
    return (f"split check: {len(ours):,} test users, the same history and test item in both pipelines; the same "
            f"validation item for {same:,}" + (f", for {trained:,} (3 items) RecBole trains on our validation item"
                                                if trained else ""))


def ranked(scores: np.ndarray, cases, position: np.ndarray) -> dict:
    """Our metrics at KS and 50 of each test user's score row, history masked and not."""
    targets = [int(position[c.target]) for c in cases]
    out = {}
    for protocol, mask in PROTOCOLS.items():
        ranks = [rank_in_scores(s, t, position[c.history] if mask else []) for s, t, c in zip(scores, targets, cases)]
        out[protocol] = metrics(ranks, (*KS, 50))
    return out


def run_recbole(ds, key: str, cfg: BaselineConfig, work: Path, device: str = "cpu") -> dict:
    """RecBole's SASRec on the domain, our history window cut to the longest test history (which changes nothing
    but RecBole's cost: it pads every prefix to its window)."""
    rb = recbole()
    longest = max(len(s) for s in train_sequences(ds, key)) + 1
    window = min(cfg.max_len, longest)
    name = f"cprec-{key}"  # never a name RecBole knows: for "ml-100k" it reads the copy in its wheel instead
    root = export(ds, key, work / "recbole" / name)
    settings = {
        "data_path": str(root), "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG"], "topk": [10, 50], "valid_metric": "NDCG@10", "train_neg_sample_args": None,
        "loss_type": "CE", "MAX_ITEM_LIST_LENGTH": window, "epochs": cfg.epochs, "stopping_step": cfg.patience,
        "eval_step": 1, "seed": cfg.seed, "reproducibility": True,
        "gpu_id": "0" if device.startswith("cuda") else "",  # RecBole picks its device from gpu_id
        "show_progress": False, "checkpoint_dir": str(work / "recbole-saved"), "worker": 0, "state": "ERROR"}
    # RecBole's trainer writes log_tensorboard/ into the working directory and its Config reads sys.argv; pandas 3
    # warns about each of its in-place fills (of columns that have no missing values here).
    with contextlib.chdir(work), mock.patch.object(sys, "argv", sys.argv[:1]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = rb.Config(model="SASRec", dataset=name, config_dict=settings)
        dataset = rb.create_dataset(config)
        train_data, valid_data, test_data = rb.data_preparation(config, dataset)
        ours = our_splits(ds, key)
        theirs = recbole_splits((train_data.dataset, valid_data.dataset, test_data.dataset), dataset)
        split_note = check_splits(ours, theirs, key)
        if extra := len(theirs) - len(ours):
            split_note += f"; RecBole also tests {extra:,} users of 2 items, on whom we train"
        console.print(f"baseline {key}: {split_note}")
        model = rb.SASRec(config, train_data.dataset).to(config["device"])
        trainer = rb.Trainer(config, model)
        began = time.perf_counter()
        trainer.fit(train_data, valid_data, verbose=False, saved=True, show_progress=False)
        wall = time.perf_counter() - began
        model.load_state_dict(trainer.best_state)
        own = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    # Our ranking of RecBole's scores, on our test cases: its internal ids -> our catalogue positions.
    position = catalogue_positions(ds, ds.catalogue(key))
    cases = eval_cases(ds, key, TEST, cfg.max_len)
    column = dataset.token2id("item_id", [str(i) for i in range(len(ds.catalogue(key)))])
    model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(cases), 256):
            some = cases[start:start + 256]
            seq = torch.zeros(len(some), window, dtype=torch.long)
            for r, c in enumerate(some):
                ids = dataset.token2id("item_id", [str(i) for i in position[c.history[-window:]]])
                seq[r, :len(ids)] = torch.as_tensor(ids)
            inter = rb.Interaction({"item_id_list": seq, "item_length": torch.tensor(
                [min(len(c.history), window) for c in some])})
            scores = model.full_sort_predict(inter.to(config["device"])).view(len(some), -1)
            rows.append(scores[:, column].float().cpu().numpy())
    best = trainer.best_epoch  # 0-based
    return {"impl": "RecBole 1.2.1 SASRec", "window": window, "split_check": split_note,
            "epochs": len(trainer.train_seconds), "best_epoch": best + 1,
            "epoch_s": float(np.median(trainer.train_seconds)), "valid_s": float(np.median(trainer.valid_seconds)),
            "to_best_s": sum(trainer.train_seconds[:best + 1]) + sum(trainer.valid_seconds[:best + 1]),
            "wall_s": wall, "own": {k: float(v) for k, v in own.items()},
            **ranked(np.concatenate(rows), cases, position)}


def run_ours(ds, key: str, cfg: BaselineConfig, work: Path, label: str, device: str = "cpu") -> dict:
    run = work / f"ours-{label}-{key}"
    run.mkdir()
    began = time.perf_counter()
    summary, _ = train_baseline(ds, key, cfg, run, device)
    wall = time.perf_counter() - began
    model = SASRec(len(ds.catalogue(key)), cfg)
    model.load_weights(load_file(run / "best" / "model.safetensors"))
    cases = eval_cases(ds, key, TEST, cfg.max_len)
    position = catalogue_positions(ds, ds.catalogue(key))
    scores = catalogue_scores(model, [position[c.history] for c in cases]).numpy()
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r["seconds"] for r in records if "tokens" in r]
    per_epoch = summary["last_step"] // summary["epochs"] if summary["epochs"] else 1
    return {"impl": f"ours ({label})", "epochs": summary["epochs"], "best_epoch": summary["best_epoch"],
            "epoch_s": float(np.median([sum(steps[i:i + per_epoch]) for i in range(0, len(steps), per_epoch)])),
            "valid_s": float(np.median([r["seconds"] for r in records if "validation" in r])),
            "to_best_s": summary["seconds_to_best"], "wall_s": wall, **ranked(scores, cases, position)}


def bench_baseline(o: Options) -> list[dict]:
    """For each domain of o.baseline_domains (of o.baseline_data): RecBole, our defaults and, with --baseline-before,
    the defaults before this section existed (batch 128)."""
    if o.baseline_recbole:
        recbole()  # missing: said before anything is trained
    ds = load_dataset(o.baseline_data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cprec-bench-baseline-") as tmp:
        work = Path(tmp)
        for key in o.baseline_domains:
            ds.domain(key)
            cfg = BaselineConfig(epochs=o.baseline_epochs, seed=o.seed, **(
                {"max_len": o.baseline_window} if o.baseline_window else {}))
            if o.quick:
                cfg = replace(cfg, epochs=2, patience=2)
            arms = {"defaults": cfg, **({"before": replace(cfg, batch=128)}
                                         if o.baseline_before else {})}
            for label, arm in arms.items():
                rows.append({"section": "baseline", "domain": key, "config": asdict(arm), "window": arm.max_len,
                             **run_ours(ds, key, arm, work, label, o.device)})
            if o.baseline_recbole:
                theirs = replace(cfg, epochs=o.baseline_recbole_epochs or cfg.epochs)
                rows.append({"section": "baseline", "domain": key, **run_recbole(ds, key, theirs, work, o.device)})
    for row in rows:
        for protocol in PROTOCOLS:
            for k in ("ndcg@10", "recall@10", "recall@50"):
                row[f"{protocol} {k}"] = row[protocol][k]
        row["own ndcg@10"] = row.get("own", {}).get("ndcg@10")
    return rows
