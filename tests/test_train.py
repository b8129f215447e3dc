"""Exact gradient accumulation, the chunked loss, bitwise resume after Ctrl-C, DDP = one process, failure paths."""
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common import UserError
from conftest import ROOT, TINY, launch
from data import (
    IGNORE,
    VALID,
    Blocks,
    Encoder,
    Examples,
    cpt_stream,
    eval_cases,
    load_dataset,
    sft_examples,
    target_example,
    tokenizer_corpus,
    train_sequences,
)
from model import Decoder, ModelConfig, create_model
from schedule import Schedule
from tokenizer import Tokenizer
from train import Interrupted, TrainConfig, accumulate, cross_entropy_sum, open_run, target_loss, train


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
        losses.append(accumulate(model, model.lm_head.weight, [data.collate(b) for b in batches], n_targets, 1,
                                 "fp32", torch.device("cpu")))
        grads.append([p.grad for p in model.parameters()])
    inputs, targets = (torch.as_tensor(a) for a in big.collate(everything))  # the summed loss, from full logits
    with torch.no_grad():
        direct = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(losses[0], direct, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(losses[1], direct, atol=1e-3, rtol=1e-5)
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


def cpt_setup(world, tiny_model):
    ds = load_dataset(world)
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    return Blocks(cpt_stream(ds, encoder), length=32, rows=2, seed=0), encoder.tokenizer


def config(**kw):
    return TrainConfig(**{**dict(steps=8, accum=2, lr=3e-3, schedule=Schedule(warmup=2, anneal=3), precision="fp32",
                                 progress=False), **kw})


def run_cpt(world, tiny_model, out, resume=False, cfg=None, data=None):
    blocks, tokenizer = cpt_setup(world, tiny_model)
    cfg = cfg or config()
    run = open_run(out, {"test": 1}, resume=resume, overwrite=False)
    start = run / "checkpoints" / (run / "latest").read_text().strip() if resume else tiny_model
    return train(Decoder.from_pretrained(start), tokenizer, data or blocks, cfg, run, device=torch.device("cpu"),
                 resume=resume)


class StopAt:
    """Wraps the data and sends this process SIGINT (a real Ctrl-C) while step `step` is being assembled."""

    def __init__(self, data, step, accum):
        self.data, self.calls, self.at = data, 0, step * accum

    def __getattr__(self, name):
        return getattr(self.data, name)

    def collate(self, batch):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.data.collate(batch)


def test_interrupted_and_resumed_run_equals_uninterrupted_bitwise(world, tiny_model, tmp_path):
    run_cpt(world, tiny_model, tmp_path / "full")
    blocks, _ = cpt_setup(world, tiny_model)
    with pytest.raises(Interrupted, match="interrupted at step 3/8"):
        run_cpt(world, tiny_model, tmp_path / "cut", data=StopAt(blocks, step=3, accum=2))
    assert (tmp_path / "cut" / "latest").read_text().strip() == "step-0000003"
    run_cpt(world, tiny_model, tmp_path / "cut", resume=True)
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    logs = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("full", "cut")]
    strip = lambda rows: [(r["step"], r["loss"], r["lr"]) for r in rows]  # noqa: E731
    assert strip(logs[0]) == strip(logs[1])  # same steps, losses and learning rates: nothing lost or repeated
    with pytest.raises(UserError, match="already finished"):
        run_cpt(world, tiny_model, tmp_path / "cut", resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(world, tiny_model, tmp_path):
    with pytest.raises(UserError, match="non-finite loss at step 4.*step-0000002"):
        run_cpt(world, tiny_model, tmp_path / "nan", cfg=config(lr=1e6, save_every=2, grad_clip=1e9))
    checkpoint = tmp_path / "nan" / "checkpoints" / "step-0000002"
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_run_directory_rules(tmp_path):
    open_run(tmp_path / "r", {"lr": 1}, resume=False, overwrite=False)
    with pytest.raises(UserError, match="already holds a run; pass --resume .* or --overwrite"):
        open_run(tmp_path / "r", {"lr": 1}, resume=False, overwrite=False)
    with pytest.raises(UserError, match="nothing to resume"):
        open_run(tmp_path / "r", {"lr": 1}, resume=True, overwrite=False)
    (tmp_path / "r" / "latest").write_text("step-0000001\n")
    with pytest.raises(UserError, match=r"different settings \(lr\)"):
        open_run(tmp_path / "r", {"lr": 2}, resume=True, overwrite=False)
    open_run(tmp_path / "r", {"lr": 2}, resume=False, overwrite=True)
    assert json.loads((tmp_path / "r" / "run_config.json").read_text()) == {"lr": 2}
    assert not (tmp_path / "r" / "latest").exists()


def cli(*args, torchrun=False):
    return launch(ROOT / "cprec.py", *args, processes=2 if torchrun else 1)


@pytest.mark.parametrize("tied", [True, False])
def test_two_processes_equal_one_with_the_same_global_batch(world, tiny_model, tmp_path, tied):
    model = tiny_model
    if not tied:  # an untied lm_head is used outside DDP's forward (by the chunked loss): its gradient must sync too
        model = tmp_path / "untied"
        untied = ModelConfig(**{**vars(TINY), "tie_embeddings": False})
        create_model(tokenizer_corpus(load_dataset(world)), model, untied)
    args = ["pretrain", "--data", str(world), "--model", str(model), "--tokens", "2048", "--block-len", "32",
            "--micro-batch", "4", "--batch-tokens", "512", "--precision", "fp32", "--no-progress", "--val-users", "5"]
    cli(*args, "--out", str(tmp_path / "one"))
    cli(*args, "--out", str(tmp_path / "two"), torchrun=True)
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert not torch.equal(one["model.norm.weight"], torch.ones_like(one["model.norm.weight"]))  # it trained
    assert ("lm_head.weight" in one) != tied
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line]
              for d in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
