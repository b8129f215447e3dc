"""CPRec from the command line: prepare data, create a small model, continually pre-train on all domains, fine-tune
on one, evaluate by full ranking. `python cprec.py COMMAND --help` lists every option.

With no arguments everything runs on the built-in world (data/world) and a small model made locally (models/small):
    python cprec.py pretrain && python cprec.py finetune --domain games
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import eval as evaluation
from common import UserError, read_json, write_json
from config import INIT_MARKER, ModelConfig, config_from_hf
from data import (
    VALID,
    Blocks,
    Encoder,
    Examples,
    cpt_stream,
    eval_cases,
    load_dataset,
    sft_examples,
    tokenizer_corpus,
    train_sequences,
)
from model import Decoder, create_model, written_by_init
from schedule import Schedule
from schedule import steps as schedule_steps
from tokenizer import Tokenizer
from train import (
    Interrupted,
    MicroBatches,
    TrainConfig,
    autocast,
    check,
    open_run,
    resolve_precision,
    setup_distributed,
    target_loss,
    train,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
prepare_app = typer.Typer(no_args_is_help=True, help="Write a dataset in the canonical format (data/<name>/).")
app.add_typer(prepare_app, name="prepare")
console, err = Console(), Console(stderr=True)
PROGRESS = typer.Option(True, help="Show progress bars with ETA (on a terminal only).")
clicks = sys.modules[typer.BadParameter.__module__]  # click's exceptions, or the copy newer typers vendor

DEFAULT_DATA, DEFAULT_MODEL, DEFAULT_CPT = Path("data/world"), Path("models/small"), Path("runs/pretrain")
SMALL = ModelConfig()  # the default small model (ModelConfig's defaults)


def say(message: str) -> None:
    if int(__import__("os").environ.get("RANK", 0)) == 0:
        err.print(message, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------- data
@prepare_app.command("synthetic")
def prepare_synthetic(out: Path = typer.Option(DEFAULT_DATA, help="Output dataset directory."),
                      seed: int = typer.Option(0, help="World seed: same seed, same dataset and fingerprint."),
                      users: int = typer.Option(6000, help="Number of users."),
                      overwrite: bool = typer.Option(False, help="Replace an existing dataset.")):
    """Generate the built-in multi-domain world (seven pre-training domains, three downstream incl. games)."""
    from world import WorldConfig, write_world
    refuse_existing(out, overwrite)
    report(write_world(out, WorldConfig(seed=seed, users=users)), out)


def amazon_command(version: int):
    def command(source: Path = typer.Argument(..., help="Directory with the downloaded review and meta files."),
                categories: str = typer.Option(..., help="Comma-separated categories, e.g. Books,Video_Games."),
                out: Path = typer.Option(..., help="Output dataset directory, e.g. data/amazon."),
                downstream: str = typer.Option("", help="Categories (or with --domain-field, domains) kept out of CPT "
                                               "(comma-separated)."),
                domain_field: Optional[str] = typer.Option(None, help="Meta field whose first value is the item's "
                                                           "domain, over all categories (2018: main_cat)."),
                min_domain_items: int = typer.Option(0, help="With --domain-field: merge domains with fewer items "
                                                     "into 'other' (0 = off)."),
                k_core: int = typer.Option(0, help="Iterative k-core filter per domain (0 = off)."),
                min_len: int = typer.Option(0, help="Drop a user's domain history shorter than this (0 = off)."),
                strict: bool = typer.Option(False, help="Stop at the first malformed line instead of counting it."),
                overwrite: bool = typer.Option(False, help="Replace an existing dataset."), progress: bool = PROGRESS):
        from prepare import convert_amazon
        refuse_existing(out, overwrite, source)
        report(convert_amazon(version, source, split_list(categories), out, downstream=split_list(downstream),
                              domain_field=domain_field, min_domain_items=min_domain_items, k_core=k_core,
                              min_len=min_len, strict=strict, progress=progress), out)
    command.__doc__ = f"Convert Amazon Reviews {version} categories (several categories = several domains)."
    return command


prepare_app.command("amazon2023")(amazon_command(2023))
prepare_app.command("amazon2018")(amazon_command(2018))


@prepare_app.command("recbole")
def prepare_recbole(source: Path = typer.Argument(..., help="RecBole dataset folder with NAME.inter and NAME.item."),
                    out: Path = typer.Option(..., help="Output dataset directory."),
                    domain: Optional[str] = typer.Option(None, help="Domain key (default: the dataset name)."),
                    domain_field: Optional[str] = typer.Option(None, help="Item column whose first value is the "
                                                               "item's domain (e.g. class: genres as domains)."),
                    downstream: str = typer.Option("", help="Domains kept out of CPT (comma-separated; with "
                                                   "--domain-field)."),
                    min_domain_items: int = typer.Option(0, help="Merge domains with fewer items into 'other' "
                                                         "(0 = off)."),
                    title_field: Optional[str] = typer.Option(None, help="Item title column (default: auto)."),
                    year_field: Optional[str] = typer.Option(None, help="Year column telling repeated titles apart "
                                                             "(default: release_year or year if present)."),
                    title_year: bool = typer.Option(False, help="Append the year to every title: Heat (1995)."),
                    k_core: int = typer.Option(0, help="Iterative k-core filter (0 = off)."),
                    min_len: int = typer.Option(0, help="Drop users with fewer interactions (0 = off)."),
                    strict: bool = typer.Option(False, help="Stop at the first malformed line."),
                    overwrite: bool = typer.Option(False, help="Replace an existing dataset."),
                    progress: bool = PROGRESS):
    """Convert RecBole atomic files (MovieLens and RecBole's whole collection) into one domain, or one per value of
    an item column (--domain-field class: MovieLens genres)."""
    from prepare import convert_recbole
    refuse_existing(out, overwrite, source)
    report(convert_recbole(source, out, domain=domain, domain_field=domain_field, downstream=split_list(downstream),
                           min_domain_items=min_domain_items, title_field=title_field, year_field=year_field,
                           title_year=title_year, k_core=k_core, min_len=min_len, strict=strict, progress=progress),
           out)


def refuse_existing(out: Path, overwrite: bool, source: Optional[Path] = None) -> None:
    """Before any work: --out must be new, empty, or (with --overwrite) a dataset, and must not hold the source."""
    from data import dataset_out
    dataset_out(out, overwrite, [source] if source else [])


def report(manifest: dict, out: Path) -> None:
    title = f"{out} ({manifest['fingerprint']})"
    table = Table("domain", "name", "role", "users", "items", "interactions", title=title)
    for d in manifest["domains"]:
        table.add_row(d["key"], d["name"], d["role"], f"{d['users']:,}", f"{d['items']:,}", f"{d['interactions']:,}")
    console.print(table)
    if manifest.get("report"):
        console.print_json(data=manifest["report"])
    for path, stats in manifest.get("report", {}).get("files", {}).items():  # what a reader must not miss
        if stats.get("malformed"):
            say(f"warning: {path}: {stats['malformed']:,} malformed lines skipped (first: "
                f"{', '.join(map(str, stats['malformed_lines']))}); expected {stats['expected']}")
        if stats.get("ended_early"):
            say(f"warning: {path}: {stats['ended_early']}")


def split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def dataset(path: Path, rank: int = 0):
    """Load a dataset; the default one (the built-in world) is generated on first use."""
    if path == DEFAULT_DATA and not (path / "manifest.json").exists():
        if rank == 0:
            say(f"creating the built-in world in {path} (once)")
            from world import write_world
            write_world(path)
        barrier()
    return load_dataset(path)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------------- model
@app.command()
def init(data: Path = typer.Option(DEFAULT_DATA, help="Dataset whose texts train the tokenizer."),
         out: Path = typer.Option(DEFAULT_MODEL, help="Output checkpoint directory (HF layout)."),
         vocab: int = typer.Option(SMALL.vocab_size, help="Tokenizer vocabulary size."),
         dim: int = typer.Option(SMALL.dim), layers: int = typer.Option(SMALL.n_layers),
         heads: int = typer.Option(SMALL.n_heads), kv_heads: int = typer.Option(SMALL.n_kv_heads),
         ffn: int = typer.Option(SMALL.intermediate_size, help="MLP intermediate size."),
         seed: int = typer.Option(0), overwrite: bool = typer.Option(False, help="Replace an existing model.")):
    """Train a SentencePiece tokenizer on a dataset and write a small random Llama-architecture checkpoint."""
    refuse_foreign_model(out, overwrite)
    config = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                         head_dim=dim // heads, intermediate_size=ffn)
    model = create_model(tokenizer_corpus(dataset(data)), out, config, seed)
    say(f"wrote {out}: {model.config.n_params / 1e6:.2f}M parameters, vocabulary {model.config.vocab_size}")


def refuse_foreign_model(out: Path, overwrite: bool) -> None:
    """init replaces only a model init wrote (marker in config.json, no other files there), and only on --overwrite;
    a missing or empty directory is simply filled."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not written_by_init(out):
        raise UserError(f"{out}: exists and is not a model written by init; choose another --out (it was left as is)")
    if not overwrite:
        raise UserError(f"{out}: a model already exists there; pass --overwrite to replace it")


def base_model(path: Optional[Path], data: Path, rank: int) -> Path:
    """--model, or the default small model, created on first use."""
    if path is not None:
        return path
    if not (DEFAULT_MODEL / "config.json").exists():
        refuse_foreign_model(DEFAULT_MODEL, overwrite=False)
        if rank == 0:
            say(f"creating the default small model in {DEFAULT_MODEL} (once)")
            create_model(tokenizer_corpus(dataset(data)), DEFAULT_MODEL, ModelConfig())
        barrier()
    return DEFAULT_MODEL


# --------------------------------------------------------------------------------------------------- training
def schedule_options(schedule, warmup, anneal, anneal_shape, lr_floor) -> Schedule:
    return Schedule(name=schedule, warmup=warmup, anneal=anneal, shape=anneal_shape, floor=lr_floor)


def fitting_defaults(start: Path, lr: float | None, warmup: float | None, steps: int, schedule: str,
                     anneal: float) -> tuple[float, float]:
    """--lr and --warmup where not given, fitted to the checkpoint at `start`.

    A model `cprec init` made (config.json carries config.INIT_MARKER, kept through training) starts from random
    weights: peak 1e-3 and 2% warmup, tuned on the small model. Any other checkpoint is a pretrained LLM, whose
    knowledge a large step would wash out: continual pre-training re-warms it to a fraction of its original peak
    (Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to (re)warm your model?"; Ibrahim et al.
    2024) with a WSD-style warmup (MiniCPM): peak 1e-4 and warmup max(2% of steps, 100 steps), at most half the
    steps before annealing. Explicit values always win."""
    if INIT_MARKER in read_json(start / "config.json"):
        return (1e-3 if lr is None else lr), (0.02 if warmup is None else warmup)
    decay = schedule_steps(anneal, steps) if schedule == "wsa" and anneal >= 0 else 0
    fitted_lr = 1e-4 if lr is None else lr
    fitted_warmup = min(max(math.ceil(0.02 * steps), 100), (steps - decay) // 2) if warmup is None else warmup
    if lr is None or warmup is None:
        say(f"{start} is a pretrained checkpoint (no {INIT_MARKER} in its config.json): peak --lr {fitted_lr:g}, "
            f"--warmup {fitted_warmup:g} steps (continual pre-training defaults; pass either to override)")
    return fitted_lr, fitted_warmup


SCHEDULE = typer.Option("wsa", help="wsa (Warmup-Stable-Annealing), cosine, linear or constant.")
WARMUP = typer.Option(None, help="Warmup steps: a count, or a fraction of all steps if < 1 (default: 0.02; for a "
                      "pretrained LLM checkpoint max(2%, 100 steps), at most half the steps before annealing).")
LR = typer.Option(None, help="Peak learning rate (default: 1e-3 for a model `init` made; 1e-4 for a pretrained LLM "
                  "checkpoint, a fraction of its original peak).")
ANNEAL = typer.Option(0.2, help="WSA annealing steps: a count, or a fraction if < 1; 0 = warmup-stable only.")
SHAPE = typer.Option("1-sqrt", help="WSA annealing shape: 1-sqrt, cosine, linear or exp.")
FLOOR = typer.Option(0.1, help="Learning-rate factor reached at the last step.")
PRECISION = typer.Option("auto", help="auto (bf16 where supported, else fp32), fp32, bf16, fp16 (CUDA).")
RESUME = typer.Option(False, help="Continue the run in --out from its latest checkpoint, exactly.")
OVERWRITE = typer.Option(False, help="Replace a run already in --out.")
SHARD = typer.Option("auto", help="Several processes: ddp (a whole model per GPU), fsdp (parameters, gradients and "
                     "AdamW state sharded over GPUs) or none; auto = ddp for several processes, none for one.")
ACTIVATION_CHECKPOINTING = typer.Option(False, help="Recompute each decoder layer in backward: less activation "
                                        "memory for long blocks, about a third more compute.")
COMPILE = typer.Option(False, "--compile", help="torch.compile the model for training (inductor): the first step "
                       "compiles it; faster steps after (README: Benchmarks).")


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
             resume: bool = RESUME, overwrite: bool = OVERWRITE,
             progress: bool = PROGRESS):
    """All-domain continual pre-training (CPT) on the pre-training domains' behaviour text."""
    positive(epochs=epochs, tokens=tokens, batch_tokens=batch_tokens, block_len=block_len, micro_batch=micro_batch)
    rank, world, device = setup_distributed()
    ds = dataset(data, rank)
    start = base_model(model, data, rank)
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
    cfg = TrainConfig(steps, accum, lr, schedule=schedule_options(schedule, warmup, anneal, anneal_shape, lr_floor),
                      precision=precision, seed=seed, save_every=save_every, eval_every=eval_every, progress=progress,
                      shard=shard, activation_checkpointing=activation_checkpointing, compile=compiled)
    config = {"command": "pretrain", "data": str(data), "data_fingerprint": ds.fingerprint, "model": str(start),
              "tokenizer_fingerprint": tokenizer.fingerprint(), "kinds": split_list(kinds), "cpt_tokens": len(stream),
              "block_len": block_len, "micro_batch": micro_batch, "batch_tokens": batch_tokens,
              "train_tokens": steps * batch_tokens, "val_users": val_users, "train": run_settings(cfg)}
    check(cfg, device, world, context_of(start), block_len, "--block-len", str(start))
    net = Decoder.from_pretrained(start)  # on --resume, train() loads the checkpoint's weights into it
    pretrain_domains = [k for k, d in ds.domains.items() if d.role == "pretrain"]
    cases = {k: evaluation.sample(eval_cases(ds, k, VALID), val_users, seed) for k in pretrain_domains}

    def validate(m):
        losses = {k: target_loss(m, encoder, ds, c, k) for k, c in cases.items() if c}
        return {"val_loss": float(np.mean(list(losses.values()))), "per_domain": losses}

    run = open_run(out, config, resume, overwrite, rank)  # only now: a start that fails before leaves nothing behind
    say(f"CPT on {', '.join(pretrain_domains)}: {len(stream):,} tokens of {'+'.join(split_list(kinds))} sequences, "
        f"{steps} steps of {batch_tokens:,} tokens ({accum} micro-batches), {net.config.n_params / 1e6:.1f}M params")
    summary = run_training(net, tokenizer, blocks, cfg, run, device, rank, world, resume, validate)
    if rank == 0:
        write_json(run / "results.json", {"config": config, "training": summary})
        say(f"done: final loss {summary['loss']:.4f}, validation loss {summary['validation']['val_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s, model in {run / 'final'}")


def positive(**options) -> None:
    """Refuse counts and amounts that must be > 0 (None = not given), naming the option."""
    for name, value in options.items():
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a value > 0")


def context_of(start: Path) -> int:
    """The longest sequence the checkpoint at `start` computes exactly."""
    return config_from_hf(read_json(start / "config.json"), str(start / "config.json")).context


def run_settings(cfg: TrainConfig) -> dict:
    settings = asdict(cfg)
    settings.pop("progress")  # presentation, not part of the run
    settings.pop("activation_checkpointing")  # memory, not math: a resumed run may switch it
    if not settings["compile"]:  # recorded only when on, so runs from before the option read back the same
        settings.pop("compile")
    return settings


def run_training(net, tokenizer, data, cfg, run, device, rank, world, resume, validate) -> dict:
    try:
        return train(net, tokenizer, data, cfg, run, device=device, rank=rank, world=world, resume=resume,
                     validate=validate)
    except Interrupted as stop:
        say(f"[yellow]{stop}")
        sys.exit(130)


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
             resume: bool = RESUME, overwrite: bool = OVERWRITE,
             progress: bool = PROGRESS):
    """Supervised fine-tuning on one domain, validation-selected, then the full-ranking test evaluation."""
    positive(epochs=epochs, batch_tokens=batch_tokens, micro_tokens=micro_tokens, window=window)
    if batch_tokens % micro_tokens:
        raise UserError(f"--batch-tokens {batch_tokens} must be a multiple of --micro-tokens ({micro_tokens})")
    rank, world, device = setup_distributed()
    ds = dataset(data, rank)
    ds.domain(domain)
    start = model or DEFAULT_CPT / "final"
    if not (start / "config.json").exists():
        raise UserError(f"{start}: no checkpoint; run `python cprec.py pretrain` first or pass --model")
    out = out or Path(f"runs/finetune-{domain}")
    tokenizer = Tokenizer.from_pretrained(start)
    encoder = Encoder(tokenizer)
    sequences = train_sequences(ds, domain)
    if not 0 < users_fraction <= 1:
        raise UserError(f"--users-fraction {users_fraction}: expected a value in (0, 1]")
    sequences = evaluation.sample(sequences, max(1, round(users_fraction * len(sequences))), seed)
    examples = Examples(sft_examples(ds, encoder, sequences, domain, window, progress), micro_tokens, tokenizer.pad_id,
                        seed)
    accum = batch_tokens // micro_tokens
    per_epoch = MicroBatches(examples).epoch_size()
    steps = math.ceil(epochs * per_epoch / accum)
    lr, warmup = fitting_defaults(start, lr, warmup, steps, schedule, anneal)
    cfg = TrainConfig(steps, accum, lr, schedule=schedule_options(schedule, warmup, anneal, anneal_shape, lr_floor),
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
    run = open_run(out, config, resume, overwrite, rank)  # only now: a start that fails before leaves nothing behind
    say(f"SFT on {domain}: {len(sequences):,} users, {len(examples.examples):,} examples ({config['padding']:.1%} "
        f"padding), {steps} steps ({accum} micro-batches each), validation every {cfg.eval_every} steps on "
        f"{val_users or 'all'} users")
    summary = run_training(net, tokenizer, examples, cfg, run, device, rank, world, resume,
                           lambda m: evaluation.evaluate(m, encoder, ds, domain, split="valid", users=val_users,
                                                         **options)["model"])
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
                                                        "runs/eval/MODEL-DOMAIN-SPLIT.json)."),
                     progress: bool = PROGRESS):
    """Full-ranking evaluation of a checkpoint on a domain, beside the popularity baseline."""
    if users < 0:  # --beams and --split are checked by the evaluation itself
        raise UserError(f"--users {users}: expected 0 (all users) or a positive number")
    if window < 1:
        raise UserError(f"--window {window}: expected a positive number of history items")
    out = out or Path("runs/eval") / f"{model.name}-{domain}-{split}{'-exact' if exact else ''}.json"
    if out.exists() and not (out.is_file() and is_result(out)):
        raise UserError(f"{out}: exists and is not an evaluation result; choose another --out (it was left as is)")
    _, _, device = setup_distributed()
    ds = load_dataset(data)
    ds.domain(domain)
    net = Decoder.from_pretrained(model, device=device)
    encoder = Encoder(Tokenizer.from_pretrained(model))
    with autocast(resolve_precision(precision, device), device):
        result = evaluation.evaluate(net, encoder, ds, domain, split=split, beams=beams, exact=exact, users=users,
                                     seed=seed, mask_history=mask_history, window=window, progress=progress)
    save_result(result, out, {"model": str(model), "data_fingerprint": ds.fingerprint})
    show(result)


