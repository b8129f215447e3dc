"""The SASRec-style ID baseline: exact full ranking against brute force, learning a deterministic next-item rule,
early stopping on the best validation epoch, exact resume, and per-user ranks that reproduce's bootstrap reads."""
import json
import math
import os
import re
import signal

import numpy as np
import pytest
import torch

from data import load_dataset
from eval import ndcg_gains, rank_in_scores
from extras.baseline import BaselineConfig, SASRec, Sequences, evaluate, train_baseline
from extras.reproduce import difference
from helpers import cli, ok, read_records, refused
from infra.datasets import Domain, write_dataset
from infra.files import UserError
from infra.runs import Interrupted

TINY = dict(max_len=12, dim=32, layers=1, heads=2, ffn=32, dropout=0.0, lr=1e-2, batch=16)


def sequences_dataset(path, sequences, n_items):
    """One domain "seq" of items i00..; user k interacts with sequences[k] in that order."""
    items = {f"i{i:02d}": ("seq", f"Item {i}") for i in range(n_items)}
    interactions = [(f"u{k:03d}", f"i{i:02d}", t) for k, s in enumerate(sequences) for t, i in enumerate(s)]
    write_dataset(path, source="test", domains=[Domain("seq", "Sequences", "downstream")], items=items,
                  interactions=interactions)
    return load_dataset(path)


@pytest.fixture
def random_ds(tmp_path):
    rng = np.random.default_rng(0)
    return sequences_dataset(tmp_path / "random", [rng.integers(0, 30, rng.integers(3, 16)) for _ in range(40)], 30)


@pytest.mark.parametrize("mask_history", [False, True])
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_ranking_equals_brute_force_scoring_of_every_item(random_ds, positions, mask_history):
    cfg = BaselineConfig(**{**TINY, "max_len": 6}, positions=positions, mask_history=mask_history)
    model = SASRec(30, cfg)
    with torch.no_grad():
        model.decoder.embed_tokens.weight.mul_(20)  # spread scores so no float noise decides an order
        model.decoder.embed_tokens.weight[7] = model.decoder.embed_tokens.weight[3]  # an exact tie: pessimistic
    result = evaluate(model, random_ds, "seq", cfg, "test")
    assert result["users"] == 40 and result["exact"] and len(result["per_user"]) == 40
    ranks = []
    for row in result["per_user"]:
        u = random_ds.user_ids.index(row["user"])
        items = random_ds.item[random_ds.user_start[u]:random_ds.user_start[u + 1]]
        history, target = items[:-1][-6:], int(items[-1])  # test history: everything before, last max_len items
        with torch.no_grad():
            hidden = model(torch.as_tensor(history, dtype=torch.long)[None])[0, -1]  # one user alone, unpadded
        emb = model.decoder.embed_tokens.weight.detach()
        scores = np.array([float(hidden @ emb[i]) for i in range(30)])
        ranks.append(rank_in_scores(scores, target, history if mask_history else ()))
        assert row["rank"] == ranks[-1] and row["target"] == f"i{target:02d}"
        twin = {3: 7, 7: 3}.get(target)
        if twin is not None and not (mask_history and twin in history):
            assert row["rank"] >= 1  # its twin, scored equally, counts against it
    assert sum(r < 10 for r in ranks) / 40 == result["model"]["recall@10"]


def test_rope_forward_is_the_decoders_forward(random_ds):
    model = SASRec(30, BaselineConfig(**TINY, positions="rope")).eval()
    ids = torch.tensor([[4, 9, 9, 1, 0, 29]])
    torch.testing.assert_close(model(ids), model.decoder(ids, hidden=True))


def test_learns_a_deterministic_next_item_rule(tmp_path):
    rng = np.random.default_rng(1)
    sequences = [(rng.integers(0, 20) + np.arange(8)) % 20 for _ in range(80)]  # item i is always followed by i+1
    ds = sequences_dataset(tmp_path / "rule", sequences, 20)
    (tmp_path / "run").mkdir()
    cfg = BaselineConfig(**TINY, epochs=40, patience=3)
    summary, result = train_baseline(ds, "seq", cfg, tmp_path / "run")
    assert result["model"]["ndcg@10"] >= 0.9 and result["popularity"]["ndcg@10"] < 0.6
    logged = [r for r in read_records(tmp_path / "run") if "validation" in r]  # one validation per epoch
    scores = [r["validation"]["ndcg@10"] for r in logged]
    assert len(logged) == summary["epochs"] and summary["best_epoch"] == 1 + int(np.argmax(scores))
    assert summary["epochs"] == (summary["best_epoch"] + 3 if summary["early_stopped"] else 40)
    assert json.loads((tmp_path / "run" / "best.json").read_text())["ndcg@10"] == max(scores)


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    ds = sequences_dataset(tmp_path / "d", [rng.integers(0, 25, rng.integers(3, 12)) for _ in range(50)], 25)
    cfg = BaselineConfig(**{**TINY, "dropout": 0.3}, epochs=4, patience=10)  # dropout: the RNG must resume too
    for name in ("full", "cut"):
        (tmp_path / name).mkdir()
    full = train_baseline(ds, "seq", cfg, tmp_path / "full")
    collate, calls = Sequences.collate, []

    def ctrl_c_in_epoch_3(self, batch):  # 41 users with a target, in batches of 16: 3 steps an epoch
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return collate(self, batch)

    monkeypatch.setattr(Sequences, "collate", ctrl_c_in_epoch_3)
    with pytest.raises(Interrupted, match="interrupted at step 8/12"):
        train_baseline(ds, "seq", cfg, tmp_path / "cut")
    monkeypatch.setattr(Sequences, "collate", collate)
    resumed = train_baseline(ds, "seq", cfg, tmp_path / "cut", resume=True)
    assert resumed[1]["per_user"] == full[1]["per_user"] and resumed[1]["model"] == full[1]["model"]
    timing = ("seconds", "tokens_per_s", "mfu", "mem_gb")
    strip = lambda run: [{k: v for k, v in r.items() if k not in timing} for r in read_records(run)]  # noqa: E731
    assert strip(tmp_path / "cut") == strip(tmp_path / "full")


