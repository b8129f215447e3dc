"""CPRec from the command line: prepare data, create a small model, continually pre-train on all domains, fine-tune
on one, evaluate by full ranking. `python cprec.py COMMAND --help` lists every option.

With no arguments everything runs on the built-in world (data/world) and a small model made locally (models/small):
    python cprec.py pretrain && python cprec.py finetune --domain games

pretrain, finetune and evaluate are the paper's recipes and live here; the other commands live beside their code in
extras/ (prepare, init, align, recommend, baseline, reproduce).
"""
from __future__ import annotations

import signal
import sys


def _interrupted(*_) -> None:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":  # Ctrl-C while torch is still importing (seconds): one word, not a traceback
    signal.signal(signal.SIGINT, _interrupted)

import math
from pathlib import Path
from typing import Optional

import numpy as np
import typer

import eval as evaluation
from data import (
    VALID,
    Blocks,
    Encoder,
    Examples,
    cpt_stream,
    eval_cases,
    limited_users,
    sample,
    sft_examples,
    train_sequences,
)
from extras import align, baseline, init, prepare, recommend, reproduce
from extras.world import open_dataset
from infra.cli import OVERWRITE, PRECISION, PROGRESS, RESUME, main, positive, show, split_list
from infra.config import DEFAULT_CPT, DEFAULT_DATA, config_from_hf
from infra.console import say
from infra.device import autocast, resolve_precision
from infra.distributed import barrier, setup_distributed
from infra.files import UserError, own_output, quote, read_json, write_json
from infra.runs import open_run, per_user_file, save_result
from infra.tokenizer import Tokenizer
from model import Decoder
from schedule import Schedule
from train import MicroBatches, TrainConfig, check, fitting_defaults, run_settings, target_loss, train

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
app.add_typer(prepare.app, name="prepare")
app.command("init")(init.command)

SCHEDULE = typer.Option("wsa", help="wsa (Warmup-Stable-Annealing), cosine, linear or constant.")
WARMUP = typer.Option(None, help="Warmup steps: a count, or a fraction of all steps if < 1 (default: 0.02; for a "
                      "pretrained LLM checkpoint max(2%, 100 steps), at most half the steps before annealing).")
LR = typer.Option(None, help="Peak learning rate (default: 1e-3 for a model `init` made; 1e-4 for a pretrained LLM "
                  "checkpoint, a fraction of its original peak).")
ANNEAL = typer.Option(0.2, help="WSA annealing steps: a count, or a fraction if < 1; 0 = warmup-stable only.")
SHAPE = typer.Option("1-sqrt", help="WSA annealing shape: 1-sqrt, cosine, linear or exp.")
FLOOR = typer.Option(0.1, help="Learning-rate factor reached at the last step.")
SHARD = typer.Option("auto", help="Several processes: ddp (a whole model per GPU), fsdp (parameters, gradients and "
                     "AdamW state sharded over GPUs) or none; auto = ddp for several processes, none for one.")
ACTIVATION_CHECKPOINTING = typer.Option(False, help="Recompute each decoder layer in backward: less activation "
                                        "memory for long blocks, about a third more compute.")
COMPILE = typer.Option(False, "--compile", help="torch.compile the model for training (inductor): the first step "
                       "compiles it; faster steps after (docs/benchmarks.md).")


