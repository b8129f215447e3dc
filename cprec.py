"""CPRec from the command line: prepare data, create a small model, continually pre-train on all domains, fine-tune
on one, evaluate by full ranking. `python cprec.py COMMAND --help` lists every option.

With no arguments everything runs on the built-in world (data/world) and a small model made locally (models/small):
    python cprec.py pretrain && python cprec.py finetune --domain games

pretrain, finetune and evaluate are the paper's recipes and live here; the other commands live beside their code in
extras/ (prepare, init, align, recommend, baseline, reproduce).
"""
from __future__ import annotations

import os
import signal
import sys


def _interrupted(*_) -> None:
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # nothing is written yet; SystemExit raised inside torch's C import came out as a TypeError


if __name__ == "__main__":  # Ctrl-C while torch is still importing (seconds): one word, not a traceback
    signal.signal(signal.SIGINT, _interrupted)

import math
from pathlib import Path

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
from extras.options import Evaluate, Finetune, Pretrain, check, multiple, recipe, run_config, run_settings, train_config
from extras.world import open_dataset
from infra.cli import main, positive, show, split_list
from infra.config import DEFAULT_CPT
from infra.console import say
from infra.device import DTYPES, autocast, resolve_precision
from infra.distributed import barrier, resolve_shard, setup_distributed
from infra.files import UserError, quote, read_json, write_json
from infra.runs import evaluation_output, open_run, save_result
from infra.tokenizer import Tokenizer
from model import Decoder
from train import MicroBatches, target_loss, train

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
app.add_typer(prepare.app, name="prepare")
app.command("init")(init.command)


# --------------------------------------------------------------------------------------------------- CPT
@app.command()
@recipe(Pretrain)
def pretrain(o: Pretrain):
    """All-domain continual pre-training (CPT) on the pre-training domains' behaviour text."""
    positive(epochs=o.epochs, tokens=o.tokens, batch_tokens=o.batch_tokens, block_len=o.block_len,
             micro_batch=o.micro_batch)
    rank, world, device = setup_distributed()
    ds = open_dataset(o.data, rank)
    start = init.base_model(o.model, o.data, rank)
    tokenizer = Tokenizer.from_pretrained(start)
    encoder = Encoder(tokenizer)
    kinds = split_list(o.kinds)
    if rank == 0:  # rank 0 tokenizes and caches (or verifies the cache), the others read it
        cpt_stream(ds, encoder, kinds, o.seed, progress=o.progress)
    barrier()
    stream = cpt_stream(ds, encoder, kinds, o.seed, verify=False)
    blocks = Blocks(stream, o.block_len, o.micro_batch, o.seed)
    accum = multiple(o.batch_tokens, o.micro_batch * o.block_len, "--batch-tokens", "--micro-batch × --block-len")
    steps = math.ceil((o.tokens or o.epochs * blocks.n * o.block_len) / o.batch_tokens)
    cfg = train_config(o, steps, accum, start)
    config = run_config(o, {"command": "pretrain", "data": str(o.data), "data_fingerprint": ds.fingerprint,
                            "model": str(start), "tokenizer_fingerprint": tokenizer.fingerprint(), "kinds": kinds,
                            "cpt_tokens": len(stream), "block_len": o.block_len, "micro_batch": o.micro_batch,
                            "batch_tokens": o.batch_tokens, "train_tokens": steps * o.batch_tokens,
                            "val_users": o.val_users, "train": run_settings(cfg), **o.lora.record(start)})
    check(cfg, device, world, "--batch-tokens", start, o.block_len, "--block-len", o.lora)
    # under FSDP on the meta device, read layer by layer as it is sharded; on --resume, train() loads the
    # checkpoint's weights (with LoRA: its adapters) into it
    net = o.lora.load(start, resolve_precision(cfg.precision, device), o.seed, shard=resolve_shard(cfg.shard, world))
    pretrain_domains = [k for k, d in ds.domains.items() if d.role == "pretrain"]
    cases = {k: sample(eval_cases(ds, k, VALID), o.val_users, o.seed) for k in pretrain_domains}

    def validate(m):
        losses = {k: target_loss(m, encoder, ds, c, k) for k, c in cases.items() if c}
        return {"val_loss": float(np.mean(list(losses.values()))), "per_domain": losses}

    # a failed start leaves nothing
    run = open_run(o.out, config, o.resume, o.overwrite, rank, [o.data, start], [o.config])
    say(f"CPT on {', '.join(pretrain_domains)}: {len(stream):,} tokens of {'+'.join(kinds)} sequences, "
        f"{steps} steps of {o.batch_tokens:,} tokens ({accum} micro-batches), {net.config.n_params / 1e6:.1f}M params")
    summary = train(net, blocks, cfg, run, tokenizer=tokenizer, device=device, rank=rank, world=world,
                    resume=o.resume, validate=validate, base=str(start))
    if rank == 0:
        write_json(run / "results.json", {"config": config, "training": summary})
        say(f"done: final loss {summary['loss']:.4f}, validation loss {summary['validation']['val_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s, model in {run / 'final'}")


