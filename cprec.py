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
from rich.table import Table

import eval as evaluation
from common import UserError, read_json, write_json
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
from model import Decoder, ModelConfig, config_from_hf, create_model
from schedule import Schedule, validate
from tokenizer import Tokenizer
from train import (
    Interrupted,
    MicroBatches,
    TrainConfig,
    autocast,
    check_split,
    latest_checkpoint,
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
                downstream: str = typer.Option("", help="Categories kept out of CPT (comma-separated)."),
                k_core: int = typer.Option(0, help="Iterative k-core filter per domain (0 = off)."),
                min_len: int = typer.Option(0, help="Drop a user's domain history shorter than this (0 = off)."),
                strict: bool = typer.Option(False, help="Stop at the first malformed line instead of counting it."),
                overwrite: bool = typer.Option(False, help="Replace an existing dataset.")):
        from prepare import convert_amazon
        refuse_existing(out, overwrite)
        report(convert_amazon(version, source, split_list(categories), out, downstream=split_list(downstream),
                              k_core=k_core, min_len=min_len, strict=strict), out)
    command.__doc__ = f"Convert Amazon Reviews {version} categories (several categories = several domains)."
    return command


prepare_app.command("amazon2023")(amazon_command(2023))
prepare_app.command("amazon2018")(amazon_command(2018))


@prepare_app.command("recbole")
def prepare_recbole(source: Path = typer.Argument(..., help="RecBole dataset folder with NAME.inter and NAME.item."),
                    out: Path = typer.Option(..., help="Output dataset directory."),
                    domain: Optional[str] = typer.Option(None, help="Domain key (default: the dataset name)."),
                    title_field: Optional[str] = typer.Option(None, help="Item title column (default: auto)."),
                    k_core: int = typer.Option(0, help="Iterative k-core filter (0 = off)."),
                    min_len: int = typer.Option(0, help="Drop users with fewer interactions (0 = off)."),
                    strict: bool = typer.Option(False, help="Stop at the first malformed line."),
                    overwrite: bool = typer.Option(False, help="Replace an existing dataset.")):
    """Convert RecBole atomic files (MovieLens and RecBole's whole collection) into one domain."""
    from prepare import convert_recbole
    refuse_existing(out, overwrite)
    report(convert_recbole(source, out, domain=domain, title_field=title_field, k_core=k_core, min_len=min_len,
                           strict=strict), out)


def refuse_existing(out: Path, overwrite: bool) -> None:
    if (out / "manifest.json").exists() and not overwrite:
        raise UserError(f"{out}: a dataset already exists there; pass --overwrite to replace it")


def report(manifest: dict, out: Path) -> None:
    title = f"{out} ({manifest['fingerprint']})"
    table = Table("domain", "name", "role", "users", "items", "interactions", title=title)
    for d in manifest["domains"]:
        table.add_row(d["key"], d["name"], d["role"], f"{d['users']:,}", f"{d['items']:,}", f"{d['interactions']:,}")
    console.print(table)
    if manifest.get("report"):
        console.print_json(data=manifest["report"])


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
    if (out / "config.json").exists() and not overwrite:
        raise UserError(f"{out}: a model already exists there; pass --overwrite to replace it")
    config = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                         head_dim=dim // heads, intermediate_size=ffn)
    model = create_model(tokenizer_corpus(dataset(data)), out, config, seed)
    say(f"wrote {out}: {model.config.n_params / 1e6:.2f}M parameters, vocabulary {model.config.vocab_size}")


def base_model(path: Optional[Path], data: Path, rank: int) -> Path:
    """--model, or the default small model, created on first use."""
    if path is not None:
        return path
    if not (DEFAULT_MODEL / "config.json").exists():
        if rank == 0:
            say(f"creating the default small model in {DEFAULT_MODEL} (once)")
            create_model(tokenizer_corpus(dataset(data)), DEFAULT_MODEL, ModelConfig())
        barrier()
    return DEFAULT_MODEL


# --------------------------------------------------------------------------------------------------- training
def schedule_options(schedule, warmup, anneal, anneal_shape, lr_floor) -> Schedule:
    return Schedule(name=schedule, warmup=warmup, anneal=anneal, shape=anneal_shape, floor=lr_floor)


SCHEDULE = typer.Option("wsa", help="wsa (Warmup-Stable-Annealing), cosine, linear or constant.")
WARMUP = typer.Option(0.02, help="Warmup steps: a count, or a fraction of all steps if < 1.")
ANNEAL = typer.Option(0.2, help="WSA annealing steps: a count, or a fraction if < 1; 0 = warmup-stable only.")
SHAPE = typer.Option("1-sqrt", help="WSA annealing shape: 1-sqrt, cosine, linear or exp.")
FLOOR = typer.Option(0.1, help="Learning-rate factor reached at the last step.")
PRECISION = typer.Option("auto", help="auto (bf16 where supported, else fp32), fp32, bf16, fp16 (CUDA).")
RESUME = typer.Option(False, help="Continue the run in --out from its latest checkpoint, exactly.")
OVERWRITE = typer.Option(False, help="Replace a run already in --out.")


