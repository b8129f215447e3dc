"""The commands users type, end to end in this process (tests/helpers.cli): CPT lowers the validation loss, SFT on
its checkpoint beats popularity, evaluate reads the result back; bad input gets one line before any run exists."""
import json

import numpy as np
import pytest

from data import VALID, Encoder, eval_cases, load_dataset, sample
from extras.init import create_model, tokenizer_corpus
from extras.world import WorldConfig, write_world
from helpers import TINY, cli, ok, read_records, refused
from infra.tokenizer import Tokenizer
from model import Decoder
from train import target_loss


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """A world with enough games users (about 300) for the tiny model to learn its sequels in seconds."""
    root = tmp_path_factory.mktemp("learnable")
    write_world(root / "world", WorldConfig(users=600, items_per_domain=0.1))
    create_model(tokenizer_corpus(load_dataset(root / "world")), root / "tiny", TINY, seed=0)
    return root / "world", root / "tiny"


def test_pretrain_lowers_the_loss_and_finetune_beats_popularity(learnable, tmp_path):
    world, tiny = learnable
    ds = load_dataset(world)
    encoder = Encoder(Tokenizer.from_pretrained(tiny))
    base = Decoder.from_pretrained(tiny)
    before = np.mean([target_loss(base, encoder, ds, sample(eval_cases(ds, k, VALID), 5, 0), k)
                      for k, d in ds.domains.items() if d.role == "pretrain"])  # the users pretrain validates on
    ok(cli("pretrain", "--data", world, "--model", tiny, "--out", tmp_path / "cpt", "--tokens", 8192, "--block-len",
           32, "--micro-batch", 4, "--batch-tokens", 256, "--no-progress", "--val-users", 5))
    cpt = tmp_path / "cpt"
    results = json.loads((cpt / "results.json").read_text())
    assert results["config"]["data_fingerprint"] == json.loads((world / "manifest.json").read_text())["fingerprint"]
    after = results["training"]["validation"]["val_loss"]
    assert after < before - 0.5, (before, after)  # 32 steps of 256 tokens: from about log(512) = 6.2 to about 5
    assert (cpt / "final" / "model.safetensors").exists() and (cpt / "final" / "tokenizer.model").exists()
    assert len(read_records(cpt)) == 33  # 32 steps and the final validation

    printed = ok(cli("finetune", "--domain", "games", "--data", world, "--model", cpt / "final", "--out",
                     tmp_path / "sft", "--epochs", 20, "--lr", 5e-3, "--eval-every", 80, "--val-users", 10,
                     "--no-progress"))
    assert "popularity" in printed and "protocol: full ranking over all 100 items" in printed
    results = json.loads((tmp_path / "sft" / "results.json").read_text())
    assert results["model"]["ndcg@10"] > results["popularity"]["ndcg@10"] + 0.05, results
    per_user = (tmp_path / "sft" / "results-per_user.jsonl").read_text().splitlines()
    assert len(per_user) == results["users"] > 250 and (tmp_path / "sft" / "best" / "config.json").exists()

    ok(cli("evaluate", "--domain", "games", "--data", world, "--model", tmp_path / "sft" / "best", "--out",
           tmp_path / "again.json"))
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["model"] == pytest.approx(results["model"]) and again["users"] == results["users"]


def test_prepare_synthetic_refuses_to_overwrite(tmp_path):
    ok(cli("prepare", "synthetic", "--out", tmp_path / "w", "--users", 30))
    refused(cli("prepare", "synthetic", "--out", tmp_path / "w", "--users", 30),
            "already exists there; pass --overwrite")


@pytest.mark.parametrize("args, fragments", [
    (["evaluate", "--domain", "games", "--model", "nowhere"], ["nowhere/config.json: file not found"]),
    (["evaluate", "--domain", "gamez", "--model", "M"], ["unknown domain 'gamez'", "known: books"]),
    (["finetune", "--domain", "games", "--model", "nowhere"], ["nowhere: no checkpoint"]),
    (["pretrain", "--kinds", "sessions", "--model", "M"], ["--kinds", "expected some of domain, mixed"]),
    (["pretrain", "--schedule", "wsd", "--model", "M", "--out", "OUT"], ["--schedule 'wsd'"]),
    (["pretrain", "--batch-tokens", "1000", "--model", "M"], ["--batch-tokens 1000 must be a multiple"]),
    (["finetune", "--domain", "games", "--model", "M", "--users-fraction", "2"], ["--users-fraction 2.0"]),
    (["pretrain", "--block-len", "1024", "--micro-batch", "2", "--batch-tokens", "2048", "--model", "M",
      "--out", "OUT"],
     ["--block-len: 1024-token sequences exceed the context of", "(512 tokens)"]),
])
def test_bad_input_gets_one_line(world, tiny_model, tmp_path, args, fragments):
    args = [{"M": tiny_model, "OUT": tmp_path / "out"}.get(a, a) for a in args]
    refused(cli(*args, "--data", world), *fragments, alone=False)
    assert not (tmp_path / "out").exists()  # refused before a run directory was created