# --------------------------------------------------------------------------------------------------- CPT
@app.command()
def pretrain(data: Path = typer.Option(DEFAULT_DATA, help="Dataset; the built-in world is created if missing."),
             model: Optional[Path] = typer.Option(None, help="HF checkpoint to start from (default: models/small, "
                                                  "created if missing)."),
             out: Path = typer.Option(DEFAULT_CPT, help="Run directory."),
             kinds: str = typer.Option("domain,mixed", help="CPT sequence kinds: domain, mixed or both."),
             epochs: float = typer.Option(2.0, help="Passes over the CPT text (ignored if --tokens is given)."),
             tokens: Optional[int] = typer.Option(None, help="Training budget in tokens."),
             lr: Optional[float] = LR,
             schedule: str = SCHEDULE, warmup: Optional[float] = WARMUP, anneal: float = ANNEAL,
             anneal_shape: str = SHAPE, lr_floor: float = FLOOR,
             batch_tokens: int = typer.Option(2048, help="Tokens per optimizer step over all processes (small "
                                              "batches learn the most per token here; raise it with the model)."),
             block_len: int = typer.Option(256, help="Tokens per packed block."),
             micro_batch: int = typer.Option(8, help="Blocks per micro-batch and process."),
             precision: str = PRECISION, seed: int = typer.Option(0, help="Seed for data order and initialisation."),
             shard: str = SHARD, activation_checkpointing: bool = ACTIVATION_CHECKPOINTING, compiled: bool = COMPILE,
             save_every: int = typer.Option(200, help="Steps between resumable checkpoints (0 = at the end)."),
             eval_every: int = typer.Option(0, help="Steps between validation losses (0 = at the end)."),
             val_users: int = typer.Option(100, help="Validation users per pre-training domain."),
             resume: bool = RESUME, overwrite: bool = OVERWRITE, progress: bool = PROGRESS):
    """All-domain continual pre-training (CPT) on the pre-training domains' behaviour text."""
    positive(epochs=epochs, tokens=tokens, batch_tokens=batch_tokens, block_len=block_len, micro_batch=micro_batch)
    rank, world, device = setup_distributed()
    ds = open_dataset(data, rank)
    start = init.base_model(model, data, rank)
    tokenizer = Tokenizer.from_pretrained(start)
    encoder = Encoder(tokenizer)
    if rank == 0:  # rank 0 tokenizes and caches, the others read the cache
        cpt_stream(ds, encoder, split_list(kinds), seed, progress=progress)
    barrier()
    stream = cpt_stream(ds, encoder, split_list(kinds), seed)
    blocks = Blocks(stream, block_len, micro_batch, seed)
    accum = batch_tokens // (micro_batch * block_len)
    if accum < 1 or accum * micro_batch * block_len != batch_tokens:
        raise UserError(f"--batch-tokens {batch_tokens} must be a multiple of --micro-batch × --block-len "
                        f"({micro_batch * block_len})")
    steps = math.ceil((tokens or epochs * blocks.n * block_len) / batch_tokens)
    lr, warmup = fitting_defaults(start, lr, warmup, steps, schedule, anneal)
    cfg = TrainConfig(steps, accum, lr, schedule=Schedule(schedule, warmup, anneal, anneal_shape, lr_floor),
                      precision=precision, seed=seed, save_every=save_every, eval_every=eval_every, progress=progress,
                      shard=shard, activation_checkpointing=activation_checkpointing, compile=compiled)
    config = {"command": "pretrain", "data": str(data), "data_fingerprint": ds.fingerprint, "model": str(start),
              "tokenizer_fingerprint": tokenizer.fingerprint(), "kinds": split_list(kinds), "cpt_tokens": len(stream),
              "block_len": block_len, "micro_batch": micro_batch, "batch_tokens": batch_tokens,
              "train_tokens": steps * batch_tokens, "val_users": val_users, "train": run_settings(cfg)}
    check(cfg, device, world, context_of(start), block_len, "--block-len", str(start))
    net = Decoder.from_pretrained(start)  # on --resume, train() loads the checkpoint's weights into it
    pretrain_domains = [k for k, d in ds.domains.items() if d.role == "pretrain"]
    cases = {k: sample(eval_cases(ds, k, VALID), val_users, seed) for k in pretrain_domains}

    def validate(m):
        losses = {k: target_loss(m, encoder, ds, c, k) for k, c in cases.items() if c}
        return {"val_loss": float(np.mean(list(losses.values()))), "per_domain": losses}

    run = open_run(out, config, resume, overwrite, rank, [data, start])  # only now: a failed start leaves nothing
    say(f"CPT on {', '.join(pretrain_domains)}: {len(stream):,} tokens of {'+'.join(split_list(kinds))} sequences, "
        f"{steps} steps of {batch_tokens:,} tokens ({accum} micro-batches), {net.config.n_params / 1e6:.1f}M params")
    summary = train(net, blocks, cfg, run, tokenizer=tokenizer, device=device, rank=rank, world=world, resume=resume,
                    validate=validate)
    if rank == 0:
        write_json(run / "results.json", {"config": config, "training": summary})
        say(f"done: final loss {summary['loss']:.4f}, validation loss {summary['validation']['val_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s, model in {run / 'final'}")


def context_of(start: Path) -> int:
    """The longest sequence the checkpoint at `start` computes exactly."""
    return config_from_hf(read_json(start / "config.json"), str(start / "config.json")).context


