"""`cprec reproduce`: CPRec's claims on the built-in world (or any dataset) with one command.

Every comparison uses the same world, base model, seed and budgets; each run is an ordinary `cprec.py` command whose
exact command line is recorded in the report, so any row can be re-run by hand:
  1. zero-shot on the target domain after all-domain CPT vs the base model (no CPT) vs popularity;
  2. SFT from the CPT checkpoint vs SFT from the base model (no CPT), with 100% and 10% of the training users;
  3. CPT on domain-specific only vs mixed only vs both sequence kinds, each followed by SFT;
  4. WSA vs cosine vs constant learning-rate schedules for CPT (same tokens), CPT validation loss and SFT NDCG@10;
  5. an item-ID baseline trained on the same split (SASRec, `cprec.py baseline`) beside popularity.
Each claim's NDCG@10 difference comes with a paired-bootstrap 95% interval over the test users, so a reader can tell a
real effect from the luck of one test set.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from eval import paired_bootstrap
from extras.init import base_model
from extras.world import open_dataset
from infra.cli import PROGRESS, console
from infra.config import DEFAULT_DATA
from infra.console import progress as progress_bar
from infra.console import say
from infra.files import UserError, lock, marked, own_output, read_json, write_json
from infra.runs import Interrupted, has_checkpoint
from infra.tokenizer import Tokenizer
from model import Decoder

CPREC = Path(__file__).resolve().parents[1] / "cprec.py"

CPT_RUNS = {  # name -> (sequence kinds, schedule)
    "cpt": ("domain,mixed", "wsa"), "cpt-domain": ("domain", "wsa"), "cpt-mixed": ("mixed", "wsa"),
    "cpt-cosine": ("domain,mixed", "cosine"), "cpt-constant": ("domain,mixed", "constant")}
PAIRS = [  # (claim, run A, run B): each row reports NDCG@10 of A minus B on the same test users
    ("CPT helps zero-shot", "zero-shot-cpt", "zero-shot-base"), ("CPT helps SFT, 100% users", "sft-cpt", "sft-base"),
    ("CPT helps SFT, 10% users", "sft-cpt-10%", "sft-base-10%"),
    ("both kinds beat domain-only", "sft-cpt", "sft-cpt-domain"),
    ("both kinds beat mixed-only", "sft-cpt", "sft-cpt-mixed"),
    ("WSA beats cosine", "sft-cpt", "sft-cpt-cosine"), ("WSA beats constant", "sft-cpt", "sft-cpt-constant"),
    ("CPT+SFT beats SASRec (item IDs)", "sft-cpt", "baseline"),
    ("CPT+SFT on 10% users beats SASRec (item IDs)", "sft-cpt-10%", "baseline")]
CORE = {"cpt", "sft-cpt-10%", "sft-base-10%", "baseline"}  # --core: the runs a large model can afford on a CPU
ZERO_SHOT = ("zero-shot-base", "zero-shot-cpt")  # evaluations, always run


def measured(name: str, core: bool) -> bool:
    """Whether run `name` belongs to this reproduction (all of them, or with --core only CORE and the zero-shots)."""
    return not core or name in CORE or name in ZERO_SHOT
SFT_RUNS = {  # name -> (start: a CPT run or "base", fraction of training users)
    "sft-cpt": ("cpt", 1.0), "sft-cpt-10%": ("cpt", 0.1), "sft-base": ("base", 1.0), "sft-base-10%": ("base", 0.1),
    "sft-cpt-domain": ("cpt-domain", 1.0), "sft-cpt-mixed": ("cpt-mixed", 1.0),
    "sft-cpt-cosine": ("cpt-cosine", 1.0), "sft-cpt-constant": ("cpt-constant", 1.0)}


def run(args: list[str], result: Path, resume: bool, log) -> None:
    """Run one cprec.py command: on --resume, not at all when its result is written (a finished run), with --resume
    when its run directory holds a checkpoint (an interrupted one), else afresh (--overwrite: only its own output).

    The command runs in a session of its own, so a Ctrl-C reaches this process alone, which passes it on once and
    waits while the command saves its checkpoint (a second Ctrl-C is passed on too: stop now)."""
    if resume and result.exists():
        log.write(f"$ python cprec.py {' '.join(args)}\n# reused {result}\n")
        return
    folder = Path(args[args.index("--out") + 1])
    continued = resume and folder.is_dir() and has_checkpoint(folder)
    args = [*args, "--resume" if continued else "--overwrite"]
    line = " ".join(["python cprec.py", *args])
    log.write(f"$ {line}\n")
    log.flush()
    began, interrupted = time.time(), False
    child = subprocess.Popen([sys.executable, str(CPREC), *args], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            interrupted = True
            child.send_signal(signal.SIGINT)
    log.write(f"# {time.time() - began:.0f} s\n")
    if interrupted:
        raise Interrupted(f"interrupted during `{line}` (exit {code}; a training run saved a checkpoint); continue "
                          "with the same reproduce command plus --resume")
    if code:
        raise UserError(f"`{line}` failed (exit {code}); see {log.name}; fix it and rerun with --resume")


SETTINGS = {"data_fingerprint": "--data", "model": "--model", "domain": "--domain", "cpt_tokens": "--cpt-tokens",
            "sft_epochs": "--sft-epochs", "seed": "--seed", "core": "--core", "test_users": "--test-users",
            "val_users": "--val-users"}  # reproduce.json's settings, and the option each comes from


def settings_of(out: Path, settings: dict, resume: bool) -> None:
    """Record the reproduction's settings in reproduce.json; on --resume they must be the recorded ones, since its
    finished runs are reused as they are."""
    saved = out / "reproduce.json"
    if resume and saved.exists():
        old = read_json(saved)
        if changed := [option for key, option in SETTINGS.items() if old.get(key) != settings[key]]:
            raise UserError(f"{out}: --resume with other settings ({', '.join(changed)}) than the reproduction "
                            "there; give the recorded ones (reproduce.json) or --overwrite to start over")
    write_json(saved, settings)


def reproduce(out: Path, data: Path, model: Path, domain: str, cpt_tokens: int, sft_epochs: float, seed: int,
              resume: bool, overwrite: bool, core: bool = False, test_users: int = 0,
              val_users: int | None = None, fingerprint: str = "", progress: bool = False) -> dict:
    """Every comparison, or with `core` only zero-shot before/after CPT and SFT on 10% of the users from either start
    (the claims a pretrained LLM can be measured on with CPU budgets); `test_users` > 0 evaluates a seeded subset,
    `val_users` sets each SFT run's validation users (None: finetune's default)."""
    out = own_output(out, what="reproduction", overwrite=True, check=lambda p: marked(p, "reproduce.json"),
                     inputs=[data, model])
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise UserError(f"{out}: already holds a reproduction; pass --resume to reuse its finished runs or "
                        "--overwrite to start over")
    out.mkdir(parents=True, exist_ok=True)
    lock(out, "reproduction")
    settings_of(out, {"data_fingerprint": fingerprint, "model": str(Path(model).resolve()), "domain": domain,
                      "cpt_tokens": cpt_tokens, "sft_epochs": sft_epochs, "seed": seed, "core": core,
                      "test_users": test_users, "val_users": val_users}, resume)
    train = ["--data", str(data), "--seed", str(seed), "--no-progress"]
    plan = [(["pretrain", *train, "--model", str(model), "--out", str(out / name), "--kinds", kinds, "--schedule",
              schedule, "--tokens", str(cpt_tokens), "--save-every", "0"], out / name / "results.json")
            for name, (kinds, schedule) in CPT_RUNS.items() if measured(name, core)]
    plan += [(["evaluate", "--data", str(data), "--model", str(start), "--domain", domain, "--seed", str(seed),
               "--users", str(test_users), "--no-progress", "--out", str(out / f"{name}.json")], out / f"{name}.json")
             for name, start in [("zero-shot-base", model), ("zero-shot-cpt", out / "cpt" / "final")]]
    plan += [(["finetune", *train, "--domain", domain, "--model", str(model if start == "base" else
                                                                       out / start / "final"),
               "--out", str(out / name), "--users-fraction", str(fraction), "--epochs", str(sft_epochs),
               "--test-users", str(test_users), *([] if val_users is None else ["--val-users", str(val_users)])],
              out / name / "results.json") for name, (start, fraction) in SFT_RUNS.items() if measured(name, core)]
    plan += [(["baseline", "--data", str(data), "--domain", domain, "--seed", str(seed), "--no-progress", "--out",
               str(out / "baseline")], out / "baseline" / "results.json")]
    with open(out / "commands.log", "a" if resume else "w") as log, \
            progress_bar(len(plan), "reproduce runs", progress) as advance:
        for args, result in plan:
            run(args, result, resume, log)
            advance(1, args[0])
    report = collect(out, domain, core)
    report["seconds"] = wall_time(out / "commands.log")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def wall_time(log: Path) -> float:
    """Seconds of all runs, from commands.log: the latest timing of each command (reused runs keep theirs)."""
    seconds, line = {}, None
    for text in log.read_text().splitlines():
        if text.startswith("$ "):
            line = text.replace(" --no-progress", "")
        elif text.startswith("# ") and text.endswith(" s") and line:
            seconds[line] = float(text[2:-2])
    return sum(seconds.values())


def collect(out: Path, domain: str, core: bool = False) -> dict:
    """Test metrics of every evaluation and the CPT validation losses, from the runs' own result files."""
    sft_runs = [n for n in SFT_RUNS if measured(n, core)]
    pairs = [(claim, a, b) for claim, a, b in PAIRS if measured(a, core) and measured(b, core)]
    rows = {}
    for name in ZERO_SHOT:
        result = read_json(out / f"{name}.json")
        rows[name] = result["model"]
        rows["popularity"], protocol = result["popularity"], result["protocol"]
    for name in sft_runs:
        rows[name] = read_json(out / name / "results.json")["model"]
    baseline = read_json(out / "baseline" / "results.json")
    rows["baseline"] = baseline["model"]
    cpt = {name: read_json(out / name / "results.json")["training"]["validation"]["val_loss"]
           for name in CPT_RUNS if measured(name, core)}
    return {"domain": domain, "protocol": protocol, "baseline_protocol": baseline["protocol"], "test": rows,
            "cpt_val_loss": cpt,
            "differences": [{"claim": claim, "a": a, "b": b, **difference(out, a, b)} for claim, a, b in pairs]}