@app.command("recommend")
def recommend_command(model: Path = typer.Option(..., help="Checkpoint: fine-tuned, or CPT for zero-shot."),
                      domain: str = typer.Option(..., help="Domain whose catalogue is recommended from."),
                      data: Path = typer.Option(DEFAULT_DATA, help="Dataset (its titles, users and catalogues)."),
                      history: Optional[list[str]] = typer.Option(None, help="A title in the user's history, oldest "
                                                                  "first; repeat the option. Any domain's titles."),
                      user: Optional[str] = typer.Option(None, help="Use this dataset user's history instead."),
                      k: int = typer.Option(10, "--k", "-k", help="Items to recommend."),
                      exclude_history: bool = typer.Option(False, help="Never recommend an item of the history."),
                      window: int = typer.Option(20, help="History items in a prompt (the last ones)."),
                      beams: int = typer.Option(20, help="Beam width; max(k, beams) is used."),
                      input_file: Optional[Path] = typer.Option(None, "--input", help='JSONL of histories: {"id": ..., '
                                                                '"titles" or "items" (ids): [...]} a line.'),
                      output_file: Optional[Path] = typer.Option(None, "--output",
                                                                 help="JSONL of recommendations (with --input)."),
                      batch_size: int = typer.Option(256, help="Histories read and ranked at a time (--input)."),
                      overwrite: bool = typer.Option(False, help="Replace an existing --output."),
                      json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
                      precision: str = PRECISION,
                      progress: bool = PROGRESS):
    """Recommend the top-K items of a domain after a history of titles, a dataset user's history, or each history
    of a JSONL file, by the same prompt and trie-constrained beam search as evaluation."""
    from recommend import Recommender, recommend_file
    if (input_file is None) != (output_file is None):
        raise UserError("--input and --output go together: histories in, recommendations out")
    if input_file is not None and (history or user):
        raise UserError("--input replaces --history and --user; give one of them")
    if input_file is None and bool(history) == (user is not None):
        raise UserError("give the history: --history TITLE (repeatable), --user ID, or --input FILE --output FILE")
    if output_file is not None and output_file.exists() and (output_file.is_dir() or not overwrite):
        raise UserError(f"{output_file}: already exists" + ("" if output_file.is_dir() else
                                                            "; pass --overwrite to replace it"))
    if batch_size < 1 or k < 1:
        raise UserError(f"--k {k} and --batch-size {batch_size}: expected at least 1")
    _, _, device = setup_distributed()
    ds = load_dataset(data)
    ds.domain(domain)
    rec = Recommender(Decoder.from_pretrained(model, device=device), Encoder(Tokenizer.from_pretrained(model)), ds,
                      window=window, beams=beams, precision=precision)
    if input_file is not None:
        output_file.parent.mkdir(parents=True, exist_ok=True)
        stats = recommend_file(rec, input_file, output_file, domain, k, exclude_history, batch_size, progress)
        say(f"wrote {stats['users']:,} users' top {k} to {output_file}")
        if stats["malformed"]:
            more = stats["malformed"] - len(stats["first_malformed"])
            say(f"[yellow]skipped {stats['malformed']:,} malformed line(s) of {stats['lines']:,}: "
                + "; ".join(stats["first_malformed"]) + (f"; and {more:,} more" if more else ""))
        return
    items = rec.user_history(user, domain) if user is not None else [rec.find(t, domain) for t in history]
    kind = rec.prompt(items, domain)[1]
    top = rec.recommend_items([items], domain, k, exclude_history)[0]
    shown = items[-window:] if window else items[:0]
    if json_output:
        print(json.dumps({"domain": domain, "model": str(model), "prompt": kind, "beams": max(k, beams),
                          "history": [{"item_id": ds.item_ids[i], "title": ds.titles[i],
                                       "domain": list(ds.domains)[ds.item_domain[i]]} for i in shown],
                          "recommendations": [{"rank": r + 1, **asdict(x)} for r, x in enumerate(top)]},
                         ensure_ascii=False, indent=2))
        return
    table = Table("#", "item", "title", "log-prob", "share", title=f"top {len(top)} of {ds.domain(domain).name}")
    for r, x in enumerate(top, 1):
        table.add_row(str(r), x.item_id, x.title, f"{x.logprob:.3f}", f"{x.share:.1%}")
    console.print(table)
    console.print(f"after {len(shown)} history items ({kind} prompt: "
                  + ("the domain's, as in evaluation" if kind == "domain" else "items of other domains, tagged")
                  + f"); trie-constrained beam search, {max(k, beams)} beams over all {len(rec.catalogue(domain)[0]):,}"
                  f" items; history {'excluded' if exclude_history else 'not excluded'}", highlight=False,
                  soft_wrap=True)


