"""The commands users type, end to end on a tiny world and model, and the one-line errors they get for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cprec(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(ROOT / "cprec.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_pretrain_finetune_evaluate(world, tiny_model, tmp_path):
    ok(cprec("pretrain", "--data", world, "--model", tiny_model, "--out", tmp_path / "cpt", "--tokens", 4096,
             "--block-len", 32, "--micro-batch", 4, "--batch-tokens", 256, "--no-progress", "--val-users", 5))
    cpt = tmp_path / "cpt"
    config = json.loads((cpt / "run_config.json").read_text())
    assert config["data_fingerprint"] == json.loads((world / "manifest.json").read_text())["fingerprint"]
    assert json.loads((cpt / "results.json").read_text())["training"]["validation"]["val_loss"] > 0
    assert (cpt / "final" / "model.safetensors").exists() and (cpt / "final" / "tokenizer.model").exists()
    assert len((cpt / "metrics.jsonl").read_text().splitlines()) == 17  # 16 steps and the final validation

    result = ok(cprec("finetune", "--domain", "games", "--data", world, "--model", cpt / "final", "--out",
                      tmp_path / "sft", "--epochs", 1, "--val-users", 10, "--test-users", 10, "--no-progress"))
    assert "popularity" in result.stdout and "protocol: full ranking over all" in result.stdout
    results = json.loads((tmp_path / "sft" / "results.json").read_text())
    assert results["users"] == 10 and 0 <= results["model"]["ndcg@10"] <= 1
    assert len((tmp_path / "sft" / "results-per_user.jsonl").read_text().splitlines()) == 10
    assert (tmp_path / "sft" / "best" / "config.json").exists()

    result = ok(cprec("evaluate", "--domain", "games", "--data", world, "--model", tmp_path / "sft" / "best",
                      "--users", 3, "--exact", "--out", tmp_path / "eval.json"))
    assert json.loads((tmp_path / "eval.json").read_text())["exact"] is True and "exact scoring" in result.stdout


def test_prepare_synthetic_refuses_to_overwrite(tmp_path):
    ok(cprec("prepare", "synthetic", "--out", tmp_path / "w", "--users", 30))
    result = cprec("prepare", "synthetic", "--out", tmp_path / "w", "--users", 30)
    assert result.returncode == 2 and "already exists there; pass --overwrite" in result.stderr


def one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()  # progress messages may come first; the error is one last line
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and all(f in lines[-1] for f in fragments), lines[-1]


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
    one_line_error(cprec(*args, "--data", world), *fragments)
    assert not (tmp_path / "out").exists()  # refused before a run directory was created


def test_bad_files_get_one_line(world, tiny_model, tmp_path):
    one_line_error(cprec("evaluate", "--domain", "games", "--model", tiny_model, "--data", tmp_path),
                   "manifest.json: file not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", "items.jsonl"):
        (broken / name).write_text((world / name).read_text())
    lines = (world / "interactions.tsv").read_text().splitlines()
    (broken / "interactions.tsv").write_text("\n".join(lines[:5] + ["u1\tnot-an-item"] + lines[5:]) + "\n")
    one_line_error(cprec("evaluate", "--domain", "games", "--model", tiny_model, "--data", broken),
                   "interactions.tsv:6: malformed interaction")
    (broken / "items.jsonl").unlink()
    one_line_error(cprec("evaluate", "--domain", "games", "--model", tiny_model, "--data", broken),
                   "items.jsonl: file not found")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    one_line_error(cprec("evaluate", "--domain", "games", "--model", pickled, "--data", world),
                   "only pickle weights", "safetensors")


def test_existing_run_is_refused_then_overwritten(world, tiny_model, tmp_path):
    args = ["pretrain", "--data", world, "--model", tiny_model, "--out", tmp_path / "run", "--tokens", 512,
            "--block-len", 32, "--micro-batch", 4, "--batch-tokens", 128, "--no-progress", "--val-users", 2]
    ok(cprec(*args))
    one_line_error(cprec(*args), "already holds a run; pass --resume to continue it or --overwrite")
    ok(cprec(*args, "--overwrite"))
    one_line_error(cprec(*args, "--resume"), "already finished")