def per_user_ranks(out: Path, name: str) -> dict[str, float]:
    """Each test user's 0-based rank of the target in run `name` (inf where the target was not retrieved)."""
    path = out / f"{name}-per_user.jsonl" if name.startswith("zero-shot") else out / name / "results-per_user.jsonl"
    redo = f"delete run {name}'s results and rerun with --resume"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}); {redo}") from None
    ranks = {}
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            ranks[row["user"]] = float("inf") if row["rank"] is None else row["rank"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: line {number} is not a per-user rank ({line[:60]!r}); expected "
                            f"{{\"user\": ..., \"rank\": ...}} as evaluate writes it; {redo}") from None
    return ranks


def difference(out: Path, a: str, b: str) -> dict:
    """NDCG@10 of run a minus run b, paired over their users. One run may hold a seeded subset of the other's users
    (an LLM on --test-users beside SASRec on all): then the pairs are that subset's."""
    ranks_a, ranks_b = per_user_ranks(out, a), per_user_ranks(out, b)
    users = sorted(set(ranks_a) & set(ranks_b))
    if len(users) != min(len(ranks_a), len(ranks_b)):
        raise UserError(f"{out}: runs {a} and {b} were evaluated on different users; rerun with --overwrite")
    delta, low, high = paired_bootstrap([ranks_a[u] for u in users], [ranks_b[u] for u in users])
    return {"ndcg@10": delta, "ci95": [low, high], "users": len(users)}