def test_command_writes_results_that_reproduce_compares(world, tmp_path):
    run = tmp_path / "baseline"
    result = ok(cli("baseline", "--domain", "games", "--data", world, "--out", run, "--epochs", 2, "--dim", 16,
                      "--max-len", 20))
    assert "popularity" in result and "SASRec-style item-ID model" in result
    results = json.loads((run / "results.json").read_text())
    fingerprint = json.loads((world / "manifest.json").read_text())["fingerprint"]
    assert results["config"]["data_fingerprint"] == fingerprint == json.loads(
        (run / "run_config.json").read_text())["data_fingerprint"]
    assert results["config"]["baseline"]["dim"] == 16 and results["training"]["epochs"] == 2
    assert sum("validation" in r for r in read_records(run)) == 2
    rows = [json.loads(line) for line in (run / "results-per_user.jsonl").read_text().splitlines()]
    assert len(rows) == results["users"] and results["model"]["ndcg@10"] == pytest.approx(
        ndcg_gains(np.array([r["rank"] for r in rows], float), 10).mean())
    (tmp_path / "sft-cpt").mkdir()  # an LLM run that ranks every target first
    (tmp_path / "sft-cpt" / "results-per_user.jsonl").write_text(
        "".join(json.dumps({"user": r["user"], "rank": 0}) + "\n" for r in rows))
    delta = difference([tmp_path], "sft-cpt", "baseline")["ndcg@10"]
    assert delta == pytest.approx(1 - results["model"]["ndcg@10"])
    refused(cli("baseline", "--domain", "games", "--data", world, "--out", run, "--epochs", 2),
                   "already holds a run")
    refused(cli("baseline", "--domain", "games", "--data", world, "--out", run, "--epochs", 2, "--dim", 16,
                         "--max-len", 20, "--resume"), "already finished")


@pytest.mark.parametrize("option, fragment", [
    ({"positions": "sinusoidal"}, "--positions 'sinusoidal': expected learned or rope"),
    ({"heads": 3}, "--dim 64 must split into --heads 3"),
    ({"dim": 6, "heads": 2, "positions": "rope"}, "(of even size for RoPE)"),
    ({"dropout": 1.0}, "--dropout 1.0: expected a value in [0, 1)"),
    ({"patience": 0}, "--patience 0: expected a positive integer"),
    ({"lr": 0.0}, "--lr 0.0: expected a positive learning rate"),
])
def test_bad_options_are_refused(option, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        BaselineConfig(**option).check()


def test_bad_option_gets_one_line_before_a_run_exists(world, tmp_path):
    refused(cli("baseline", "--domain", "games", "--data", world, "--out", tmp_path / "out", "--heads", 3),
                   "--dim 64 must split into --heads 3")
    assert not (tmp_path / "out").exists()


def test_metrics_are_finite_on_a_domain_with_one_eval_user(tmp_path):
    ds = sequences_dataset(tmp_path / "one", [[0, 1, 2, 3], [4, 5]], 6)  # only u000 has 3+ items
    (tmp_path / "run").mkdir()
    summary, result = train_baseline(ds, "seq", BaselineConfig(**TINY, epochs=1), tmp_path / "run")
    assert result["users"] == 1 and math.isfinite(result["model"]["mrr"]) and summary["train_sequences"] == 2


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt"])
def test_resume_falls_back_from_a_corrupt_checkpoint_to_the_previous_one(tmp_path, monkeypatch, damaged):
    """Before: a multi-line traceback naming no file. The baseline's checkpoints are the training loop's."""
    rng = np.random.default_rng(2)
    ds = sequences_dataset(tmp_path / "d", [rng.integers(0, 25, rng.integers(3, 12)) for _ in range(50)], 25)
    cfg = BaselineConfig(**{**TINY, "dropout": 0.3}, epochs=4, patience=10)
    for name in ("full", "cut"):
        (tmp_path / name).mkdir()
    full = train_baseline(ds, "seq", cfg, tmp_path / "full")
    collate, calls = Sequences.collate, []

    def ctrl_c_in_epoch_4(self, batch):
        calls.append(1)
        if len(calls) == 11:
            os.kill(os.getpid(), signal.SIGINT)
        return collate(self, batch)

    monkeypatch.setattr(Sequences, "collate", ctrl_c_in_epoch_4)
    with pytest.raises(Interrupted):
        train_baseline(ds, "seq", cfg, tmp_path / "cut")
    monkeypatch.setattr(Sequences, "collate", collate)
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000009", "step-0000011"]
    file = checkpoints / "step-0000011" / damaged
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
    resumed = train_baseline(ds, "seq", cfg, tmp_path / "cut", resume=True)
    assert (checkpoints / "corrupt-step-0000011").exists() and resumed[1]["per_user"] == full[1]["per_user"]
