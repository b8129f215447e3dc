"""Experiment trackers (infra.trackers): TensorBoard's scalars equal metrics.jsonl, also after a crash and --resume
(the redone steps purged, each step once); an offline W&B run resumed by its id, no step logged twice; a missing
package refused in one line before any work; the trackers' folders known to the run-folder bookkeeping."""
import importlib.util

import numpy as np
import pytest

import infra.trackers as trackers
from helpers import StopAt, cli, config, cpt_setup, ok, read_records, refused, run_cpt
from infra.files import UserError
from infra.runs import open_run, scalars

FIGURES = {"val_loss": 1.5, "ranking": {"ndcg@10": 0.25}}  # a nested validation result: validation/ranking/ndcg@10


def board(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run: tag -> [(step, value)], as its reader resolves purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(run) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the same scalars (float32, as event files store them)."""
    tags = {}
    for record in read_records(run):
        for tag, value in scalars(record).items():
            tags.setdefault(tag, []).append((record["step"], float(np.float32(value))))
    return tags


def test_tensorboard_scalars_equal_metrics_jsonl_also_after_a_crash_and_resume(world, tiny_model, tmp_path):
    """Killed while step 6 is assembled, the checkpoint at step 4: step 5 was logged, then is redone. The resumed
    session purges it, so the curves still equal metrics.jsonl, each step once."""
    pytest.importorskip("tensorboard")
    blocks, _ = cpt_setup(world, tiny_model)
    run, cfg = tmp_path / "r", config(save_every=4, eval_every=4, tracker="tensorboard")
    with pytest.raises(Exception, match="killed"):
        run_cpt(world, tiny_model, run, cfg=cfg, data=StopAt(blocks, 6, 2, crash=True), validate=lambda m: FIGURES)
    assert board(run) == expected(run) and [s for s, _ in board(run)["train/loss"]] == [1, 2, 3, 4, 5]
    run_cpt(world, tiny_model, run, cfg=cfg, resume=True, validate=lambda m: FIGURES)
    shown = board(run)
    assert shown == expected(run) and [s for s, _ in shown["train/loss"]] == list(range(1, 9))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/mem_gb",
            "validation/val_loss", "validation/ranking/ndcg@10", "validation/seconds"} <= shown.keys()
    assert [s for s, _ in shown["validation/ranking/ndcg@10"]] == [4, 8]


def test_an_offline_wandb_run_is_resumed_by_its_id_and_never_logs_a_step_twice(world, tiny_model, tmp_path,
                                                                                 monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, log = [], trackers.WandB.log

    def spy(self, figures, step):
        before = self.last
        log(self, figures, step)
        logged.extend([self.last] if self.last != before else [])

    monkeypatch.setattr(trackers.WandB, "log", spy)
    blocks, _ = cpt_setup(world, tiny_model)
    run = tmp_path / "r"
    with pytest.raises(Exception, match="killed"):
        run_cpt(world, tiny_model, run, cfg=config(save_every=4, tracker="wandb"), data=StopAt(blocks, 6, 2, True))
    run_cpt(world, tiny_model, run, cfg=config(save_every=4, tracker="wandb"), resume=True,
            validate=lambda m: FIGURES)
    assert logged == [(s, 0) for s in range(1, 9)] + [(8, 1)]  # step 5 once, though metrics.jsonl redid it
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    state = trackers.read_json(run / "wandb" / "cprec-run.json")
    assert len(sessions) == 2 and all(p.name.endswith(state["id"]) for p in sessions), sessions
    assert all(list(p.glob("*.wandb")) for p in sessions)


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_refused_in_one_line_before_any_work(name, world, tiny_model, tmp_path,
                                                                          monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda pkg, *a: None if pkg == name else find(pkg, *a))
    with pytest.raises(UserError) as refusal:
        run_cpt(world, tiny_model, tmp_path / "r", cfg=config(tracker=name))
    assert str(refusal.value) == (f"--tracker {name}: the {name} package is not installed; install it with "
                                  f"`pip install {name}` or run without --tracker")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # train.check refused before the loop
    with pytest.raises(UserError, match="--tracker mlflow: expected none, tensorboard, wandb"):
        trackers.check_tracker("mlflow")


def test_tracker_folders_are_the_runs_own_for_reuse_and_overwrite(tmp_path):
    """A start that saved no checkpoint is rerun over its tracker folders (removed: their steps are redone); a run's
    --overwrite empties a directory that holds them."""
    run = open_run(tmp_path / "r", {"t": 1}, resume=False, overwrite=False)
    for folder in trackers.FOLDERS:
        (run / folder).mkdir()
        (run / folder / "events").write_text("x")
    open_run(run, {"t": 1}, resume=False, overwrite=False)
    assert not any((run / folder).exists() for folder in trackers.FOLDERS)
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    (run / "tensorboard").mkdir()
    open_run(run, {"t": 1}, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["run_config.json"]


def test_every_training_command_takes_tracker(world, tiny_model, tmp_path):
    """--tracker reaches the training loop from the command line (baseline shown; all four recipes declare it in
    their options dataclass), and an unknown name is refused in one line before a run folder exists."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "b"
    ok(cli("baseline", "--domain", "games", "--data", world, "--out", run, "--epochs", 2, "--dim", 16, "--max-len", 20,
           "--tracker", "tensorboard"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*")) and "validation/ndcg@10" in board(run)
    for command, *args in (("pretrain",), ("finetune", "--domain", "games"), ("align", "--domain", "games")):
        out = tmp_path / command
        refused(cli(command, *args, "--data", world, "--model", tiny_model, "--out", out, "--tracker", "bogus"),
                "--tracker bogus: expected none, tensorboard, wandb", alone=False)
        assert not out.exists()