def markdown(report: dict) -> str:
    t, loss = report["test"], report["cpt_val_loss"]
    row = lambda label, name, extra="": (  # noqa: E731
        f"| {label} | {t[name]['recall@10']:.4f} | {t[name]['ndcg@10']:.4f} |{extra}\n" if name in t else "")
    lines = [f"Test split of `{report['domain']}`; {report['protocol']}.\n\n",
             "| setting | Recall@10 | NDCG@10 |\n|---|---|---|\n",
             row("popularity", "popularity"), row("SASRec on item IDs, same split", "baseline"),
             row("base model (no CPT), zero-shot", "zero-shot-base"),
             row("after all-domain CPT, zero-shot", "zero-shot-cpt"),
             row("SFT from base (no CPT), 100% users", "sft-base"), row("SFT from CPT, 100% users", "sft-cpt"),
             row("SFT from base (no CPT), 10% users", "sft-base-10%"), row("SFT from CPT, 10% users", "sft-cpt-10%"),
             f"\nSASRec: {report['baseline_protocol']}.\n"]
    ablations = {"CPT sequences": [("domain-specific only", "cpt-domain", "sft-cpt-domain"),
                                   ("mixed only", "cpt-mixed", "sft-cpt-mixed"), ("both", "cpt", "sft-cpt")],
                 "CPT schedule": [("WSA", "cpt", "sft-cpt"), ("cosine", "cpt-cosine", "sft-cpt-cosine"),
                                  ("constant", "cpt-constant", "sft-cpt-constant")]}
    for title, runs in ablations.items():
        if any(sft not in t for _, _, sft in runs):  # --core measures no ablations
            continue
        lines.append(f"\n| {title} | CPT val loss | Recall@10 after SFT | NDCG@10 after SFT |\n|---|---|---|---|\n")
        for label, cpt, sft in runs:
            lines.append(f"| {label} | {loss[cpt]:.4f} | {t[sft]['recall@10']:.4f} | {t[sft]['ndcg@10']:.4f} |\n")
    lines.append("\n| claim | NDCG@10 difference | 95% CI (paired bootstrap over users) | holds here |\n"
                 "|---|---|---|---|\n")
    for d in report["differences"]:
        low, high = d["ci95"]
        verdict = "yes" if low > 0 else "no, reversed" if high < 0 else "inconclusive"
        lines.append(f"| {d['claim']} | {d['ndcg@10']:+.4f} | [{low:+.4f}, {high:+.4f}] | {verdict} |\n")
    lines.append(f"\nWall time: {report['seconds'] / 60:.1f} min.\n")
    return "".join(lines)


