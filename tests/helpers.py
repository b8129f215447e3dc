"""What several test files share: tiny shapes, the one CLI harness (cprec.py run in this process), the torchrun
launcher for multi-process tests, and the pieces of a tiny CPT run (its data, settings, injected stops)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file

from data import Blocks, Encoder, cpt_stream, load_dataset
from extras.init import init_weights
from infra.config import ModelConfig
from infra.distributed import Supervised
from infra.runs import open_run
from infra.tokenizer import Tokenizer
from model import Decoder
from schedule import Schedule
from train import TrainConfig, lm_loss, step, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                   max_positions=512)
# transformers configs of tiny Llama, Qwen2 (GQA 7:1) and Llama 3.1 RoPE scaling, for parity and config tests
LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
QWEN2 = dict(vocab_size=96, hidden_size=56, intermediate_size=80, num_hidden_layers=2, num_attention_heads=7,
             num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def random_decoder(vocab_size: int, seed: int, sharpen: float) -> Decoder:
    """A tiny random decoder whose next-token distribution is peaked (lm_head times `sharpen`), so scores differ
    clearly: the model of the beam-search tests."""
    config = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                         intermediate_size=64)
    model = Decoder(config)
    init_weights(model, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model.eval()


# --------------------------------------------------------------------------------------------------- the CLI
def cli(*args) -> tuple[int | str, str]:
    """Run `cprec.py ARGS` in this process: (exit status, stdout and stderr together); "crash" for an exception."""
    import cprec
    from infra.cli import main
    output = io.StringIO()
    with mock.patch.object(sys, "argv", ["cprec.py", *map(str, args)]), \
            contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            main(cprec.app)
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception:
            code = "crash"
            output.write(traceback.format_exc())
    return code, output.getvalue()


def ok(result) -> str:
    code, output = result
    assert code == 0, output[-3000:]
    return output


def refused(result, *fragments, alone: bool = True) -> str:
    """The command ended with exit status 2 and one error line holding every fragment: its only output, or with
    alone=False its last line (what it printed before, such as a run's plan, may come first)."""
    code, output = result
    lines = output.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error: "), (code, output[-3000:])
    assert (len(lines) == 1 if alone else sum(line.startswith("error: ") for line in lines) == 1), output[-3000:]
    assert "Traceback" not in output and all(f in lines[-1] for f in fragments), (fragments, lines[-1])
    return lines[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str | Path, *args: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Run a script in fresh processes, under torchrun for several; fail the test with its stderr unless it succeeds."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
              str(free_port())] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run(prefix + [str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# --------------------------------------------------------------------------------------------------- a tiny CPT run
def cpt_setup(world: Path, tiny_model: Path) -> tuple[Blocks, Tokenizer]:
    ds = load_dataset(world)
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    return Blocks(cpt_stream(ds, encoder), length=32, rows=2, seed=0), encoder.tokenizer


def config(**kw) -> TrainConfig:
    """8 steps of 2 micro-batches, warmup 2, annealing 3: every phase of WSA in a run of seconds."""
    return TrainConfig(**{**dict(steps=8, accum=2, lr=3e-3, schedule=Schedule(warmup=2, anneal=3), precision="fp32",
                                 progress=False), **kw})


def run_cpt(world, tiny_model, out, resume=False, cfg=None, data=None, validate=None, settings=None):
    """`cprec.py pretrain` in miniature: the run directory, then train() from the base model (--resume loads the
    checkpoint's weights into it)."""
    blocks, tokenizer = cpt_setup(world, tiny_model)
    cfg = cfg or config()
    run = open_run(out, settings or {"test": 1}, resume=resume, overwrite=False)
    return train(Decoder.from_pretrained(tiny_model), data or blocks, cfg, run, tokenizer=tokenizer,
                 device=torch.device("cpu"), resume=resume, validate=validate)


def step_gradients(model, batches: list[tuple], n_targets: int, precision: str = "fp32"):
    """train.step on one process without clipping: its result and the gradients it applied (before zero_grad)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    applied = {}
    optimizer.register_step_pre_hook(lambda *_: applied.update((k, p.grad.clone())
                                                               for k, p in model.named_parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    out = step(Supervised(model, lm_loss), model, batches, n_targets, optimizer, sched,
               torch.amp.GradScaler("cpu", enabled=False), precision=precision, device=torch.device("cpu"),
               grad_clip=math.inf)
    return out, applied


def read_records(run: Path) -> list[dict]:
    def refuse(constant):  # metrics.jsonl must be strict JSON: no bare NaN or Infinity
        raise ValueError(f"bare {constant} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in open(run / "metrics.jsonl")]


def assert_same_weights(a: dict[str, torch.Tensor], run: Path, which: str = "final") -> None:
    """The run's `which` checkpoint holds exactly the weights `a` (bit for bit, same names)."""
    b = load_file(run / which / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{run / which} differs"


class Fault(Exception):
    """A crash injected by a test."""


class StopAt:
    """Wraps the data and, while step `step` is being assembled, sends this process SIGINT (a real Ctrl-C) or,
    with crash=True, raises Fault (a kill)."""

    def __init__(self, data, step: int, accum: int, crash: bool = False):
        self.data, self.calls, self.at, self.crash = data, 0, (step - 1) * accum + 1, crash

    def __getattr__(self, name):
        return getattr(self.data, name)

    def collate(self, batch):
        self.calls += 1
        if self.calls == self.at and self.crash:
            raise Fault("killed")
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.data.collate(batch)


class BadGradients:
    """Wraps the data and, while a step in `steps` is assembled, multiplies the gradients reaching the final norm by
    `value` while the loss stays finite: inf as an fp16 overflow, nan as a diverged step (--lr 1e6)."""

    def __init__(self, data, model, steps, accum: int, value: float = math.inf):
        self.data, self.calls, self.steps, self.accum, self.on = data, 0, set(steps), accum, False
        model.norm.weight.register_hook(lambda g: g * value if self.on else g)

    def __getattr__(self, name):
        return getattr(self.data, name)

    def collate(self, batch):
        self.calls += 1
        self.on = (self.calls - 1) // self.accum + 1 in self.steps
        return self.data.collate(batch)