@app.command("baseline")
def baseline_command(domain: str = typer.Option(..., help="Domain to train on and rank (its whole catalogue)."),
                     data: Path = typer.Option(DEFAULT_DATA, help="Dataset; the built-in world is created if missing."),
                     out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/baseline-DOMAIN)."),
                     max_len: int = typer.Option(200, help="Items of history the model sees (SASRec: 200 on "
                                                 "MovieLens, 50 on sparse data)."),
                     dim: int = typer.Option(64, help="Hidden size (= item embedding size)."),
                     layers: int = typer.Option(2, help="Self-attention blocks."),
                     heads: int = typer.Option(1, help="Attention heads."),
                     ffn: int = typer.Option(64, help="MLP intermediate size (SASRec: = hidden size)."),
                     dropout: float = typer.Option(0.2, help="Dropout on embeddings and block outputs (SASRec: 0.2 "
                                                   "dense, 0.5 sparse data)."),
                     positions: str = typer.Option("rope", help="rope (the decoder's; better on MovieLens) or learned "
                                                   "(SASRec's)."),
                     lr: float = typer.Option(1e-3, help="Adam learning rate."),
                     batch: int = typer.Option(128, help="Users per step."),
                     epochs: int = typer.Option(200, help="Most epochs; early stopping usually ends sooner."),
                     patience: int = typer.Option(10, help="Epochs without a better validation NDCG@10 before "
                                                  "stopping."),
                     val_users: int = typer.Option(0, help="Validation users, a seeded subset (0 = all)."),
                     mask_history: bool = typer.Option(False, help="Exclude items already in the history."),
                     precision: str = typer.Option("fp32", help="fp32, bf16, auto (bf16 where supported)."),
                     seed: int = typer.Option(0, help="Seed for initialisation, dropout and data order."),
                     resume: bool = RESUME, overwrite: bool = OVERWRITE):
    """SASRec-style item-ID baseline on the LLM's split: trained with early stopping on validation NDCG@10, then
    the same full-ranking test evaluation, results and per-user ranks as every other command."""
    from baseline import BaselineConfig, train_baseline
    _, _, device = setup_distributed()
    ds = dataset(data)
    ds.domain(domain)
    cfg = BaselineConfig(max_len=max_len, dim=dim, layers=layers, heads=heads, ffn=ffn, dropout=dropout,
                         positions=positions, lr=lr, batch=batch, epochs=epochs, patience=patience,
                         val_users=val_users, mask_history=mask_history,
                         precision=resolve_precision(precision, device), seed=seed)
    cfg.check()
    config = {"command": "baseline", "domain": domain, "data": str(data), "data_fingerprint": ds.fingerprint,
              "baseline": asdict(cfg)}
    run = open_run(out or Path(f"runs/baseline-{domain}"), config, resume, overwrite)
    try:
        summary, result = train_baseline(ds, domain, cfg, run, device, resume, say)
    except Interrupted as stop:
        say(f"[yellow]{stop}")
        sys.exit(130)
    say(f"best epoch {summary['best_epoch']} of {summary['epochs']} (validation NDCG@10 "
        f"{summary['best_valid_ndcg@10']:.4f}), {summary['seconds']:.1f} s, {summary['sequences_per_s']:,.0f} "
        "training sequences/s")
    save_result(result, run / "results.json", {"config": config, "training": summary})
    show(result)


