"""The training loop: the chunked loss, exact gradient accumulation, bitwise resume after Ctrl-C or a crash at any
phase of a save, non-finite steps, early stopping, the pre-run checks and the defaults fitted to a checkpoint."""
import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import infra.device as device_module
import train as train_module
from data import (
    IGNORE,
    VALID,
    Encoder,
    Examples,
    eval_cases,
    load_dataset,
    sft_examples,
    target_example,
    train_sequences,
)
from extras.options import check, fitting_defaults
from helpers import (
    BadGradients,
    Fault,
    StopAt,
    assert_same_weights,
    cli,
    config,
    cpt_setup,
    read_records,
    refused,
    run_cpt,
    step_gradients,
)
from infra.files import UserError
from infra.runs import Interrupted, open_run, save_checkpoint
from infra.tokenizer import Tokenizer
from model import Decoder
from schedule import Schedule, factor
from train import cross_entropy_sum, target_loss, train


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_cross_entropy_equals_the_plain_one(precision):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (50,))
    results = []
    for chunk in (7, None):  # 8 chunks with their gradients computed in forward; one plain projection
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = cross_entropy_sum(hidden, weight, targets, chunk=chunk)
        (loss * 3).backward()  # a scaled loss (accumulation, GradScaler) scales the stored gradients
        results.append((loss, hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    tolerance = dict(atol=1e-5, rtol=1e-5) if precision == "fp32" else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(*results, **tolerance)
    assert results[0][1].dtype == hidden.dtype and results[0][2].dtype == weight.dtype


def sft_data(world, tiny_model, tokens):
    ds = load_dataset(world)
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    examples = sft_examples(ds, encoder, train_sequences(ds, "games")[:12], "games")
    return Examples(examples, tokens, encoder.tokenizer.pad_id, seed=0)


def test_accumulated_gradients_equal_one_big_batch(world, tiny_model):
    """Variable-length masked examples split over micro-batches must give the gradient of one big batch."""
    small, big = sft_data(world, tiny_model, 160), sft_data(world, tiny_model, 10**6)
    everything = list(range(len(small.examples)))
    micro = small.micro_batches(0)
    assert len(micro) >= 4 and sorted(i for b in micro for i in b) == everything
    n_targets = small.n_targets(everything)
    grads, losses = [], []
    for data, batches in [(small, micro), (big, [everything])]:
        model = Decoder.from_pretrained(tiny_model)
        out, applied = step_gradients(model, [data.collate(b) for b in batches], n_targets)
        losses.append(out.loss)
        grads.append(list(applied.values()))
    inputs, targets = (torch.as_tensor(a) for a in big.collate(everything))  # the mean loss, from full logits
    with torch.no_grad():
        direct = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    assert losses[0] == pytest.approx(float(direct), rel=1e-5) and losses[1] == pytest.approx(float(direct), rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_target_loss_is_the_mean_cross_entropy_of_the_held_out_items(world, tiny_model):
    ds = load_dataset(world)
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    model = Decoder.from_pretrained(tiny_model)
    cases = eval_cases(ds, "books", VALID)[:7]
    total = n = 0
    with torch.no_grad():
        for case in cases:  # one case at a time, full logits, plain cross-entropy over the target item's tokens
            e = target_example(ds, encoder, case, "books")
            ids = torch.as_tensor(e.ids)
            logits = model(ids[None, :-1])[0]
            supervised = torch.as_tensor(e.supervised[1:])
            total += F.cross_entropy(logits[supervised], ids[1:][supervised], reduction="sum").item()
            n += int(supervised.sum())
        got = target_loss(model, encoder, ds, cases, "books", tokens=96)  # several padded micro-batches
    assert n > len(cases) and got == pytest.approx(total / n, rel=1e-5)


@pytest.fixture(scope="module")
def full_run(world, tiny_model, tmp_path_factory):
    """The uninterrupted run every interrupted-and-resumed one must equal bit for bit, and its summary."""
    out = tmp_path_factory.mktemp("full") / "run"
    with pytest.MonkeyPatch.context() as patch:  # conftest's fixed peak, for this module-scoped run too
        patch.setattr(train_module, "peak_flops", lambda device, precision, remeasure=False: 1e12)
        summary = run_cpt(world, tiny_model, out)
    return load_file(out / "final" / "model.safetensors"), summary, read_records(out)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_follows_the_eager_run_and_saves_plain_weights(world, tiny_model, full_run, tmp_path,
                                                                          monkeypatch):
    """--compile: the same run through inductor's fused kernels, equal up to rounding, and a final checkpoint under
    the model's own names (not the compiled wrapper's)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_cpt(world, tiny_model, tmp_path / "run", cfg=config(compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    weights, _, records = full_run
    compiled = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert compiled.keys() == weights.keys()
    for k in weights:
        torch.testing.assert_close(compiled[k], weights[k], atol=1e-4, rtol=1e-3)
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in (read_records(tmp_path / "run"), records)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_compile_refusals_need_no_run(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="--compile with --shard fsdp: not supported"):
        check(config(compile=True, shard="fsdp"), cpu, 1)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="--compile on CPU needs a C\\+\\+ compiler"):
        check(config(compile=True), cpu, 1)
    check(config(), cpu, 1)  # without --compile no compiler is needed


def same_as_full(run, full_run):
    assert_same_weights(full_run[0], run)


def test_interrupted_and_resumed_run_equals_uninterrupted_bitwise(world, tiny_model, tmp_path, full_run, capsys):
    blocks, _ = cpt_setup(world, tiny_model)
    with pytest.raises(Interrupted, match="interrupted at step 3/8"):
        run_cpt(world, tiny_model, tmp_path / "cut", data=StopAt(blocks, step=3, accum=2))
    assert "stopping after this step, with a checkpoint" in capsys.readouterr().err  # the first Ctrl-C says so
    assert (tmp_path / "cut" / "latest").read_text().strip() == "step-0000003"
    run_cpt(world, tiny_model, tmp_path / "cut", resume=True)
    same_as_full(tmp_path / "cut", full_run)
    strip = lambda rows: [(r["step"], r["loss"], r["lr"]) for r in rows]  # noqa: E731
    assert strip(full_run[2]) == strip(read_records(tmp_path / "cut"))  # same steps, losses and learning rates
    (tmp_path / "cut" / "results.json").write_text("{}")  # what the CLI writes last
    with pytest.raises(UserError, match="already finished"):
        run_cpt(world, tiny_model, tmp_path / "cut", resume=True)


def test_resume_truncates_the_log_to_the_checkpoint_and_sums_the_whole_run(world, tiny_model, tmp_path, full_run):
    """Killed after step 5 was logged, with the checkpoint at step 4: the resumed run logs step 5 once, and its
    summary counts every step's tokens and seconds, not only the resumed ones."""
    blocks, _ = cpt_setup(world, tiny_model)
    with pytest.raises(Fault):
        run_cpt(world, tiny_model, tmp_path / "r", cfg=config(save_every=4), data=StopAt(blocks, 6, 2, crash=True))
    assert [r["step"] for r in read_records(tmp_path / "r")] == [1, 2, 3, 4, 5]
    summary = run_cpt(world, tiny_model, tmp_path / "r", cfg=config(save_every=4), resume=True)
    records = read_records(tmp_path / "r")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert summary["tokens"] == full_run[1]["tokens"] == 8 * 2 * 2 * 32
    assert summary["seconds"] == pytest.approx(sum(r["seconds"] for r in records))
    same_as_full(tmp_path / "r", full_run)


def run_with_nan(world, tiny_model, out, bad, cfg):
    blocks, tokenizer = cpt_setup(world, tiny_model)
    model = Decoder.from_pretrained(tiny_model)
    data = BadGradients(blocks, model, bad, cfg.accum, math.nan)
    run = open_run(out, {"test": 1}, resume=False, overwrite=False)
    return train(model, data, cfg, run, tokenizer=tokenizer,
                 device=torch.device("cpu"))


def test_a_step_with_non_finite_gradients_is_skipped_and_logged(world, tiny_model, tmp_path):
    summary = run_with_nan(world, tiny_model, tmp_path / "r", bad=[3], cfg=config(save_every=1))
    records = read_records(tmp_path / "r")  # strict JSON: the NaN norm is written as null
    assert records[2]["step"] == 3 and records[2]["skipped"] is True and records[2]["grad_norm"] is None
    assert math.isfinite(records[2]["loss"]) and not any("skipped" in r for r in records[:2] + records[3:])
    assert summary["skipped_steps"] == 1
    for checkpoint in (tmp_path / "r" / "checkpoints").iterdir():  # step 3's update was never applied or saved
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_consecutive_non_finite_steps_stop_naming_the_last_intact_checkpoint(world, tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"3 consecutive steps \(4-6\), none applied; the last intact checkpoint is "
                                        r".*step-0000003; lower --lr"):
        run_with_nan(world, tiny_model, tmp_path / "r", bad=[4, 5, 6, 7, 8], cfg=config(save_every=3))
    assert [r.get("skipped", False) for r in read_records(tmp_path / "r")] == [False] * 3 + [True] * 3
    assert (tmp_path / "r" / "latest").read_text().strip() == "step-0000003"


def test_non_finite_weights_are_never_saved(world, tiny_model, tmp_path):
    model = Decoder.from_pretrained(tiny_model)
    with torch.no_grad():
        model.norm.weight[0] = math.inf
    with pytest.raises(UserError, match="non-finite weights at step 5 .*norm.weight.*not saved"):
        save_checkpoint(tmp_path, 5, model, None, {"optimizer": {}}, keep=2)
    assert not (tmp_path / "checkpoints" / "step-0000005").exists() and not (tmp_path / "latest").exists()


def test_resume_accepts_a_changed_learning_rate_with_a_recorded_warning(world, tiny_model, tmp_path, capsys):
    blocks, _ = cpt_setup(world, tiny_model)
    settings = {"train": {"lr": 3e-3, "accum": 2}}
    with pytest.raises(Interrupted):
        run_cpt(world, tiny_model, tmp_path / "r", data=StopAt(blocks, 3, 2), settings=settings)
    with pytest.raises(UserError, match=r"different settings \(train.accum\)"):  # the batch plan may not change
        run_cpt(world, tiny_model, tmp_path / "r", resume=True, settings={"train": {"lr": 3e-3, "accum": 4}})
    lowered = {"train": {"lr": 1e-3, "accum": 2}}
    run_cpt(world, tiny_model, tmp_path / "r", resume=True, cfg=config(lr=1e-3), settings=lowered)
    assert "resuming with changed settings train.lr 0.003 -> 0.001" in capsys.readouterr().err
    saved = json.loads((tmp_path / "r" / "run_config.json").read_text())
    assert saved["train"]["lr"] == 1e-3
    assert saved["resumed_with_changes"] == [{"from": "step-0000003", "changed": {"train.lr": [3e-3, 1e-3]}}]
    lrs = [r["lr"] for r in read_records(tmp_path / "r")]
    s = config().schedule
    assert lrs[:3] == pytest.approx([3e-3 * factor(t, 8, s) for t in range(3)])
    assert lrs[3:] == pytest.approx([1e-3 * factor(t, 8, s) for t in range(3, 8)])


def test_resume_finishes_a_run_stopped_during_its_final_validation(world, tiny_model, tmp_path, full_run):
    def broken(model):
        raise Fault("killed while validating")

    with pytest.raises(Fault):
        run_cpt(world, tiny_model, tmp_path / "r", validate=broken)
    assert (tmp_path / "r" / "latest").read_text().strip() == "step-0000008" and not (tmp_path / "r" / "final").exists()
    summary = run_cpt(world, tiny_model, tmp_path / "r", resume=True, validate=lambda m: {"val_loss": 1.5})
    assert summary["validation"] == {"val_loss": 1.5} and summary["tokens"] == full_run[1]["tokens"]
    last = read_records(tmp_path / "r")[-1]
    assert last["step"] == 8 and last["validation"] == {"val_loss": 1.5} and last["seconds"] >= 0
    same_as_full(tmp_path / "r", full_run)


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt"])
def test_a_corrupt_latest_checkpoint_is_named_and_resume_falls_back(world, tiny_model, tmp_path, full_run, damaged,
                                                                    capsys):
    blocks, _ = cpt_setup(world, tiny_model)
    with pytest.raises(Interrupted):
        run_cpt(world, tiny_model, tmp_path / "r", cfg=config(save_every=2), data=StopAt(blocks, 5, 2))
    checkpoints = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000004", "step-0000005"]  # keep=2
    file = checkpoints / "step-0000005" / damaged
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])  # truncated, as by a full disk
    run_cpt(world, tiny_model, tmp_path / "r", cfg=config(save_every=2), resume=True)
    err = capsys.readouterr().err
    assert f"step-0000005/{damaged} is unreadable" in err and "previous complete checkpoint" in err
    assert "step-0000004" in err and (checkpoints / "corrupt-step-0000005").exists()
    same_as_full(tmp_path / "r", full_run)
    (checkpoints / "step-0000008" / damaged).write_bytes(b"")
    for old in checkpoints.glob("step-*"):
        if old.name != "step-0000008":
            shutil.rmtree(old)
    with pytest.raises(UserError, match=f"no readable checkpoint .*step-0000008/{damaged} is unreadable"):
        run_cpt(world, tiny_model, tmp_path / "r", cfg=config(save_every=2), resume=True)


def test_leftovers_of_interrupted_saves_are_removed_on_resume(world, tiny_model, tmp_path, full_run, capsys):
    blocks, _ = cpt_setup(world, tiny_model)
    with pytest.raises(Interrupted):
        run_cpt(world, tiny_model, tmp_path / "r", data=StopAt(blocks, 3, 2))
    run = tmp_path / "r"
    leftovers = [run / "checkpoints" / ".step-0000009.tmp4242", run / "checkpoints" / ".step-0000003.old77",
                 run / ".final.tmp66"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    for f in (run / "latest.tmp", run / "best.json.tmp55", run / "metrics.jsonl.tmp1"):
        f.write_text("partial")
    (run / ".best.old12").mkdir()  # best/ was renamed aside, then the new one never renamed in: put it back
    (run / ".best.old12" / "config.json").write_text("{}")
    foreign = [run / "notes.txt", run / "checkpoints" / ".step-x.tmp1", run / "latest.tmp.bak"]
    for f in foreign:
        f.write_text("mine")
    run_cpt(world, tiny_model, run, resume=True)
    assert not any(p.exists() for p in leftovers) and not (run / "latest.tmp").exists()
    assert not (run / "best.json.tmp55").exists() and not (run / "metrics.jsonl.tmp1").exists()
    assert (run / "best" / "config.json").read_text() == "{}" and not (run / ".best.old12").exists()
    assert all(f.read_text() == "mine" for f in foreign)  # names this project never writes are left alone
    assert "removed" in capsys.readouterr().err
    same_as_full(run, full_run)


class SaveFault:
    """Raise Fault at one phase of the checkpoint save of step 4 (6 for the pruning that follows `latest`)."""
    PHASES = ("state file", "rename", "latest.tmp", "latest", "prune")

    def __init__(self, monkeypatch, phase):
        replace, save, rmtree, write_text = os.replace, torch.save, shutil.rmtree, Path.write_text

        def fake_save(obj, f, *a, **kw):
            if phase == "state file" and ".step-0000004." in str(f):
                raise Fault(phase)
            return save(obj, f, *a, **kw)

        def fake_replace(src, dst):
            if phase == "rename" and Path(dst).name == "step-0000004":
                raise Fault(phase)
            if phase == "latest" and Path(dst).name == "latest" and "step-0000004" in Path(src).read_text():
                raise Fault(phase)
            return replace(src, dst)

        def fake_write_text(path, text, *a, **kw):
            if phase == "latest.tmp" and path.name == "latest.tmp" and "step-0000004" in text:
                raise Fault(phase)
            return write_text(path, text, *a, **kw)

        def fake_rmtree(path, *a, **kw):
            if phase == "prune" and Path(path).name == "step-0000002":
                raise Fault(phase)
            return rmtree(path, *a, **kw)

        for owner, name, fake in [(torch, "save", fake_save), (os, "replace", fake_replace),
                                  (Path, "write_text", fake_write_text), (shutil, "rmtree", fake_rmtree)]:
            monkeypatch.setattr(owner, name, fake)


@pytest.mark.parametrize("phase", SaveFault.PHASES)
def test_a_save_killed_at_each_phase_resumes_to_the_uninterrupted_result(world, tiny_model, tmp_path, full_run,
                                                                         monkeypatch, phase):
    run = tmp_path / "r"
    with monkeypatch.context() as patch:
        SaveFault(patch, phase)
        with pytest.raises(Fault, match=phase):
            run_cpt(world, tiny_model, run, cfg=config(save_every=2))
    run_cpt(world, tiny_model, run, cfg=config(save_every=2), resume=True)
    same_as_full(run, full_run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006", "step-0000008"]
    assert sorted(p.name for p in run.iterdir() if p.name != "curves.png") == ["checkpoints", "final", "latest",
                                                                               "metrics.jsonl", "run_config.json"]
    assert [r["step"] for r in read_records(run)] == list(range(1, 9))


def test_anneal_zero_runs_to_the_end_and_resumes(world, tiny_model, tmp_path):
    """Warmup-stable only: LambdaLR asks the schedule for step `total` after the last step and on resume."""
    blocks, _ = cpt_setup(world, tiny_model)
    cfg = config(steps=4, schedule=Schedule(warmup=1, anneal=0))
    with pytest.raises(Interrupted):
        run_cpt(world, tiny_model, tmp_path / "r", cfg=cfg, data=StopAt(blocks, 4, 2))
    run_cpt(world, tiny_model, tmp_path / "r", cfg=cfg, resume=True)  # resumes at the last step
    assert [r["lr"] for r in read_records(tmp_path / "r")] == pytest.approx([3e-5, 3e-3, 3e-3, 3e-3])


def test_peak_probe_is_cached_never_lowered_and_remeasured_when_mfu_exceeds_one(world, tiny_model, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    probes = iter([5e9, 3e9, 8e9])
    monkeypatch.setattr(device_module, "matmul_flops", lambda device, precision, reps: next(probes))
    cpu = torch.device("cpu")
    peak_flops = device_module.peak_flops
    assert peak_flops(cpu, "fp32") == 5e9 and peak_flops(cpu, "fp32") == 5e9  # measured once, then cached
    assert peak_flops(cpu, "fp32", remeasure=True) == 5e9  # a busier probe (3e9) never lowers it
    assert peak_flops(cpu, "fp32", remeasure=True) == 8e9
    (tmp_path / "cache" / "cprec" / "peak_flops.json").unlink()
    probes = iter([1e3, 1e18])  # a probe on a very busy machine, then a quiet one
    run_cpt(world, tiny_model, tmp_path / "r", cfg=config(steps=3, schedule=Schedule(warmup=1, anneal=1)))
    mfu = [r["mfu"] for r in read_records(tmp_path / "r") if "mfu" in r]
    assert mfu[0] > 1 and all(m < 1e-3 for m in mfu[1:])  # logged as measured (not clamped), then corrected
    assert "MFU" in capsys.readouterr().err
    assert list(json.loads((tmp_path / "cache" / "cprec" / "peak_flops.json").read_text()).values()) == [1e18]


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--epochs", "0"], "--epochs 0.0: expected a value > 0"),
    (["pretrain", "--tokens", "-5"], "--tokens -5: expected a value > 0"),
    (["pretrain", "--micro-batch", "0"], "--micro-batch 0: expected a value > 0"),
    (["pretrain", "--block-len", "0"], "--block-len 0: expected a value > 0"),
    (["pretrain", "--lr", "-1"], "--lr -1.0: expected a learning rate > 0"),
    (["pretrain", "--warmup", "-5"], "--warmup -5.0: expected a step count"),
    (["pretrain", "--save-every", "-1"], "--save-every -1: expected a step count >= 0"),
    (["finetune", "--domain", "games", "--batch-tokens", "3000", "--micro-tokens", "2048"],
     "--batch-tokens 3000 must be a multiple of --micro-tokens (2048)"),
    (["finetune", "--domain", "games", "--epochs", "0"], "--epochs 0.0: expected a value > 0"),
    (["finetune", "--domain", "games", "--lr", "0"], "--lr 0.0: expected a learning rate > 0"),
    (["pretrain", "--shard", "fsdp", "--compile"], "--compile with --shard fsdp: not supported"),
])
def test_bad_training_options_are_refused_before_the_run_directory(world, tiny_model, tmp_path, args, message):
    line = refused(cli(*args, "--data", world, "--model", tiny_model, "--out", tmp_path / "out", "--no-progress"))
    assert line.startswith(f"error: {message}"), line
    assert not (tmp_path / "out").exists()


def test_defaults_fit_the_checkpoint_init_models_keep_todays_and_pretrained_llms_get_cpt_ones(world, tiny_model,
                                                                                            tmp_path):
    assert json.loads((tiny_model / "config.json").read_text())["cprec_init"]["seed"] == 0  # init's mark
    assert fitting_defaults(tiny_model, None, None, 10_000, "wsa", 0.2) == (1e-3, 0.02)
    llm = tmp_path / "llm"  # the same weights without the mark: a downloaded checkpoint
    shutil.copytree(tiny_model, llm)
    config = json.loads((llm / "config.json").read_text())
    del config["cprec_init"]
    (llm / "config.json").write_text(json.dumps(config))
    for steps, expected in [(10_000, 200), (3000, 100), (50, 20)]:  # 2%; at least 100; at most half of 50 - 10
        assert fitting_defaults(llm, None, None, steps, "wsa", 0.2) == (1e-4, expected)
    assert fitting_defaults(llm, 3e-4, 7, 10_000, "wsa", 0.2) == (3e-4, 7)  # explicit values win
    assert fitting_defaults(llm, None, 0.1, 10_000, "cosine", 0.2) == (1e-4, 0.1)
    for model in (llm, tiny_model):  # LoRA's peak whatever the checkpoint: 3e-3 at rank 8, falling as 1/sqrt(rank)
        assert fitting_defaults(model, None, 0.1, 10_000, "cosine", 0.2, lora_rank=8)[0] == pytest.approx(3e-3)
        assert fitting_defaults(model, None, 0.1, 10_000, "cosine", 0.2, lora_rank=32)[0] == pytest.approx(1.5e-3)
    assert fitting_defaults(llm, 2e-5, 0.1, 10_000, "cosine", 0.2, lora_rank=8)[0] == 2e-5  # explicit wins
    args = ["pretrain", "--data", str(world), "--tokens", "256", "--block-len", "32", "--micro-batch", "4",
            "--batch-tokens", "128", "--val-users", "2", "--no-progress"]
    for model, lr, warmup in [(llm, 1e-4, 1), (tiny_model, 1e-3, 0.02)]:  # 2 steps: warmup capped at 1
        out = tmp_path / f"run-{model.name}"
        code, output = cli(*args, "--model", model, "--out", out)
        assert code == 0, output
        settings = json.loads((out / "run_config.json").read_text())["train"]
        assert (settings["lr"], settings["schedule"]["warmup"]) == (lr, warmup)
    assert "cprec_init" in json.loads((tmp_path / "run-tiny" / "final" / "config.json").read_text())  # kept
    assert "cprec_init" not in json.loads((tmp_path / "run-llm" / "final" / "config.json").read_text())




class BlowUp:
    """Wraps the data and, while step `step` is being assembled, multiplies every weight by 30: a finite blow-up
    (as after a too-large learning rate) whose loss stays far above the run's best."""

    def __init__(self, data, model, step, accum):
        self.data, self.model, self.calls, self.at = data, model, 0, (step - 1) * accum + 1

    def __getattr__(self, name):
        return getattr(self.data, name)

    def collate(self, batch):
        self.calls += 1
        if self.calls == self.at:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(30)
        return self.data.collate(batch)


def test_a_diverged_run_is_never_checkpointed_so_resume_starts_from_a_healthy_one(world, tiny_model, tmp_path):
    """Before: the last "intact" checkpoint was finite but held the blown-up weights, so every --resume diverged."""
    blocks, tokenizer = cpt_setup(world, tiny_model)
    cfg = config(steps=24, schedule=Schedule("constant", warmup=2), save_every=4)
    reference = tmp_path / "ref"
    train(Decoder.from_pretrained(tiny_model), blocks, cfg, open_run(reference, {"t": 1}, False, False),
          tokenizer=tokenizer, device=torch.device("cpu"))
    model = Decoder.from_pretrained(tiny_model)
    run = open_run(tmp_path / "r", {"t": 1}, False, False)
    with pytest.raises(UserError, match=r"the loss diverged: .* step 20 was not saved; the last healthy checkpoint is "
                                        r".*step-0000016; lower --lr"):
        train(model, BlowUp(blocks, model, 17, 2), cfg, run, tokenizer=tokenizer, device=torch.device("cpu"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000012", "step-0000016"]
    train(Decoder.from_pretrained(tiny_model), blocks, cfg, open_run(run, {"t": 1}, True, False), tokenizer=tokenizer,
          device=torch.device("cpu"), resume=True)
    assert_same_weights(load_file(reference / "final" / "model.safetensors"), run)


def test_early_stopping_keeps_the_first_best_and_waits_patience_validations(world, tiny_model, tmp_path):
    blocks, tokenizer = cpt_setup(world, tiny_model)
    scores = iter([0.1, 0.3, 0.2, 0.3, 0.25, 0.9])  # a tie (0.3 again) is not an improvement

    def validate(model):
        return {"score": next(scores)}

    cfg = config(steps=12, eval_every=2, select="score", patience=2)
    summary = train(Decoder.from_pretrained(tiny_model), blocks, cfg, open_run(tmp_path / "r", {"t": 1}, False, False),
                    tokenizer=tokenizer, device=torch.device("cpu"), validate=validate)
    assert summary["best"] == {"step": 4, "score": 0.3} and summary["last_step"] == 8  # stopped after 2 waits
    assert [r["step"] for r in read_records(tmp_path / "r") if "validation" in r] == [2, 4, 6, 8]


def test_fp16_with_its_loss_scaler_skips_an_overflow_halves_the_scale_and_resumes_exactly(world, tiny_model, tmp_path):
    """The design's fp16 + GradScaler path, on CPU (torch's CPU autocast takes float16)."""
    blocks, tokenizer = cpt_setup(world, tiny_model)
    cfg = config(precision="fp16", save_every=2)
    runs = {}
    for name, stop in (("whole", None), ("cut", 5)):
        model = Decoder.from_pretrained(tiny_model)
        data = BadGradients(blocks, model, [3], cfg.accum)
        run = open_run(tmp_path / name, {"t": 1}, False, False)
        with pytest.raises(Interrupted) if stop else contextlib.nullcontext():
            train(model, StopAt(data, stop, cfg.accum) if stop else data, cfg, run, tokenizer=tokenizer,
                  device=torch.device("cpu"))
        runs[name] = run
    train(Decoder.from_pretrained(tiny_model), blocks, cfg, open_run(runs["cut"], {"t": 1}, True, False),
          tokenizer=tokenizer, device=torch.device("cpu"), resume=True)
    records = read_records(runs["whole"])
    assert records[2]["skipped"] is True and records[2]["grad_norm"] is None  # step 3: not applied
    assert records[2]["scale"] == records[1]["scale"] / 2 == 2.0 ** 15 and not any("skipped" in r for r in
                                                                                   records[3:8])
    assert [r["loss"] for r in read_records(runs["cut"])] == [r["loss"] for r in records]
    assert_same_weights(load_file(runs["whole"] / "final" / "model.safetensors"), runs["cut"])