# --------------------------------------------------------------------------------------------------- SFT
@app.command()
def finetune(domain: str = typer.Option(..., help="Target domain, e.g. games."),
             data: Path = typer.Option(DEFAULT_DATA, help="Dataset."),
             model: Optional[Path] = typer.Option(None, help="Checkpoint to fine-tune (default: the latest "
                                                  "pretrain, runs/pretrain/final; models/small = no-CPT ablation)."),
             out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/finetune-DOMAIN)."),
             users_fraction: float = typer.Option(1.0, help="Fraction of training users (limited-SFT setting)."),
             epochs: float = typer.Option(8.0, help="Passes over the training examples."),
             lr: Optional[float] = LR,
             schedule: str = typer.Option("cosine", help="wsa, cosine, linear or constant."),
             warmup: Optional[float] = WARMUP, anneal: float = ANNEAL, anneal_shape: str = SHAPE,
             lr_floor: float = FLOOR,
             batch_tokens: int = typer.Option(2048, help="Padded tokens per optimizer step over all processes."),
             micro_tokens: int = typer.Option(2048, help="Padded tokens per micro-batch and process."),
             window: int = typer.Option(20, help="History items in a prompt."),
             eval_every: int = typer.Option(0, help="Steps between validations (0 = once per epoch)."),
             val_users: int = typer.Option(500, help="Validation users (0 = all)."),
             test_users: int = typer.Option(0, help="Test users, a seeded random subset (0 = all)."),
             beams: int = typer.Option(20, help="Beam width of the evaluation (>= 20)."),
             mask_history: bool = typer.Option(False, help="Exclude items already in the history from rankings."),
             precision: str = PRECISION, seed: int = typer.Option(0, help="Seed for data order and user sampling."),
             shard: str = SHARD, activation_checkpointing: bool = ACTIVATION_CHECKPOINTING, compiled: bool = COMPILE,
             save_every: int = typer.Option(0, help="Steps between resumable checkpoints (0 = at the end)."),
             resume: bool = RESUME, overwrite: bool = OVERWRITE, progress: bool = PROGRESS):
    """Supervised fine-tuning on one domain, validation-selected, then the full-ranking test evaluation."""
    positive(epochs=epochs, batch_tokens=batch_tokens, micro_tokens=micro_tokens, window=window)
    if batch_tokens % micro_tokens:
        raise UserError(f"--batch-tokens {batch_tokens} must be a multiple of --micro-tokens ({micro_tokens})")
    rank, world, device = setup_distributed()
    ds = open_dataset(data, rank)
    ds.domain(domain)
    start = model or DEFAULT_CPT / "final"
    if not (start / "config.json").exists():
        raise UserError(init.not_a_checkpoint(start) if model else f"{start}: no checkpoint; run `python cprec.py "
                        "pretrain` first or pass --model")
    out = out or Path(f"runs/finetune-{domain}")
    if not eval_cases(ds, domain, VALID):
        raise UserError(f"domain {quote(domain)} has no validation cases (users need 3+ interactions there), so no "
                        "checkpoint could be chosen; choose another --domain")
    tokenizer = Tokenizer.from_pretrained(start)
    encoder = Encoder(tokenizer)
    sequences = limited_users(train_sequences(ds, domain), users_fraction, seed)
    examples = Examples(sft_examples(ds, encoder, sequences, domain, window, progress), micro_tokens, tokenizer.pad_id,
                        seed)
    accum = batch_tokens // micro_tokens
    per_epoch = MicroBatches(examples).epoch_size()
    steps = math.ceil(epochs * per_epoch / accum)
    lr, warmup = fitting_defaults(start, lr, warmup, steps, schedule, anneal)
    cfg = TrainConfig(steps, accum, lr, schedule=Schedule(schedule, warmup, anneal, anneal_shape, lr_floor),
                      precision=precision, seed=seed, save_every=save_every,
                      eval_every=eval_every or max(1, math.ceil(per_epoch / accum)), select="ndcg@10",
                      progress=progress, shard=shard, activation_checkpointing=activation_checkpointing,
                      compile=compiled)
    config = {"command": "finetune", "domain": domain, "data": str(data), "data_fingerprint": ds.fingerprint,
              "model": str(start), "tokenizer_fingerprint": tokenizer.fingerprint(), "users_fraction": users_fraction,
              "train_users": len(sequences), "examples": len(examples.examples), "padding": examples.padding(),
              "window": window, "batch_tokens": batch_tokens, "micro_tokens": micro_tokens, "val_users": val_users,
              "test_users": test_users, "beams": beams, "mask_history": mask_history, "train": run_settings(cfg)}
    check(cfg, device, world, context_of(start), examples.longest, "--window", str(start))
    net = Decoder.from_pretrained(start)  # on --resume, train() loads the checkpoint's weights into it
    options = dict(beams=beams, seed=seed, mask_history=mask_history, window=window, progress=progress)
    run = open_run(out, config, resume, overwrite, rank, [data, start])  # only now: a failed start leaves nothing
    say(f"SFT on {domain}: {len(sequences):,} users, {len(examples.examples):,} examples ({config['padding']:.1%} "
        f"padding), {steps} steps ({accum} micro-batches each), validation every {cfg.eval_every} steps on "
        f"{val_users or 'all'} users")
    summary = train(net, examples, cfg, run, tokenizer=tokenizer, device=device, rank=rank, world=world,
                    resume=resume, validate=lambda m: evaluation.evaluate(m, encoder, ds, domain, split="valid",
                                                                          users=val_users, **options)["model"])
    if rank == 0:
        best = Decoder.from_pretrained(run / "best", device=device)
        say(f"testing the best checkpoint (step {summary['best']['step']}, validation NDCG@10 "
            f"{summary['best']['ndcg@10']:.4f})")
        with autocast(summary["precision"], device):
            result = evaluation.evaluate(best, encoder, ds, domain, split="test", users=test_users, **options)
        save_result(result, run / "results.json", {"config": config, "training": summary})
        show(result)


