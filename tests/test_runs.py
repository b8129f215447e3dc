"""The run directory: when a run is created, reused, resumed or replaced, and which leftovers of an interrupted save
are cleaned (only names this project writes)."""
import json
import subprocess
import sys

import pytest

from infra.files import UserError
from infra.runs import clean_leftovers, open_run


def test_run_directory_rules(tmp_path):
    open_run(tmp_path / "r", {"lr": 1}, resume=False, overwrite=False)
    with pytest.raises(UserError, match="nothing to resume"):
        open_run(tmp_path / "r", {"lr": 1}, resume=True, overwrite=False)
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1}\n')
    open_run(tmp_path / "r", {"lr": 3}, resume=False, overwrite=False)  # a start that saved no checkpoint: reused
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["run_config.json"]
    (tmp_path / "r" / "latest").write_text("step-0000001\n")
    with pytest.raises(UserError, match="already holds a run; pass --resume .* or --overwrite"):
        open_run(tmp_path / "r", {"lr": 1}, resume=False, overwrite=False)
    with pytest.raises(UserError, match=r"different settings \(lr\)"):
        open_run(tmp_path / "r", {"lr": 2}, resume=True, overwrite=False)
    open_run(tmp_path / "r", {"lr": 2}, resume=False, overwrite=True)
    assert json.loads((tmp_path / "r" / "run_config.json").read_text()) == {"lr": 2}
    assert not (tmp_path / "r" / "latest").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(UserError, match="exists and is not a run written by this project"):  # never reused
        open_run(tmp_path / "other", {"lr": 2}, resume=False, overwrite=False)


def test_clean_leftovers_knows_the_names_atomic_dir_writes(tmp_path):
    """atomic_dir's temporaries are `.NAME.KIND<pid>-<8 hex>`: a crash between its two renames is undone on resume."""
    aside = tmp_path / ".best.old4242-0a1b2c3d"  # best/ renamed aside, the new one never renamed in
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    partial = tmp_path / "checkpoints" / ".step-0000004.tmp4242-89abcdef"
    partial.mkdir(parents=True)
    done = clean_leftovers(tmp_path)
    assert (tmp_path / "best" / "config.json").read_text() == "{}" and not aside.exists() and not partial.exists()
    assert len(done) == 2


def test_resume_compares_fingerprints_not_path_spellings(tmp_path):
    """Before: the same dataset given by a relative path instead of an absolute one was "different settings"."""
    config = {"data": "data/world", "data_fingerprint": "abc", "model": "models/small", "train": {"lr": 1}}
    run = open_run(tmp_path / "r", config, resume=False, overwrite=False)
    (run / "latest").write_text("step-0000001\n")
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    spelt = {**config, "data": str((tmp_path / "data" / "world").resolve()), "model": "./models/small"}
    open_run(run, spelt, resume=True, overwrite=False)
    assert json.loads((run / "run_config.json").read_text())["data"] == spelt["data"]  # where it is now
    with pytest.raises(UserError, match=r"different settings \(data_fingerprint\)"):
        open_run(run, {**spelt, "data_fingerprint": "xyz"}, resume=True, overwrite=False)


def test_a_second_process_on_the_same_run_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    """Before: two runs started at once on one --out both went to the end, writing a mix of both into it."""
    run = tmp_path / "r"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
                               "time.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match="another process is writing this run now"):
        open_run(run, {"lr": 1}, resume=False, overwrite=False)
    assert list(run.iterdir()) == []  # nothing written while refused
    holder.kill()  # killed, as a run can be: its lock goes with it
    holder.wait()
    open_run(run, {"lr": 1}, resume=False, overwrite=False)