# --------------------------------------------------------------------------------------------------- SFT
@app.command()
@recipe(Finetune)
def finetune(o: Finetune):
    """Supervised fine-tuning on one domain, validation-selected, then the full-ranking test evaluation."""
    positive(epochs=o.epochs, batch_tokens=o.batch_tokens, micro_tokens=o.micro_tokens, window=o.window)
    accum = multiple(o.batch_tokens, o.micro_tokens, "--batch-tokens", "--micro-tokens")
    rank, world, device = setup_distributed()
    ds = open_dataset(o.data, rank)
    ds.domain(o.domain)
    start = o.model or DEFAULT_CPT / "final"
    if not (start / "config.json").exists():
        raise UserError(init.not_a_checkpoint(start) if o.model else f"{start}: no checkpoint; run `python cprec.py "
                        "pretrain` first or pass --model")
    if not eval_cases(ds, o.domain, VALID):
        raise UserError(f"domain {quote(o.domain)} has no validation cases (users need 3+ interactions there), so no "
                        "checkpoint could be chosen; choose another --domain")
    tokenizer = Tokenizer.from_pretrained(start)
    encoder = Encoder(tokenizer)
    sequences = limited_users(train_sequences(ds, o.domain), o.users_fraction, o.seed)
    examples = Examples(sft_examples(ds, encoder, sequences, o.domain, o.window, o.progress), o.micro_tokens,
                        tokenizer.pad_id, o.seed)
    per_epoch = MicroBatches(examples).epoch_size()
    steps = math.ceil(o.epochs * per_epoch / accum)
    cfg = train_config(o, steps, accum, start, eval_every=o.eval_every or max(1, math.ceil(per_epoch / accum)),
                       select="ndcg@10")
    config = run_config(o, {"command": "finetune", "domain": o.domain, "data": str(o.data),
                            "data_fingerprint": ds.fingerprint, "model": str(start),
                            "tokenizer_fingerprint": tokenizer.fingerprint(), "users_fraction": o.users_fraction,
                            "train_users": len(sequences), "examples": len(examples.examples),
                            "padding": examples.padding(), "window": o.window, "batch_tokens": o.batch_tokens,
                            "micro_tokens": o.micro_tokens, "val_users": o.val_users, "test_users": o.test_users,
                            "beams": o.beams, "mask_history": o.mask_history, "train": run_settings(cfg),
                            **o.lora.record(start)})
    check(cfg, device, world, "--batch-tokens", start, examples.longest, "--window", o.lora)
    # under FSDP on the meta device, read layer by layer as it is sharded; on --resume, train() loads the
    # checkpoint's weights (with LoRA: its adapters) into it
    net = o.lora.load(start, resolve_precision(cfg.precision, device), o.seed, shard=resolve_shard(cfg.shard, world))
    options = dict(beams=o.beams, seed=o.seed, mask_history=o.mask_history, window=o.window, progress=o.progress)
    out = o.out or Path(f"runs/finetune-{o.domain}")
    # a failed start leaves nothing
    run = open_run(out, config, o.resume, o.overwrite, rank, [o.data, start], [o.config])
    say(f"SFT on {o.domain}: {len(sequences):,} users, {len(examples.examples):,} examples ({config['padding']:.1%} "
        f"padding), {steps} steps ({accum} micro-batches each), validation every {cfg.eval_every} steps on "
        f"{o.val_users or 'all'} users")
    summary = train(net, examples, cfg, run, tokenizer=tokenizer, device=device, rank=rank, world=world,
                    resume=o.resume, base=str(start),
                    validate=lambda m: evaluation.evaluate(m, encoder, ds, o.domain, split="valid", users=o.val_users,
                                                           **options)["model"])
    best = read_json(run / "best.json")  # every process tests best/ (its share of the users), rank 0 writes
    say(f"testing the best checkpoint (step {best['step']}, validation NDCG@10 {best['ndcg@10']:.4f})")
    model = Decoder.from_pretrained(run / "best", DTYPES[summary["precision"]], device)  # in the compute dtype
    with autocast(summary["precision"], device):
        result = evaluation.evaluate(model, encoder, ds, o.domain, split="test", users=o.test_users, **options)
    if rank == 0:
        save_result(result, run / "results.json", {"config": config, "training": summary})
        show(result)


# --------------------------------------------------------------------------------------------------- evaluation
@app.command("evaluate")
@recipe(Evaluate)
def evaluate_command(o: Evaluate):
    """Full-ranking evaluation of a checkpoint on a domain, beside the popularity baseline."""
    if o.users < 0:  # --beams and --split are checked by the evaluation itself
        raise UserError(f"--users {o.users}: expected 0 (all users) or a positive number")
    if o.window < 1:
        raise UserError(f"--window {o.window}: expected a positive number of history items")
    if o.exact and o.unconstrained:
        raise UserError("--unconstrained with --exact: exact scoring ranks the catalogue's items only; drop one")
    ranker = "-exact" if o.exact else "-unconstrained" if o.unconstrained else ""
    out = evaluation_output(o.out, o.model, o.data, f"{o.domain}-{o.split}{ranker}", o.overwrite, o.config)
    rank, _, device = setup_distributed()  # under torchrun the processes share the users, rank 0 writes
    ds = open_dataset(o.data)
    ds.domain(o.domain)
    precision = resolve_precision(o.precision, device)
    net = Decoder.from_pretrained(o.model, DTYPES[precision], device)  # in the compute dtype: bf16 on most GPUs
    encoder = Encoder(Tokenizer.from_pretrained(o.model))
    with autocast(precision, device):
        result = evaluation.evaluate(net, encoder, ds, o.domain, split=o.split, beams=o.beams, exact=o.exact,
                                     users=o.users, seed=o.seed, mask_history=o.mask_history, window=o.window,
                                     progress=o.progress, unconstrained=o.unconstrained)
    if rank == 0:
        save_result(result, out, {"command": "evaluate", "model": str(o.model), "data_fingerprint": ds.fingerprint})
        show(result)


app.command("align")(align.command)
app.command("recommend")(recommend.command)
app.command("baseline")(baseline.command)
app.command("reproduce")(reproduce.command)

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imported: Ctrl-C is a KeyboardInterrupt again
    main(app)
