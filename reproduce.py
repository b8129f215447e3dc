"""Reproduce CPRec's claims on the built-in world with one command (`python cprec.py reproduce`).

Every comparison uses the same world, base model, seed and budgets; each run is an ordinary `cprec.py` command whose
exact command line is recorded in the report, so any row can be re-run by hand:
  1. zero-shot on the target domain after all-domain CPT vs the untrained model vs popularity;
  2. SFT from the CPT checkpoint vs SFT from the base model (no CPT), with 100% and 10% of the training users;
  3. CPT on domain-specific only vs mixed only vs both sequence kinds, each followed by SFT;
  4. WSA vs cosine vs constant learning-rate schedules for CPT (same tokens), CPT validation loss and SFT NDCG@10.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from model import UserError, read_json

CPT_RUNS = {  # name -> (sequence kinds, schedule)
    "cpt": ("domain,mixed", "wsa"), "cpt-domain": ("domain", "wsa"), "cpt-mixed": ("mixed", "wsa"),
    "cpt-cosine": ("domain,mixed", "cosine"), "cpt-constant": ("domain,mixed", "constant")}
SFT_RUNS = {  # name -> (start: a CPT run or "base", fraction of training users)
    "sft-cpt": ("cpt", 1.0), "sft-cpt-10%": ("cpt", 0.1), "sft-base": ("base", 1.0), "sft-base-10%": ("base", 0.1),
    "sft-cpt-domain": ("cpt-domain", 1.0), "sft-cpt-mixed": ("cpt-mixed", 1.0),
    "sft-cpt-cosine": ("cpt-cosine", 1.0), "sft-cpt-constant": ("cpt-constant", 1.0)}


def command(args: list[str], log) -> None:
    line = " ".join(["python cprec.py", *args])
    log.write(f"$ {line}\n")
    log.flush()
    began = time.time()
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("cprec.py")), *args, "--no-progress"],
                            stdout=log, stderr=subprocess.STDOUT)
    log.write(f"# {time.time() - began:.0f} s\n")
    if result.returncode:
        raise UserError(f"`{line}` failed (exit {result.returncode}); see {log.name}")


def reproduce(out: Path, data: Path, model: Path, domain: str, cpt_tokens: int, sft_epochs: float, seed: int,
              overwrite: bool) -> dict:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: already holds a reproduction; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(data), "--seed", str(seed), "--overwrite"]
    began = time.time()
    with open(out / "commands.log", "w") as log:
        for name, (kinds, schedule) in CPT_RUNS.items():
            command(["pretrain", *common, "--model", str(model), "--out", str(out / name), "--kinds", kinds,
                     "--schedule", schedule, "--tokens", str(cpt_tokens), "--save-every", "0"], log)
        for name, start in [("zero-shot-base", model), ("zero-shot-cpt", out / "cpt" / "final")]:
            command(["evaluate", "--data", str(data), "--model", str(start), "--domain", domain,
                     "--out", str(out / f"{name}.json")], log)
        for name, (start, fraction) in SFT_RUNS.items():
            start_model = model if start == "base" else out / start / "final"
            command(["finetune", *common, "--domain", domain, "--model", str(start_model), "--out", str(out / name),
                     "--users-fraction", str(fraction), "--epochs", str(sft_epochs)], log)
    report = collect(out, domain)
    report["seconds"] = time.time() - began
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def collect(out: Path, domain: str) -> dict:
    """Test metrics of every evaluation and the CPT validation losses, from the runs' own result files."""
    rows = {}
    for name in ("zero-shot-base", "zero-shot-cpt"):
        result = read_json(out / f"{name}.json")
        rows[name] = result["model"]
        rows["popularity"], protocol = result["popularity"], result["protocol"]
    for name in SFT_RUNS:
        rows[name] = read_json(out / name / "results.json")["model"]
    cpt = {name: read_json(out / name / "results.json")["training"]["validation"]["val_loss"] for name in CPT_RUNS}
    return {"domain": domain, "protocol": protocol, "test": rows, "cpt_val_loss": cpt}


def markdown(report: dict) -> str:
    t, loss = report["test"], report["cpt_val_loss"]
    row = lambda label, name, extra="": (  # noqa: E731
        f"| {label} | {t[name]['recall@10']:.4f} | {t[name]['ndcg@10']:.4f} |{extra}\n")
    lines = [f"Test split of `{report['domain']}`; {report['protocol']}.\n\n",
             "| setting | Recall@10 | NDCG@10 |\n|---|---|---|\n",
             row("popularity", "popularity"), row("untrained model, zero-shot", "zero-shot-base"),
             row("after all-domain CPT, zero-shot", "zero-shot-cpt"),
             row("SFT from base (no CPT), 100% users", "sft-base"), row("SFT from CPT, 100% users", "sft-cpt"),
             row("SFT from base (no CPT), 10% users", "sft-base-10%"), row("SFT from CPT, 10% users", "sft-cpt-10%"),
             "\n| CPT sequences | CPT val loss | Recall@10 after SFT | NDCG@10 after SFT |\n|---|---|---|---|\n"]
    for label, cpt, sft in [("domain-specific only", "cpt-domain", "sft-cpt-domain"),
                            ("mixed only", "cpt-mixed", "sft-cpt-mixed"), ("both", "cpt", "sft-cpt")]:
        lines.append(f"| {label} | {loss[cpt]:.4f} | {t[sft]['recall@10']:.4f} | {t[sft]['ndcg@10']:.4f} |\n")
    lines.append("\n| CPT schedule | CPT val loss | Recall@10 after SFT | NDCG@10 after SFT |\n|---|---|---|---|\n")
    for label, cpt, sft in [("WSA", "cpt", "sft-cpt"), ("cosine", "cpt-cosine", "sft-cpt-cosine"),
                            ("constant", "cpt-constant", "sft-cpt-constant")]:
        lines.append(f"| {label} | {loss[cpt]:.4f} | {t[sft]['recall@10']:.4f} | {t[sft]['ndcg@10']:.4f} |\n")
    lines.append(f"\nWall time: {report['seconds'] / 60:.1f} min.\n")
    return "".join(lines)