@app.command("reproduce")
def reproduce_command(out: Path = typer.Option(Path("runs/reproduce"), help="Directory of all runs and the report."),
                      data: Path = typer.Option(DEFAULT_DATA, help="Dataset (default: the built-in world)."),
                      model: Optional[Path] = typer.Option(None, help="Base model (default: models/small)."),
                      domain: str = typer.Option("games", help="Downstream domain of the comparisons."),
                      cpt_tokens: int = typer.Option(1_000_000, help="Token budget of each CPT run."),
                      sft_epochs: float = typer.Option(5.0, help="Epochs of each SFT run."),
                      seed: int = typer.Option(0, help="One seed for every run."),
                      resume: bool = typer.Option(False, help="Reuse the finished runs of an earlier reproduction."),
                      overwrite: bool = typer.Option(False, help="Replace an earlier reproduction."),
                      core: bool = typer.Option(False, help="Only zero-shot before/after CPT and SFT with 10% of the "
                                                "users from either start (a pretrained LLM on CPU budgets)."),
                      test_users: int = typer.Option(0, help="Evaluate a seeded subset of test users (0 = all)."),
                      val_users: Optional[int] = typer.Option(None, help="Validation users of each SFT run "
                                                              "(default: finetune's 500; a large LLM on CPU: fewer).")):
    """Run the comparisons behind CPRec's claims (zero-shot, CPT vs no CPT, limited SFT, sequence kinds, schedules)
    with one budget and seed, and write runs/reproduce/report.md."""
    from reproduce import reproduce
    dataset(data).domain(domain)
    start = base_model(model, data, 0)
    Tokenizer.from_pretrained(start)  # a broken model is refused here rather than as the first of many failed runs
    Decoder.from_pretrained(start)
    for option, count in (("--test-users", test_users), ("--val-users", val_users)):
        if count is not None and count < 0:
            raise UserError(f"{option} {count}: expected 0 (all) or a positive count")
    report = reproduce(out, data, start, domain, cpt_tokens, sft_epochs, seed, resume, overwrite, core, test_users,
                       val_users)
    console.print((out / "report.md").read_text(), highlight=False)
    say(f"report in {out / 'report.md'} ({report['seconds'] / 60:.1f} min)")


