"""The prepared GPU check: `python -m bench.check --out gpu-check`, the first thing to run on a GPU machine.

In one command (about 8 minutes on one H100/H200): the CUDA tests (tests/test_cuda.py); training tokens/s and MFU of
ours against transformers on the same weights at a Qwen2.5-0.5B shape, bf16 (bench.decoder); evaluation users/s at
an ML-1M-like shape (3,700 items of 10-40-token titles, 600-token prompts, 20 beams, the user batch sized for the
GPU); the peak memory of a 0.5B training step against infra.device.memory_estimate (from the CUDA tests); and
`pretrain` + `finetune` end to end for a few steps. Writes report.json and report.md in --out. `--tiny` runs the
same on tiny shapes and on CPU where there is no GPU: CI runs it that way, so the check cannot rot.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from bench.decoder import bench_decoder
from bench.harness import QUICK, ROOT, Options, choose_peaks, console, cprec, measure_peaks
from eval import auto_batch_users, beam_search, build_trie
from extras.init import init_weights
from infra.config import SMALL, ModelConfig
from infra.device import autocast, machine
from infra.files import write_json
from model import Decoder

QWEN_05B = dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, intermediate_size=4864)
ML1M = dict(items=3700, title_tokens=(10, 40), prompt=600, beams=20, users=512)  # MovieLens-1M-like ranking
TINY_ML1M = dict(items=300, title_tokens=(3, 8), prompt=60, beams=20, users=8)


def cuda_tests(out: Path, tiny: bool) -> dict:
    """tests/test_cuda.py in a fresh process: counts of passed, failed and skipped, and the measured memory."""
    xml = out / "cuda-tests.xml"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                           f"--junitxml={xml}"], cwd=ROOT, capture_output=True, text=True)
    (out / "cuda-tests.log").write_text(done.stdout + done.stderr)
    suite = ElementTree.parse(xml).getroot().find("testsuite")
    cases = suite.findall("testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    properties = {p.get("name"): float(p.get("value")) for c in cases for p in c.iter("property")}
    return {"passed": len(cases) - len(failed) - len(skipped), "failed": failed, "skipped": len(skipped),
            "seconds": time.perf_counter() - began, **properties}


def training(device: str, tiny: bool) -> list[dict]:
    """Ours against transformers on the same weights, training and inference steps (bench.decoder)."""
    shape = dict(QUICK if tiny else {**QWEN_05B, "seq": 2048, "batch": 4})
    seq, batch = shape.pop("seq"), shape.pop("batch")
    config = ModelConfig(**shape, head_dim=shape["dim"] // shape["n_heads"], tie_embeddings=False,
                         max_positions=max(2048, seq))
    precisions = ["bf16"] if device.startswith("cuda") else ["fp32"]
    o = Options(device=device, threads=torch.get_num_threads(), precisions=precisions, reps=2 if tiny else 5,
                warmup=1, seed=0, memory=False, quick=tiny, shape=config, seq=seq, batch=batch)
    rows = bench_decoder(o)
    peaks, notes = choose_peaks(measure_peaks(device, precisions), device, None)
    for row in rows:
        row["mfu"] = row["flops_per_s"] / peaks[row["precision"]]
        row["peak"] = notes[0]
    return rows


def ranking(device: str, tiny: bool) -> dict:
    """Trie-constrained beam search over an ML-1M-like catalogue: users/s with the batch auto_batch_users sizes."""
    spec = TINY_ML1M if tiny else ML1M
    config = SMALL if tiny else ModelConfig(**QWEN_05B, head_dim=64, qkv_bias=True, tie_embeddings=True,
                                            architecture="Qwen2ForCausalLM")
    model = Decoder(config)
    init_weights(model, 0)
    model.to(device).eval()
    rng = np.random.default_rng(0)
    items: dict[tuple, None] = {}
    while len(items) < spec["items"]:  # distinct titles closed by token 1, a terminator nothing else contains
        n = int(rng.integers(*spec["title_tokens"]))
        items[tuple(rng.integers(2, config.vocab_size, n - 1).tolist()) + (1,)] = None
    trie = build_trie([list(i) for i in items], device)
    prompts = rng.integers(2, config.vocab_size, (spec["users"], spec["prompt"])).tolist()
    batch = auto_batch_users(model, spec["beams"], spec["prompt"], trie.depth)
    precision = "bf16" if device.startswith("cuda") else "fp32"
    with autocast(precision, torch.device(device)):
        beam_search(model, prompts[:2], trie, spec["beams"], 0)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        for start in range(0, len(prompts), batch):
            beam_search(model, prompts[start:start + batch], trie, spec["beams"], 0)[0].cpu()
        seconds = time.perf_counter() - began
    return {**spec, "params": config.n_params, "precision": precision, "batch_users": batch,
            "users_per_s": len(prompts) / seconds, "depth": trie.depth}


def end_to_end(out: Path, tiny: bool) -> dict:
    """`prepare synthetic`, `init`, `pretrain` and `finetune` for a few steps, as a user types them."""
    work, figures = out / "e2e", {}
    users, tokens, epochs = (300, 8192, 1) if tiny else (2000, 200_000, 1)
    model_args = ["--vocab", 512, "--dim", 64, "--layers", 2, "--heads", 4, "--kv-heads", 2, "--ffn", 128] if tiny \
        else []
    commands = {
        "prepare": ["prepare", "synthetic", "--users", users, "--out", work / "world", "--overwrite"],
        "init": ["init", "--data", work / "world", "--out", work / "model", "--overwrite", *model_args],
        "pretrain": ["pretrain", "--data", work / "world", "--model", work / "model", "--out", work / "cpt",
                     "--tokens", tokens, "--no-progress", "--overwrite", "--val-users", 20],
        "finetune": ["finetune", "--domain", "games", "--data", work / "world", "--model", work / "cpt" / "final",
                     "--out", work / "sft", "--epochs", epochs, "--val-users", 50, "--test-users", 200,
                     "--no-progress", "--overwrite"]}
    for name, args in commands.items():
        status, seconds = cprec(args, out / f"{name}.log")
        figures[name] = {"exit": status, "seconds": seconds}
        if status:
            break
    if figures.get("finetune", {}).get("exit") == 0:
        cpt = json.loads((work / "cpt" / "results.json").read_text())["training"]
        sft = json.loads((work / "sft" / "results.json").read_text())
        figures["pretrain"].update(tokens_per_s=cpt["tokens_per_s"], val_loss=cpt["validation"]["val_loss"],
                                   precision=cpt["precision"])
        figures["finetune"].update(ndcg_at_10=sft["model"]["ndcg@10"], popularity_ndcg_at_10=sft["popularity"][
            "ndcg@10"], users_per_s=sft["users_per_s"])
    return figures


def markdown(report: dict) -> str:
    m, t, r, e = report["machine"], report["cuda_tests"], report["ranking"], report["end_to_end"]
    lines = [f"# GPU check, {time.strftime('%Y-%m-%d', time.gmtime(report['started']))}\n",
             f"Machine: {m.get('gpu', 'no GPU')}; CPU {m['cpu']}; torch {m['torch']}. Command: `python -m bench.check"
             f"{' --tiny' if report['tiny'] else ''}`; {report['seconds'] / 60:.1f} min.\n",
             f"CUDA tests: {t['passed']} passed, {len(t['failed'])} failed {t['failed'] or ''}, {t['skipped']} skipped "
             f"({t['seconds']:.0f} s)." + (f" Peak memory of a 0.5B step: {t['peak_gib']:.2f} GiB measured, "
                                          f"{t['estimate_gib']:.2f} GiB estimated." if "peak_gib" in t else "") + "\n",
             "| impl | mode | precision | tokens/s | MFU | ours / transformers |\n|---|---|---|---|---|---|\n"]
    for row in report["training"]:
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
        lines.append(f"| {row['impl']} | {row['mode']} | {row['precision']} | {row['tokens_per_s']:,.0f} | "
                     f"{row['mfu']:.1%} | {ratio} |\n")
    lines.append(f"\nRanking: {r['users']} users, {r['items']:,} items of {r['title_tokens'][0]}-"
                 f"{r['title_tokens'][1]} tokens, {r['prompt']}-token prompts, {r['beams']} beams, "
                 f"{r['params'] / 1e6:.0f}M parameters, {r['precision']}, batches of {r['batch_users']}: "
                 f"{r['users_per_s']:,.1f} users/s.\n\nEnd to end:\n")
    for name, f in e.items():
        extra = ", ".join(f"{k} {v:,.0f}" if isinstance(v, float) and v >= 100 else f"{k} {v:.4g}"
                          if isinstance(v, float) else f"{k} {v}" for k, v in f.items() if k not in ("exit", "seconds"))
        lines.append(f"- `{name}`: exit {f['exit']}, {f['seconds']:.0f} s{'; ' + extra if extra else ''}\n")
    return "".join(lines)


def main(out: Annotated[Path, typer.Option(help="Folder for report.json, report.md and the logs.")] = Path(
             "gpu-check"),
         tiny: Annotated[bool, typer.Option(help="Tiny shapes: the same check in about a minute on a CPU.")] = False,
         device: Annotated[str, typer.Option(help="cuda or cpu [cuda when there is one]")] = "") -> None:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    report = {"started": time.time(), "tiny": tiny, "machine": machine(device)}
    errors = {}
    for name, part in (("cuda_tests", lambda: cuda_tests(out, tiny)), ("training", lambda: training(device, tiny)),
                       ("ranking", lambda: ranking(device, tiny)), ("end_to_end", lambda: end_to_end(out, tiny))):
        began = time.perf_counter()
        try:  # device time is scarce: one part failing must not cost the others' figures
            report[name] = part()
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"[:2000]
            console.print(f"{name} failed: {errors[name]}", highlight=False)
        console.print(f"{name}: {time.perf_counter() - began:.0f} s")
        write_json(out / "report.json", {**report, "errors": errors})  # after every part: a timeout keeps the rest
    report["seconds"], report["errors"] = time.time() - report["started"], errors
    write_json(out / "report.json", report)
    if not errors:
        (out / "report.md").write_text(markdown(report))
        console.print(markdown(report), highlight=False)
    failed = errors or report["cuda_tests"]["failed"] or any(f["exit"] for f in report["end_to_end"].values())
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    typer.run(main)