# --------------------------------------------------------------------------------------------------- the command
def command(out: Path = typer.Option(Path("runs/reproduce"), help="Directory of all runs and the report."),
            data: Path = typer.Option(DEFAULT_DATA, help="Dataset (default: the built-in world)."),
            model: Optional[Path] = typer.Option(None, help="Base model (default: models/small)."),
            domain: str = typer.Option("games", help="Downstream domain of the comparisons."),
            cpt_tokens: int = typer.Option(1_000_000, help="Token budget of each CPT run."),
            sft_epochs: float = typer.Option(5.0, help="Epochs of each SFT run."),
            seed: int = typer.Option(0, help="One seed for every run."),
            resume: bool = typer.Option(False, help="Reuse the finished runs of an earlier reproduction."),
            overwrite: bool = typer.Option(False, help="Replace an earlier reproduction."),
            core: bool = typer.Option(False, help="Only zero-shot before/after CPT and SFT with 10% of the users from "
                                      "either start (a pretrained LLM on CPU budgets)."),
            test_users: int = typer.Option(0, help="Evaluate a seeded subset of test users (0 = all)."),
            val_users: Optional[int] = typer.Option(None, help="Validation users of each SFT run (default: finetune's "
                                                    "500; a large LLM on CPU: fewer)."),
            progress: bool = PROGRESS):
    """Run the comparisons behind CPRec's claims (zero-shot, CPT vs no CPT, limited SFT, sequence kinds, schedules)
    with one budget and seed, and write runs/reproduce/report.md."""
    for option, amount in (("--cpt-tokens", cpt_tokens), ("--sft-epochs", sft_epochs)):
        if not amount > 0:
            raise UserError(f"{option} {amount}: expected a value > 0")
    ds = open_dataset(data)
    ds.domain(domain)
    start = base_model(model, data, 0)
    Tokenizer.from_pretrained(start)  # a broken model is refused here rather than as the first of many failed runs
    Decoder.from_pretrained(start)
    for option, count in (("--test-users", test_users), ("--val-users", val_users)):
        if count is not None and count < 0:
            raise UserError(f"{option} {count}: expected 0 (all) or a positive count")
    report = reproduce(out, data, start, domain, cpt_tokens, sft_epochs, seed, resume, overwrite, core, test_users,
                       val_users, ds.fingerprint, progress)
    console.print((out / "report.md").read_text(), highlight=False)
    say(f"report in {out / 'report.md'} ({report['seconds'] / 60:.1f} min)")
