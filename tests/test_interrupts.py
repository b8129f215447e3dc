"""Runs stopped from outside: Ctrl-C and SIGTERM at each moment, a full disk during a checkpoint, a process killed
while writing a dataset, one rank of a 2-process run killed. Each ends in a resumable state or one line, and what
--resume finishes equals the uninterrupted run. Subprocesses only where a real signal or process is the point."""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, assert_same_weights, cli, config, cpt_setup, free_port, ok, read_records, refused
from infra.runs import Interrupted, open_run
from model import Decoder
from train import train

PRETRAIN = ["pretrain", "--tokens", 2048, "--block-len", 32, "--micro-batch", 4, "--batch-tokens", 256,
            "--val-users", 2, "--save-every", 2, "--precision", "fp32", "--no-progress"]  # 8 steps


def pretrain(world, model, out, *more):
    return [*PRETRAIN, "--data", world, "--model", model, "--out", out, *more]


def python(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def uninterrupted(world, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    ok(cli(*pretrain(world, tiny_model, out)))
    return load_file(out / "final" / "model.safetensors")


def test_ctrl_c_while_torch_imports_is_one_word(tmp_path):
    """Before: a Python traceback from inside torch's import."""
    child = python(ROOT / "cprec.py", "evaluate", "--help")
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and "Traceback" not in err and err.strip() == "interrupted", err


def test_sigterm_outside_training_is_one_line(world, tiny_model, monkeypatch, tmp_path):
    """SIGTERM during an evaluation (or any command outside training) ends as Ctrl-C does: one line, exit 130."""
    import eval as evaluation
    search = evaluation.beam_search

    def terminated(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return search(*args, **kw)

    monkeypatch.setattr(evaluation, "beam_search", terminated)
    code, output = cli("evaluate", "--domain", "games", "--model", tiny_model, "--data", world, "--out",
                       tmp_path / "e.json")
    assert code == 130 and output.strip().splitlines()[-1] == "interrupted" and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("at", [4, 8])  # a validation mid-run, the last one
def test_sigterm_during_validation_leaves_a_resumable_run(at, world, tiny_model, tmp_path, uninterrupted):
    """Before: a SIGTERM during the last validation was acknowledged, then ignored until the end (exit 0)."""
    blocks, tokenizer = cpt_setup(world, tiny_model)
    calls = []

    def validate(model):
        calls.append(1)
        if len(calls) == (1 if at == 4 else 2):
            os.kill(os.getpid(), signal.SIGTERM)
        return {"val_loss": 1.0}

    cfg, run = config(eval_every=4, save_every=2), tmp_path / "r"
    with pytest.raises(Interrupted, match="interrupted at step 5/8" if at == 4 else "interrupted after the last step"):
        train(Decoder.from_pretrained(tiny_model), blocks, cfg, open_run(run, {"t": 1}, False, False),
              tokenizer=tokenizer, device=torch.device("cpu"), validate=validate)
    assert not (run / "final").exists()
    train(Decoder.from_pretrained(tiny_model), blocks, cfg, open_run(run, {"t": 1}, True, False),
          tokenizer=tokenizer, device=torch.device("cpu"), resume=True, validate=lambda m: {"val_loss": 1.0})
    assert [r["step"] for r in read_records(run) if "validation" in r] == [4, 8] and (run / "final").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resume_finishes(world, tiny_model, tmp_path, uninterrupted):
    """A file-size limit (as a full disk) below a checkpoint's weights: the save fails in one line naming the
    intact checkpoint; --resume without the limit equals the uninterrupted run."""
    out = tmp_path / "run"
    ok(cli(*pretrain(world, tiny_model, out)))
    (out / "results.json").unlink()  # as if killed after its checkpoint of step 6
    for name in ("final", "checkpoints/step-0000008"):
        subprocess.run(["rm", "-r", str(out / name)], check=True)
    (out / "latest").write_text("step-0000006\n")
    run_config = json.loads((out / "run_config.json").read_text())
    limit = (out / "checkpoints" / "step-0000006" / "model.safetensors").stat().st_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    child = python(ROOT / "cprec.py", *pretrain(world, tiny_model, out, "--resume"), preexec_fn=small_files)
    _, err = child.communicate(timeout=300)
    line = err.strip().splitlines()[-1]
    assert child.returncode == 2 and "Traceback" not in err and line.startswith("error: "), err[-2000:]
    assert "cannot be written (File too large)" in line and "the last intact one is" in line and "step-0000006" in line
    assert (out / "latest").read_text().strip() == "step-0000006"
    assert json.loads((out / "run_config.json").read_text()) == run_config
    ok(cli(*pretrain(world, tiny_model, out, "--resume")))
    assert_same_weights(uninterrupted, out)


def test_prepare_killed_while_writing_leaves_nothing_a_rerun_trips_on(tmp_path):
    """A kill (no cleanup runs) in the middle of writing a dataset: no dataset that loads with missing rows is left,
    and a plain rerun, without --overwrite, writes it and clears the dead writer's temporary folder."""
    out = tmp_path / "world"
    script = ("import os, sys; sys.argv = ['cprec.py', 'prepare', 'synthetic', '--users', '40', '--out', sys.argv[1]]\n"
              "import infra.datasets as d\nreal = d.write_json\n"
              "d.write_json = lambda path, obj: os._exit(9)  # killed before the manifest: after the data files\n"
              "import cprec\nfrom infra.cli import main\nmain(cprec.app)\n")
    child = python("-c", script, out)
    child.communicate(timeout=120)
    assert child.returncode == 9 and not out.exists()
    assert [p.name.startswith(".world.tmp") for p in tmp_path.iterdir()] == [True]  # the dead writer's
    ok(cli("prepare", "synthetic", "--users", 40, "--out", out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_a_rank_killed_mid_run_stops_the_others_and_resume_on_one_process_finishes(world, tiny_model, tmp_path,
                                                                                    uninterrupted):
    """SIGKILL to one of 2 DDP processes after its first checkpoint: torchrun ends the other within seconds (no hang
    on a collective); --resume on one process finishes, equal to the uninterrupted run up to rounding."""
    out = tmp_path / "run"
    args = [str(a) for a in pretrain(world, tiny_model, out, "--tokens", 8192)]  # 32 steps
    launcher = python("-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(),
                      ROOT / "cprec.py", *args)
    deadline = time.time() + 120
    while not (out / "latest").exists() and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and
               (p / "stat").read_text().split(") ")[-1].split()[1] == str(launcher.pid)]
    assert len(workers) == 2 and (out / "latest").exists()
    os.kill(max(workers), signal.SIGKILL)
    killed = time.time()
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.time() - killed < 60
    ok(cli(*args, "--resume", "--tokens", 8192))
    long = load_file(out / "final" / "model.safetensors")
    whole = tmp_path / "whole"
    ok(cli(*pretrain(world, tiny_model, whole, "--tokens", 8192)))
    for k, v in load_file(whole / "final" / "model.safetensors").items():
        torch.testing.assert_close(long[k], v, atol=1e-4, rtol=1e-3)


def test_reproduce_interrupted_then_resumed_equals_uninterrupted(world, tiny_model, tmp_path):
    """Ctrl-C during the reproduction reaches reproduce, which passes it on to its running command and waits for
    its checkpoint; --resume continues that command with --resume, reuses the finished ones and refuses other
    settings. Before: an interrupted baseline arm was refused by its own --overwrite, again and again. The resumed
    arm's result equals the same command run uninterrupted."""
    out = tmp_path / "cut"
    args = ["reproduce", "--core", "--data", world, "--model", tiny_model, "--cpt-tokens", 1024, "--sft-epochs", 1,
            "--test-users", 5, "--val-users", 2, "--out", out]
    child = python(ROOT / "cprec.py", *args)
    deadline = time.time() + 240
    while not [r for r in out.glob("seed-*/*/latest") if not (r.parent / "results.json").exists()] and \
            time.time() < deadline:
        time.sleep(0.05)  # until a running arm's first checkpoint: inside its training
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=240)
    log = (out / "commands.log").read_text()
    arm = log.split("$ python cprec.py ")[-1].split("\n")[0].split()  # the command that was running
    assert child.returncode == 130 and f"interrupted during `python cprec.py {arm[0]}" in err, err[-2000:]
    folder = Path(arm[arm.index("--out") + 1])
    assert (folder / "latest").exists() and not (folder / "results.json").exists()
    refused(cli(*args, "--resume", "--seed", 1), "--resume with other settings (--seed)", alone=False)
    ok(cli(*args, "--resume"))
    assert f"{' '.join(arm[:-1])} --resume\n" in (out / "commands.log").read_text()  # continued, not restarted
    direct = [tmp_path / "direct" if a == str(folder) else a for a in arm[:-1]]  # without --overwrite
    ok(cli(*direct))
    results = [json.loads((f / "results.json").read_text()) for f in (folder, tmp_path / "direct")]
    key = "model" if "model" in results[0] else "training"
    assert results[0][key].get("validation", results[0][key]) == results[1][key].get("validation", results[1][key])
    assert (out / "report.md").exists()
