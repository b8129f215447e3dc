"""The project's benchmarks: `python -m bench --help`. Each section times one area side by side with its reference
in one run and prints a table (--json writes every row with the machine and the MFU peaks). What each column means,
and the figures measured so far with their commands and machines: docs/benchmarks.md.

Sections (area files in bench/): decoder (ours vs transformers), train, loss, fsdp, load and memory (training.py), eval,
recommend, catalogue, movies and llm (ranking.py), prepare, scale and scale-eval (data.py), baseline (baseline.py:
ours beside RecBole's SASRec), generate (generate.py: our ranking beside transformers' generate with a prefix trie).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from bench.baseline import bench_baseline
from bench.data import bench_prepare, bench_scale, bench_scale_eval
from bench.decoder import bench_decoder
from bench.generate import bench_generate
from bench.harness import DECODER, DTYPES, QUICK, Options, choose_peaks, console, measure_peaks
from bench.ranking import bench_catalogue, bench_eval, bench_llm, bench_movies, bench_recommend
from bench.training import bench_fsdp, bench_load, bench_loss, bench_memory, bench_train
from infra.cli import split_list
from infra.config import DEFAULT_CPT, DEFAULT_DATA, DEFAULT_MODEL, ModelConfig
from infra.device import machine
from infra.files import UserError, writable

SECTIONS: dict[str, Callable[[Options], list[dict]]] = {
    "decoder": bench_decoder, "train": bench_train, "loss": bench_loss, "eval": bench_eval,
    "recommend": bench_recommend, "catalogue": bench_catalogue, "movies": bench_movies, "prepare": bench_prepare,
    "fsdp": bench_fsdp, "load": bench_load, "memory": bench_memory, "llm": bench_llm, "scale": bench_scale,
    "scale-eval": bench_scale_eval, "baseline": bench_baseline, "generate": bench_generate}
# Only when asked: scale writes 3 corpora of up to 8 GB, scale-eval 2 of up to 1.3 GB; baseline needs RecBole (an
# extra) and trains for minutes; generate ranks with transformers' beam search, minutes on the LLM; load writes a
# 1 GB checkpoint and holds up to 2 fp32 copies of it per process.
DEFAULT = [name for name in SECTIONS if name not in ("scale", "scale-eval", "baseline", "generate", "load")]
NUM, PCT, SPREAD = "{:,.0f}".format, "{:.1%}".format, ("spread", "spread", "±{:.0%}".format)
SPEED = [("precision", "precision", str), ("tokens_per_s", "tokens/s", NUM), ("mfu", "MFU", PCT),
         ("peak_mem_mib", "step peak mem MiB", NUM)]
COLUMNS = {  # (row key, header, format); format str = a text column
    "decoder": [("impl", "impl", str), ("mode", "mode", str), *SPEED, SPREAD, ("ratio", "ratio", "{:.2f}x".format)],
    "train": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e6:,.1f}M"),
              ("batch", "tokens/step", str), *SPEED, ("peak_total_mib", "peak MiB", NUM), SPREAD],
    "loss": [("impl", "loss", str), ("tokens", "tokens", NUM), *[c for c in SPEED if c[0] != "mfu"], SPREAD],
    "eval": [("ranker", "ranker", str), ("precision", "precision", str), ("items", "items", NUM),
             ("users", "users", NUM), ("users_per_s", "users/s", "{:,.1f}".format),
             ("speedup", "speed-up", "{:.1f}x".format), ("overlap", "top-10 overlap", PCT),
             ("same_order", "same top-10 order", PCT)],
    "recommend": [("precision", "precision", str), ("items", "items", NUM), ("calls", "calls", NUM),
                  ("p50_ms", "p50 ms", "{:,.1f}".format), ("p95_ms", "p95 ms", "{:,.1f}".format),
                  ("users", "batch users", NUM), ("users_per_s", "batch users/s", "{:,.1f}".format)],
    "catalogue": [("ranker", "ranker", str), ("precision", "precision", str), ("items", "items", NUM),
                  ("users", "users", NUM), ("trie_s", "trie build s", "{:.2f}".format),
                  ("trie_peak_mib", "trie build peak MiB", NUM), ("users_per_s", "users/s", "{:,.2f}".format),
                  ("resident_mib", "resident MiB", NUM), ("peak_mem_mib", "ranking peak MiB", NUM)],
    "fsdp": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e6:,.1f}M"),
             ("processes", "processes", str), ("checkpointing", "act. ckpt", str), ("batch", "tokens/step", str),
             ("precision", "precision", str), ("step_s", "step s", "{:.3f}".format), ("tokens_per_s", "tokens/s", NUM),
             ("mfu", "MFU", PCT), ("state_mib", "state MiB/process", NUM), ("peak_total_mib", "peak MiB/process", NUM),
             SPREAD, ("note", "note", str)],
    "load": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e6:,.1f}M"),
             ("stored_mib", "stored MiB (bf16)", NUM), ("processes", "processes", str), ("loader", "loader", str),
             ("peak_mib", "peak RSS growth MiB/process", NUM), ("ratio", "÷ stored", "{:.2f}".format)],
    "memory": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e9:,.2f}B"), ("gpus", "GPUs", str),
               ("shard", "shard", str), ("training", "training", str), ("checkpointing", "act. ckpt", str),
               ("tokens", "tokens/micro-batch", NUM), ("state_gib", "state GiB", "{:.1f}".format),
               ("activations_gib", "activations GiB", "{:.1f}".format), ("total_gib", "total GiB", "{:.1f}".format),
               ("fits", "fits", str)],
    "llm": [("model", "model", str), ("params", "params", lambda n: f"{n / 1e6:,.1f}M"),
            ("precision", "precision", str), ("cpt_tokens_per_s", "CPT tokens/s", NUM),
            ("sft_tokens_per_s", "SFT tokens/s", NUM), ("users", "eval users", NUM),
            ("users_per_s", "eval users/s", "{:,.2f}".format), ("ndcg", "N@10", "{:.3f}".format)],
    "movies": [("ranker", "ranker", str), ("precision", "precision", str), ("items", "items", NUM),
               ("users", "users", NUM), ("users_per_s", "users/s", "{:,.1f}".format),
               ("passes", "each pass", lambda v: " / ".join(f"{x:.1f}" for x in v)),
               ("vs_exact", "vs exact", "{:.1f}x".format),
               ("overlap", "top-10 overlap", PCT), ("same_order", "same top-10 order", PCT)],
    "scale": [("reviews", "reviews", NUM), ("phase", "phase", str), ("records", "records", NUM), ("unit", "of", str),
              ("seconds", "seconds", "{:.1f}".format), ("records_per_s", "records/s", NUM),
              ("peak_rss_mib", "peak RSS MiB", NUM), ("rss_anon_mib", "+ private MiB/rank", NUM),
              ("rss_file_mib", "+ shared MiB/rank", NUM), ("stream_mib", "stream MiB", NUM)],
    "scale-eval": [("items", "items", NUM), ("title_tokens", "tokens/title", "{:.1f}".format), ("users", "users", NUM),
                   ("users_per_s", "users/s", "{:,.2f}".format), ("rank_s", "ranking s", "{:.1f}".format),
                   ("eval_s", "evaluate s", "{:.1f}".format), ("peak_rss_mib", "evaluate peak RSS MiB", NUM),
                   ("finetune_s", "finetune s", "{:.0f}".format), ("ndcg", "N@10", "{:.4f}".format),
                   ("popularity_ndcg", "popularity N@10", "{:.4f}".format)],
    "baseline": [("domain", "domain", str), ("impl", "SASRec", str), ("window", "window", NUM),
                 ("epochs", "epochs", NUM), ("best_epoch", "best epoch", NUM), ("epoch_s", "s/epoch", "{:.2f}".format),
                 ("valid_s", "s/validation", "{:.2f}".format), ("to_best_s", "s to best", "{:.0f}".format),
                 *[(f"{p} {k}", f"{k.replace('recall', 'R').replace('ndcg', 'N')} {p}", "{:.4f}".format)
                   for p in ("unmasked", "masked") for k in ("ndcg@10", "recall@10", "recall@50")],
                 ("own ndcg@10", "RecBole's own N@10", "{:.4f}".format)],
    "generate": [("model", "model", str), ("ranker", "ranker", str), ("precision", "precision", str),
                 ("items", "items", NUM), ("users", "users", NUM), ("users_per_s", "users/s", "{:,.2f}".format),
                 ("ratio", "ours ×", "{:.1f}x".format), ("gflop_per_user", "GFLOP/user", "{:.2f}".format),
                 ("gflops", "GFLOP/s", "{:.1f}".format), ("overlap", "top-10 ∩ ours", PCT),
                 ("ndcg", "N@10", "{:.4f}".format), ("top10_logp", "top-10 log p", "{:.3f}".format),
                 ("higher", "higher: ours / same / generate",
                  lambda h: " / ".join(PCT(h[k]) for k in ("ours", "same", "generate"))),
                 ("exhaustive_same", "= exhaustive", PCT)],
    "prepare": [("phase", "phase", str), ("records", "records", NUM), ("seconds", "seconds", "{:.1f}".format),
                ("records_per_s", "records/s", NUM), ("rss_before_mib", "RSS before MiB", NUM),
                ("peak_rss_mib", "peak RSS MiB", NUM)],
}


def render(section: str, rows: list[dict]) -> Table:
    table = Table(title=section, title_justify="left")
    for _, header, fmt in COLUMNS[section]:
        table.add_column(header, justify="left" if fmt is str else "right")
    for row in rows:
        table.add_row(*(fmt(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS[section]))
    return table


def invalid(option: str, why: str) -> UserError:
    """A bad option, as one line (exit 2) before any section runs."""
    return UserError(f"Invalid value for {option}: {why}")


def counts(text: str | None, option: str) -> tuple[int, ...]:
    """A comma-separated list of counts >= 1 (empty when not given)."""
    try:
        values = tuple(int(x) for x in split_list(text or ""))
    except ValueError:
        values = ()
    if text and (not values or min(values) < 1):
        raise invalid(option, f"{text!r}: expected comma-separated counts >= 1, e.g. 1000,10000")
    return values


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
Opt = typer.Option


@app.command(help="Run benchmark sections; print a table per section (all rows also to --json).")
def main(
    only: Annotated[str, Opt(help=f"comma-separated sections of: {', '.join(SECTIONS)} [all but scale, scale-eval, "
                                  "baseline, generate and load]")] = ",".join(
        DEFAULT),
    device: Annotated[str, Opt(help="cpu or cuda[:i]")] = "cpu",
    threads: Annotated[int, Opt(help="torch threads; 0 = every core this process may use")] = 0,
    precisions: Annotated[str | None, Opt(help="fp32,bf16 (bf16 = autocast) [CPU: fp32,bf16; CUDA: bf16]")] = None,
    quick: Annotated[bool, Opt(help="smoke test: decoder shape d=64 L=2 T=64 B=4, train batch 64×4×1, "
                                    "20 eval users, 5k catalogue items, 20k prepare records; generate: 4 users, "
                                    "the small model only, a 150-user world unless the built-in one exists")] = False,
    shape: Annotated[str, Opt(help="decoder shape changes, e.g. dim=1024,seq=256; fields and defaults: "
                                   + ",".join(f"{k}={v}" for k, v in DECODER.items()))] = "",
    reps: Annotated[int | None, Opt(help="timed reps per step [5; quick 20]")] = None,
    warmup: Annotated[int, Opt(help="untimed reps first")] = 1,
    seed: Annotated[int, Opt(help="seed of weights, inputs, user subsets and synthetic reviews")] = 0,
    memory: Annotated[bool, Opt(help="measure each row's step peak memory (CPU: a process per row)")] = True,
    compiled: Annotated[bool, Opt("--compile", help="train section: also torch.compile each model, timed beside "
                                                    "eager")] = False,
    data: Annotated[Path, Opt(help="eval/recommend dataset, with a games domain [the built-in world]")] = DEFAULT_DATA,
    model: Annotated[Path | None, Opt(help=f"eval checkpoint [{DEFAULT_CPT / 'final'}, else {DEFAULT_MODEL}]")] = None,
    eval_users: Annotated[int | None, Opt(help="eval beam-search and recommend users [1,000; quick 20]")] = None,
    exact_users: Annotated[int, Opt(help="of those, users also scored exactly (slow)")] = 40,
    beams: Annotated[int, Opt(help="eval section's beam width (>= 20)")] = 20,
    catalogue_items: Annotated[int | None, Opt(help="synthetic catalogue items [100,000; quick 5,000]")] = None,
    movie_users: Annotated[int | None, Opt(help="users of the movies section's beam searches [200; quick 8]")] = None,
    movie_reps: Annotated[int | None, Opt(help="movies section: passes over the users per ranker [3; quick 1]")] = None,
    prepare_records: Annotated[int | None, Opt(help="synthetic reviews [1,000,000; quick 20,000]")] = None,
    scale_reviews: Annotated[str | None, Opt(help="scale section: corpus sizes [1000000,4000000,16000000; quick "
                                                  "20000,40000]")] = None,
    scale_dir: Annotated[str | None, Opt(help="scale and scale-eval sections: where their datasets go [the temporary "
                                              "folder]")] = None,
    scale_eval_items: Annotated[str | None, Opt(help="scale-eval section: catalogue sizes [10000,100000; quick "
                                                     "500,2000]")] = None,
    scale_eval_users: Annotated[int | None, Opt(help="scale-eval section: test users [200; quick 10]")] = None,
    llm: Annotated[Path, Opt(help="pretrained LLM of the llm section [$CPREC_SMOLLM2, else /tmp/smollm2-135m-hf]")] = (
        Options.llm),
    llm_users: Annotated[int | None, Opt(help="eval users of the llm section [40; quick 4]")] = None,
    generate_users: Annotated[int | None, Opt(help="generate section: test users of the small model [60; quick "
                                                   "4]")] = None,
    generate_llm_users: Annotated[int, Opt(help="generate section: test users of the LLM (--llm)")] = 30,
    generate_exact_users: Annotated[int | None, Opt(help="generate section: of those, users also ranked exhaustively "
                                                         "(every item scored exactly) [10; quick 2]")] = None,
    generate_precision: Annotated[str, Opt(help="generate section: fp32, bf16 or auto (bf16 where the CPU has "
                                                "AVX-512 BF16, as `cprec.py evaluate`)")] = "auto",
    baseline_data: Annotated[Path, Opt(help="baseline section: dataset [data/ml-100k]")] = Options.baseline_data,
    baseline_domains: Annotated[str, Opt(help="baseline section: its domains, comma-separated")] = "ml-100k",
    baseline_epochs: Annotated[int, Opt(help="baseline section: most epochs of each, early stopping as usual")] = 200,
    baseline_recbole_epochs: Annotated[int, Opt(help="baseline section: most epochs of RecBole's, whose epoch is "
                                                     "every prefix of every user [0: --baseline-epochs]")] = 0,
    baseline_before: Annotated[bool, Opt(help="baseline section: also our defaults before the section existed")] = True,
    baseline_recbole: Annotated[bool, Opt(help="baseline section: RecBole's SASRec beside ours")] = True,
    baseline_window: Annotated[int, Opt(help="baseline section: both pipelines' history window [0: ours 200, "
                                             "RecBole's cut to the longest test history]")] = 0,
    peak_tflops: Annotated[float | None, Opt(help="MFU denominator for every precision, TFLOP/s "
                                                  "[CPU: measured matmul; CUDA: the GPU's datasheet]")] = None,
    json_path: Annotated[Path | None, Opt("--json", help="also write machine, peaks and rows here")] = None,
) -> None:
    sections = [name.strip() for name in only.split(",") if name.strip()]
    if unknown := [name for name in sections if name not in SECTIONS]:
        raise invalid("--only", f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    cuda = device.startswith("cuda")
    precision_list = [p.strip() for p in (precisions or ("bf16" if cuda else "fp32,bf16")).split(",")]
    if bad := [p for p in precision_list if p not in DTYPES]:
        raise invalid("--precisions", f"unknown precision(s) {bad}; choose fp32, bf16")
    try:
        s = dict(QUICK if quick else DECODER)
        s.update({k.strip(): int(v) for k, v in (kv.split("=") for kv in shape.split(",") if kv.strip())})
        seq, batch = s.pop("seq"), s.pop("batch")
        config = ModelConfig(**s, head_dim=s["dim"] // s["n_heads"], tie_embeddings=False, max_positions=max(2048, seq))
    except (ValueError, TypeError, ZeroDivisionError):
        raise invalid("--shape", f"{shape!r}: want name=int pairs of {list(DECODER)}") from None
    if config.dim % config.n_heads or config.n_heads % config.n_kv_heads:
        raise invalid("--shape", "need n_heads | dim and n_kv_heads | n_heads")
    if min(s.values()) < 1 or seq < 1 or batch < 1:
        raise invalid("--shape", f"{shape!r}: every field must be >= 1")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise invalid("--device", f"{device!r}: expected cpu, cuda or cuda:INDEX")
    if cuda and not torch.cuda.is_available():
        raise invalid("--device", f"{device!r}: CUDA is not available here; use --device cpu")
    for name, value in (("--reps", reps), ("--movie-users", movie_users), ("--movie-reps", movie_reps),
                        ("--scale-eval-users", scale_eval_users), ("--eval-users", eval_users),
                        ("--catalogue-items", catalogue_items), ("--prepare-records", prepare_records),
                        ("--llm-users", llm_users), ("--baseline-epochs", baseline_epochs),
                        ("--generate-users", generate_users), ("--generate-llm-users", generate_llm_users),
                        ("--generate-exact-users", generate_exact_users)):
        if value is not None and value < 1:
            raise invalid(name, f"{value}: expected a count >= 1")
    for name, value in (("--baseline-window", baseline_window), ("--baseline-recbole-epochs", baseline_recbole_epochs),
                        ("--threads", threads), ("--warmup", warmup), ("--exact-users", exact_users)):
        if value < 0:
            raise invalid(name, f"{value}: expected a count >= 0" + (" (0: the default)" if "baseline" in name else ""))
    if beams < 20:
        raise invalid("--beams", f"{beams}: expected >= 20 (the largest K)")
    if peak_tflops is not None and not peak_tflops > 0:
        raise invalid("--peak-tflops", f"{peak_tflops}: expected a value > 0")
    if json_path is not None:
        if json_path.is_dir() or not json_path.parent.is_dir():
            raise invalid("--json", f"{json_path}: " + ("a directory; expected a file name" if json_path.is_dir() else
                                                        f"no folder {json_path.parent}"))
        writable(json_path, "--json")
    sizes = {name: counts(text, name) for name, text in (("--scale-reviews", scale_reviews),
                                                         ("--scale-eval-items", scale_eval_items))}
    model = model or next((p for p in (DEFAULT_CPT / "final", DEFAULT_MODEL) if (p / "config.json").exists()), None)
    if {"eval", "recommend", "llm"} & set(sections) and not (model and (model / "config.json").exists()):
        raise invalid("--model", f"no checkpoint in {model or DEFAULT_CPT / 'final'}: pass another, or run `python "
                                 "cprec.py pretrain` first")
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    eval_users = eval_users or (20 if quick else 1000)
    o = Options(device=device, threads=torch.get_num_threads(), precisions=precision_list,
                reps=reps or (20 if quick else 5), warmup=warmup, seed=seed, memory=memory, quick=quick,
                shape=config, seq=seq, batch=batch, compile=compiled, data=data, model=model, eval_users=eval_users,
                beams=beams,
                exact_users=min(exact_users, eval_users),
                catalogue_items=catalogue_items or (5_000 if quick else 100_000),
                movie_users=movie_users or (8 if quick else 200), movie_reps=movie_reps or (1 if quick else 3),
                prepare_records=prepare_records or (20_000 if quick else 1_000_000), llm=llm,
                scale_reviews=sizes["--scale-reviews"] or (
                    (20_000, 40_000) if quick else (1_000_000, 4_000_000, 16_000_000)), scale_dir=scale_dir,
                scale_eval_items=sizes["--scale-eval-items"] or (
                    (500, 2_000) if quick else (10_000, 100_000)),
                scale_eval_users=scale_eval_users or (10 if quick else 200),
                llm_users=llm_users or (4 if quick else 40), baseline_data=baseline_data,
                baseline_domains=tuple(split_list(baseline_domains)), baseline_epochs=baseline_epochs,
                baseline_recbole_epochs=baseline_recbole_epochs,
                baseline_before=baseline_before, baseline_recbole=baseline_recbole,
                baseline_window=baseline_window, generate_users=generate_users or (4 if quick else 60),
                generate_llm_users=generate_llm_users,
                generate_exact_users=generate_exact_users or (2 if quick else 10),
                generate_precision=generate_precision)
    info = machine(device)
    console.print("[bold]machine[/]: " + ", ".join(f"{k} {v}" for k, v in info.items()), highlight=False)
    if "decoder" in sections:
        console.print(f"[bold]decoder shape[/]: {s}, seq {seq}, batch {batch}")
    mfu = {"decoder", "train", "fsdp"} & set(sections)  # only they report FLOP/s: skip the peak matmuls otherwise
    measured = measure_peaks(device, precision_list) if mfu else {}
    rows = []
    for name in sections:
        t = time.perf_counter()
        rows += SECTIONS[name](o)
        console.print(f"section {name}: {time.perf_counter() - t:.0f} s")
    # Peaks are measured before and after the sections and the best kept: on a shared box one measurement can land
    # in someone else's busy spell, and an MFU above 100% would follow.
    again = measure_peaks(device, precision_list) if mfu else {}
    measured = {p: max(measured[p], again[p]) for p in measured}
    peaks, peak_notes = choose_peaks(measured, device, peak_tflops)
    if mfu:
        console.print("[bold]peak[/]: " + "; ".join(peak_notes))
    for row in rows:  # sections report achieved FLOP/s; MFU is one division by the peak, done here for all
        if row.get("flops_per_s") is not None and row.get("precision") in peaks:
            row["mfu"] = row["flops_per_s"] / peaks[row["precision"]]
    for name in sections:
        console.print(render(name, [r for r in rows if r["section"] == name]))
        console.print(f"{name}: what the columns mean in docs/benchmarks.md#{name}", style="dim")
    if any(row.get("mfu", 0) > 1 for row in rows):
        console.print("MFU above 100%: the peak matmuls ran in a busy spell; rerun, or pass --peak-tflops",
                      style="yellow")
    if json_path:
        json_path.write_text(json.dumps({"machine": info, "peaks": peaks, "measured_peaks": measured,
                                         "options": asdict(o), "rows": rows}, indent=2, default=str) + "\n")
        console.print(f"wrote {json_path}")


if __name__ == "__main__":
    try:
        app()
    except UserError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)  # one line, however long
        raise SystemExit(2) from None