@app.command()
def pretrain(data: Path = typer.Option(DEFAULT_DATA, help="Dataset; the built-in world is created if missing."),
             model: Optional[Path] = typer.Option(None, help="HF checkpoint to start from (default: models/small, "
                                                  "created if missing)."),
             out: Path = typer.Option(DEFAULT_CPT, help="Run directory."),
             kinds: str = typer.Option("domain,mixed", help="CPT sequence kinds: domain, mixed or both."),
             epochs: float = typer.Option(2.0, help="Passes over the CPT text (ignored if --tokens is given)."),
             tokens: Optional[int] = typer.Option(None, help="Training budget in tokens."),
             lr: float = typer.Option(1e-3, help="Peak learning rate."),
             schedule: str = SCHEDULE, warmup: float = WARMUP, anneal: float = ANNEAL, anneal_shape: str = SHAPE,
             lr_floor: float = FLOOR,
             batch_tokens: int = typer.Option(2048, help="Tokens per optimizer step over all processes (small "
                                              "batches learn the most per token here; raise it with the model)."),
             block_len: int = typer.Option(256, help="Tokens per packed block."),
             micro_batch: int = typer.Option(8, help="Blocks per micro-batch and process."),
             precision: str = PRECISION, seed: int = typer.Option(0, help="Seed for data order and initialisation."),
             save_every: int = typer.Option(200, help="Steps between resumable checkpoints (0 = at the end)."),
             eval_every: int = typer.Option(0, help="Steps between validation losses (0 = at the end)."),
             val_users: int = typer.Option(100, help="Validation users per pre-training domain."),
             resume: bool = RESUME, overwrite: bool = OVERWRITE,
             progress: bool = typer.Option(True, help="Show a progress bar.")):
    """All-domain continual pre-training (CPT) on the pre-training domains' behaviour text."""
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
    steps = max(1, math.ceil((tokens or epochs * blocks.n * block_len) / batch_tokens))
    cfg = TrainConfig(steps, accum, lr, schedule=schedule_options(schedule, warmup, anneal, anneal_shape, lr_floor),
                      precision=precision, seed=seed, save_every=save_every, eval_every=eval_every, progress=progress)
    config = {"command": "pretrain", "data": str(data), "data_fingerprint": ds.fingerprint, "model": str(start),
              "tokenizer_fingerprint": tokenizer.fingerprint(), "kinds": split_list(kinds), "cpt_tokens": len(stream),
              "block_len": block_len, "micro_batch": micro_batch, "batch_tokens": batch_tokens,
              "train_tokens": steps * batch_tokens, "val_users": val_users, "train": run_settings(cfg)}
    check(cfg, device, world, start, block_len, "--block-len")
    run = open_run(out, config, resume, overwrite, rank)
    net = Decoder.from_pretrained(latest_checkpoint(run) if resume else start)
    pretrain_domains = [k for k, d in ds.domains.items() if d.role == "pretrain"]
    cases = {k: sample(eval_cases(ds, k, VALID), val_users, seed) for k in pretrain_domains}

    def validate(m):
        losses = {k: target_loss(m, encoder, ds, c, k) for k, c in cases.items() if c}
        return {"val_loss": float(np.mean(list(losses.values()))), "per_domain": losses}

    say(f"CPT on {', '.join(pretrain_domains)}: {len(stream):,} tokens of {'+'.join(split_list(kinds))} sequences, "
        f"{steps} steps of {batch_tokens:,} tokens ({accum} micro-batches), {net.config.n_params / 1e6:.1f}M params")
    summary = run_training(net, tokenizer, blocks, cfg, run, device, rank, world, resume, validate)
    if rank == 0:
        write_json(run / "results.json", {"config": config, "training": summary})
        say(f"done: final loss {summary['loss']:.4f}, validation loss {summary['validation']['val_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s, model in {run / 'final'}")


def check(cfg: TrainConfig, device: torch.device, world: int, start: Path, longest: int, option: str) -> None:
    """Refuse bad options before a run directory is created for them: schedule, precision, the split of each step's
    micro-batches over the processes, and sequences longer than the model's context."""
    validate(cfg.schedule, cfg.steps)
    resolve_precision(cfg.precision, device)
    check_split(cfg.accum, world)
    context = config_from_hf(read_json(start / "config.json"), str(start / "config.json")).context
    if longest > context:
        raise UserError(f"{option}: {longest}-token sequences exceed the context of {start} ({context} tokens)")


def run_settings(cfg: TrainConfig) -> dict:
    settings = asdict(cfg)
    settings.pop("progress")  # presentation, not part of the run
    return settings