def is_result(path: Path) -> bool:
    """An earlier result of save_result (a JSON object with a protocol), which a new evaluation may replace."""
    try:
        result = read_json(path)
    except UserError:
        return False
    return isinstance(result, dict) and "protocol" in result


def save_result(result: dict, path: Path, extra: dict) -> None:
    """Summary JSON plus a JSONL of per-user ranks beside it (for significance tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    per_user = result.pop("per_user")
    with open(path.with_name(path.stem + "-per_user.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in per_user)
    write_json(path, {**extra, **result})
    say(f"results in {path}")


def show(result: dict) -> None:
    keys = [k for k in result["model"] if k != "mrr"] + ["mrr"]
    table = Table("ranker", *[k.replace("recall", "R").replace("ndcg", "N").upper() for k in keys])
    for name in ("model", "popularity"):
        table.add_row(name, *[f"{result[name][k]:.4f}" for k in keys])
    console.print(table)
    console.print(f"protocol: {result['protocol']}", highlight=False, soft_wrap=True)
    console.print(f"{result['users_per_s']:.1f} users/s", highlight=False)


def main() -> None:
    """Run a command; bad input of any kind (a file, a record, an option, a misspelt option) ends as one line on
    stderr and exit status 2, never a traceback or a usage box."""
    try:
        sys.exit(app(standalone_mode=False) or 0)  # --help returns 0 here; click's own error boxes are ours below
    except getattr(clicks, "NoArgsIsHelpError", ()) as e:  # click >= 8.2
        e.show()  # `cprec.py` or `cprec.py prepare` alone: the help text, as before
        sys.exit(e.exit_code)
    except clicks.ClickException as e:
        command = e.ctx.command_path if getattr(e, "ctx", None) else Path(sys.argv[0]).name
        fail(f"{e.format_message()} (see `{command} --help`)")
    except typer.Abort as e:  # Ctrl-C outside training (which saves and exits 130 itself)
        if isinstance(e.__cause__, EOFError):
            raise e.__cause__ from None  # click takes any EOFError for a closed prompt; here a file was cut short
        say("[yellow]interrupted")
        sys.exit(130)
    except UserError as e:
        fail(str(e))


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)  # [brackets] are text
    sys.exit(2)


if __name__ == "__main__":
    main()