# --------------------------------------------------------------------------------------------------- evaluation
@app.command("evaluate")
def evaluate_command(domain: str = typer.Option(..., help="Domain whose whole catalogue is ranked."),
                     model: Path = typer.Option(..., help="Checkpoint (CPT for zero-shot, or fine-tuned)."),
                     data: Path = typer.Option(DEFAULT_DATA, help="Dataset."),
                     split: str = typer.Option("test", help="test or valid."),
                     beams: int = typer.Option(20, help="Beam width (>= the largest K, 20)."),
                     exact: bool = typer.Option(False, help="Score every item exactly instead of beam search."),
                     users: int = typer.Option(0, help="Evaluate a seeded random subset of users (0 = all)."),
                     mask_history: bool = typer.Option(False, help="Exclude items already in the history."),
                     window: int = typer.Option(20, help="History items in a prompt."),
                     precision: str = PRECISION, seed: int = typer.Option(0, help="Seed of the user subset."),
                     out: Optional[Path] = typer.Option(None, help="Results JSON (default: "
                                                        "runs/eval/MODEL-PATH-DOMAIN-SPLIT.json)."),
                     overwrite: bool = typer.Option(False, help="Replace an earlier result of evaluate in --out."),
                     progress: bool = PROGRESS):
    """Full-ranking evaluation of a checkpoint on a domain, beside the popularity baseline."""
    if users < 0:  # --beams and --split are checked by the evaluation itself
        raise UserError(f"--users {users}: expected 0 (all users) or a positive number")
    if window < 1:
        raise UserError(f"--window {window}: expected a positive number of history items")
    if out is None:  # named after the whole checkpoint path (from here when below it): two models never collide
        here, where = Path.cwd().resolve(), model.resolve()
        where = where.relative_to(here) if where.is_relative_to(here) else where
        out = Path("runs/eval") / f"{'-'.join(p for p in where.parts if p != where.anchor)}-{domain}-{split}" \
                                  f"{'-exact' if exact else ''}.json"
    out = own_output(out, what="result of evaluate", overwrite=overwrite, check=evaluation_file, inputs=[model, data],
                     file=True)
    own_output(per_user_file(out), what="per-user ranks of evaluate", overwrite=overwrite, file=True,
               check=lambda p: evaluation_file(out))  # its per-user ranks beside it: replaced only with it
    _, _, device = setup_distributed()
    ds = open_dataset(data)
    ds.domain(domain)
    net = Decoder.from_pretrained(model, device=device)
    encoder = Encoder(Tokenizer.from_pretrained(model))
    with autocast(resolve_precision(precision, device), device):
        result = evaluation.evaluate(net, encoder, ds, domain, split=split, beams=beams, exact=exact, users=users,
                                     seed=seed, mask_history=mask_history, window=window, progress=progress)
    save_result(result, out, {"command": "evaluate", "model": str(model), "data_fingerprint": ds.fingerprint})
    show(result)


def evaluation_file(path: Path) -> str | None:
    """None for an earlier result of evaluate (which --overwrite may replace), else why it is not one."""
    try:
        result = read_json(path)
    except UserError:
        return "not JSON"
    ours = isinstance(result, dict) and result.get("command") == "evaluate" and "protocol" in result
    return None if ours else "no \"command\": \"evaluate\" in it"


app.command("align")(align.command)
app.command("recommend")(recommend.command)
app.command("baseline")(baseline.command)
app.command("reproduce")(reproduce.command)

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imported: Ctrl-C is a KeyboardInterrupt again
    main(app)