def sample(cases: list, n: int, seed: int) -> list:
    if n and n < len(cases):
        return [cases[i] for i in sorted(np.random.default_rng(seed).choice(len(cases), n, replace=False))]
    return cases


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
             lr: float = typer.Option(1e-3, help="Peak learning rate."),
             schedule: str = typer.Option("cosine", help="wsa, cosine, linear or constant."),
             warmup: float = WARMUP, anneal: float = ANNEAL, anneal_shape: str = SHAPE, lr_floor: float = FLOOR,
             batch_tokens: int = typer.Option(2048, help="Padded tokens per optimizer step over all processes."),
             micro_tokens: int = typer.Option(2048, help="Padded tokens per micro-batch and process."),
             window: int = typer.Option(20, help="History items in a prompt."),
             eval_every: int = typer.Option(0, help="Steps between validations (0 = once per epoch)."),
             val_users: int = typer.Option(500, help="Validation users (0 = all)."),
             test_users: int = typer.Option(0, help="Test users, a seeded random subset (0 = all)."),
             beams: int = typer.Option(20, help="Beam width of the evaluation (>= 20)."),
             mask_history: bool = typer.Option(False, help="Exclude items already in the history from rankings."),
             precision: str = PRECISION, seed: int = typer.Option(0, help="Seed for data order and user sampling."),
             save_every: int = typer.Option(0, help="Steps between resumable checkpoints (0 = at the end)."),
             resume: bool = RESUME, overwrite: bool = OVERWRITE,
             progress: bool = typer.Option(True, help="Show a progress bar.")):
    """Supervised fine-tuning on one domain, validation-selected, then the full-ranking test evaluation."""
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
    sequences = sample(sequences, max(1, round(users_fraction * len(sequences))), seed)
    examples = Examples(sft_examples(ds, encoder, sequences, domain, window, progress), micro_tokens, tokenizer.pad_id,
                        seed)
    accum = max(1, batch_tokens // micro_tokens)
    per_epoch = MicroBatches(examples).epoch_size()
    steps = max(1, math.ceil(epochs * per_epoch / accum))
    cfg = TrainConfig(steps, accum, lr, schedule=schedule_options(schedule, warmup, anneal, anneal_shape, lr_floor),
                      precision=precision, seed=seed, save_every=save_every,
                      eval_every=eval_every or max(1, math.ceil(per_epoch / accum)), select="ndcg@10",
                      progress=progress)
    config = {"command": "finetune", "domain": domain, "data": str(data), "data_fingerprint": ds.fingerprint,
              "model": str(start), "tokenizer_fingerprint": tokenizer.fingerprint(), "users_fraction": users_fraction,
              "train_users": len(sequences), "examples": len(examples.examples), "padding": examples.padding(),
              "window": window, "batch_tokens": batch_tokens, "micro_tokens": micro_tokens, "val_users": val_users,
              "test_users": test_users, "beams": beams, "mask_history": mask_history, "train": run_settings(cfg)}
    check(cfg, device, world, start, examples.longest, "--window")
    run = open_run(out, config, resume, overwrite, rank)
    net = Decoder.from_pretrained(latest_checkpoint(run) if resume else start)
    options = dict(beams=beams, seed=seed, mask_history=mask_history, window=window, progress=progress)
    say(f"SFT on {domain}: {len(sequences):,} users, {len(examples.examples):,} examples ({config['padding']:.1%} "
        f"padding), {steps} steps "
        f"({accum} micro-batches each), validation every {cfg.eval_every} steps on {val_users or 'all'} users")
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
                                                        "runs/eval/MODEL-DOMAIN-SPLIT.json).")):
    """Full-ranking evaluation of a checkpoint on a domain, beside the popularity baseline."""
    _, _, device = setup_distributed()
    ds = load_dataset(data)
    ds.domain(domain)
    net = Decoder.from_pretrained(model, device=device)
    encoder = Encoder(Tokenizer.from_pretrained(model))
    with autocast(resolve_precision(precision, device), device):
        result = evaluation.evaluate(net, encoder, ds, domain, split=split, beams=beams, exact=exact, users=users,
                                     seed=seed, mask_history=mask_history, window=window, progress=True)
    out = out or Path("runs/eval") / f"{model.name}-{domain}-{split}{'-exact' if exact else ''}.json"
    save_result(result, out, {"model": str(model), "data_fingerprint": ds.fingerprint})
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
                      overwrite: bool = typer.Option(False, help="Replace an earlier reproduction.")):
    """Run the comparisons behind CPRec's claims (zero-shot, CPT vs no CPT, limited SFT, sequence kinds, schedules)
    with one budget and seed, and write runs/reproduce/report.md."""
    from reproduce import reproduce
    dataset(data).domain(domain)
    report = reproduce(out, data, base_model(model, data, 0), domain, cpt_tokens, sft_epochs, seed, resume,
                       overwrite)
    console.print((out / "report.md").read_text(), highlight=False)
    say(f"report in {out / 'report.md'} ({report['seconds'] / 60:.1f} min)")


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
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
