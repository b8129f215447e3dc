"""`cprec reproduce`: CPRec's claims, and post-training's, with one command, over one or several training seeds.

Every comparison uses the same dataset, base model and budgets; each run is an ordinary `cprec.py` command whose
exact command line is recorded in commands.log, so any row can be re-run by hand:
  1. zero-shot on the target domain after all-domain CPT vs the base model (no CPT) vs popularity;
  2. SFT from the CPT checkpoint vs SFT from the base model (no CPT), with 100% and 10% of the training users;
  3. CPT on domain-specific only vs mixed only vs both sequence kinds, each followed by SFT;
  4. WSA vs cosine vs constant learning-rate schedules for CPT (same tokens), CPT validation loss and SFT NDCG@10;
  5. an item-ID baseline trained on the same split (SASRec, `cprec.py baseline`) beside popularity;
  6. preference post-training (`cprec.py align`) after SFT from CPT, against that SFT model at the same 50 beams,
     with what it may cost: Recall@50, top-10 coverage and popularity, the held-out items' log-likelihood.
With --seeds N every arm is trained N times (seed, seed + 1, ...: data order, dropout and, for a model `init`
made, its initialisation: out/seed-S/base). Each claim's NDCG@10 difference comes with a 95% interval of a
two-level bootstrap (resample the seeds, then each seed's test users), so a reader can tell a real effect from the
luck of one seed or one test set; each arm's mean and spread over the seeds are reported too.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from eval import ndcg_gains
from extras.init import base_model, init_weights
from extras.world import open_dataset
from infra.cli import PROGRESS, console
from infra.config import DEFAULT_DATA, INIT_MARKER
from infra.console import progress as progress_bar
from infra.console import say
from infra.files import UserError, atomic_dir, lock, marked, own_output, quote, read_json, write_json
from infra.runs import Interrupted, has_checkpoint
from infra.tokenizer import Tokenizer
from infra.weights import model_fingerprint
from model import Decoder

CPREC = Path(__file__).resolve().parents[1] / "cprec.py"

CPT_RUNS = {  # name -> (sequence kinds, schedule)
    "cpt": ("domain,mixed", "wsa"), "cpt-domain": ("domain", "wsa"), "cpt-mixed": ("mixed", "wsa"),
    "cpt-cosine": ("domain,mixed", "cosine"), "cpt-constant": ("domain,mixed", "constant")}
SFT_RUNS = {  # name -> (start: a CPT run or "base", fraction of training users)
    "sft-cpt": ("cpt", 1.0), "sft-cpt-10%": ("cpt", 0.1), "sft-base": ("base", 1.0), "sft-base-10%": ("base", 0.1),
    "sft-cpt-domain": ("cpt-domain", 1.0), "sft-cpt-mixed": ("cpt-mixed", 1.0),
    "sft-cpt-cosine": ("cpt-cosine", 1.0), "sft-cpt-constant": ("cpt-constant", 1.0)}
ALIGN_RUNS = {"align-cpt": "sft-cpt", "align-cpt-10%": "sft-cpt-10%"}  # name -> the SFT run it post-trains (its users)
ZERO_SHOT = ("zero-shot-base", "zero-shot-cpt")  # evaluations, always run
DEEP = {f"{sft}-50beams": sft for sft in ALIGN_RUNS.values()}  # SFT evaluated as align is: 50 beams, Recall@50
PAIRS = [  # (claim, run A, run B): each row reports NDCG@10 of A minus B on the same test users
    ("CPT helps zero-shot", "zero-shot-cpt", "zero-shot-base"), ("CPT helps SFT, 100% users", "sft-cpt", "sft-base"),
    ("CPT helps SFT, 10% users", "sft-cpt-10%", "sft-base-10%"),
    ("both kinds beat domain-only", "sft-cpt", "sft-cpt-domain"),
    ("both kinds beat mixed-only", "sft-cpt", "sft-cpt-mixed"),
    ("WSA beats cosine", "sft-cpt", "sft-cpt-cosine"), ("WSA beats constant", "sft-cpt", "sft-cpt-constant"),
    ("CPT+SFT beats SASRec (item IDs)", "sft-cpt", "baseline"),
    ("CPT+SFT on 10% users beats SASRec (item IDs)", "sft-cpt-10%", "baseline"),
    ("post-training beats SFT", "align-cpt", "sft-cpt-50beams"),
    ("post-training beats SFT, 10% users", "align-cpt-10%", "sft-cpt-10%-50beams")]
CORE = {"cpt", "sft-cpt-10%", "sft-base-10%", "baseline", "align-cpt-10%", "sft-cpt-10%-50beams"}  # --core


def measured(name: str, core: bool) -> bool:
    """Whether run `name` belongs to this reproduction (all of them, or with --core only CORE and the zero-shots)."""
    return not core or name in CORE or name in ZERO_SHOT


def run(args: list[str], result: Path, resume: bool, log, made: Made) -> None:
    """Run one cprec.py command: on --resume, not at all when its result is written (a finished run), with --resume
    when its run directory holds a checkpoint (an interrupted one), else afresh (--overwrite: only its own output).
    Reused or continued only when proven the same: its recorded command line and the fingerprints of its dataset
    and model equal this one's (Made); otherwise refused, naming the difference.

    The command runs in a session of its own, so a Ctrl-C reaches this process alone, which passes it on once and
    waits while the command saves its checkpoint (a second Ctrl-C is passed on too: stop now)."""
    folder = Path(args[args.index("--out") + 1])
    continued = resume and folder.is_dir() and has_checkpoint(folder)
    if resume and (result.exists() or continued):
        made.check(args, result)
    if resume and result.exists():
        log.write(f"$ python cprec.py {' '.join(args)}\n# reused {result}\n")
        return
    made.record(args, result)
    args = [*args, "--resume" if continued else "--overwrite"]
    line = " ".join(["python cprec.py", *args])
    log.write(f"$ {line}\n")
    log.flush()
    began, interrupted = time.time(), False
    child = subprocess.Popen([sys.executable, str(CPREC), *args], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=stop_with_parent)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            interrupted = True
            child.send_signal(signal.SIGINT)
    log.write(f"# {time.time() - began:.0f} s\n")
    if interrupted:
        raise Interrupted(f"interrupted during `{line}` (exit {code}; a training run saves a checkpoint first); "
                          "continue with the same reproduce command plus --resume")
    if code:
        raise UserError(f"`{line}` failed (exit {code}); see {log.name}; fix it and rerun with --resume")


class Made:
    """runs.json of a reproduction: what each of its results was made with (the command line, the dataset's and the
    model's fingerprints), written as the command starts, so a finished or interrupted run is reused only by the same
    command on the same inputs. Results of reproductions made before it was kept are reused as they are."""

    def __init__(self, out: Path, data_fingerprint: str, resume: bool):
        self.path, self.data = out / "runs.json", data_fingerprint
        self.records = read_json(self.path) if resume and self.path.exists() else {}

    def now(self, args: list[str]) -> dict:
        model = Path(args[args.index("--model") + 1]) if "--model" in args else None
        paths = {i + 1 for i, a in enumerate(args) if a in ("--data", "--model", "--out")}  # however spelt
        return {"args": [str(Path(a).resolve()) if i in paths else a for i, a in enumerate(args)],
                "data_fingerprint": self.data,
                "model_fingerprint": model_fingerprint(model) if model is not None and model.is_dir() else None}

    def check(self, args: list[str], result: Path) -> None:
        key = str(result.relative_to(self.path.parent))
        if (old := self.records.get(key)) is None:
            return
        new = self.now(args)
        if old == new:
            return
        before, after = options(old["args"]), options(new["args"])
        why = [f"{k} {before.get(k)} (now {after.get(k)})" for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)]
        why += [f"{'--data' if k == 'data_fingerprint' else '--model'}'s content changed since (was `init` or "
                "`prepare` run again?)" for k in ("data_fingerprint", "model_fingerprint") if old[k] != new[k]]
        raise UserError(f"{result}: made with {', '.join(why)}, not as this reproduction would make it; it is not "
                        "reused; give the recorded settings or --overwrite to start over")

    def record(self, args: list[str], result: Path) -> None:
        self.records[str(result.relative_to(self.path.parent))] = self.now(args)
        write_json(self.path, self.records)


def options(args: list[str]) -> dict:
    """A command line's options and their values (a flag: True), the command itself under ""."""
    found, key = {"": args[0]}, None
    for arg in args[1:]:
        if arg.startswith("--"):
            key = arg
            found[key] = True
        elif key is not None:
            found[key], key = arg, None
    return found


def stop_with_parent() -> None:
    """In the child, before it runs: SIGTERM when reproduce itself dies (killed), so no run goes on orphaned; the
    run saves its checkpoint and --resume continues it (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


SETTINGS = {"data_fingerprint": "--data", "model": "--model", "model_fingerprint": "--model's content",
            "domain": "--domain", "cpt_tokens": "--cpt-tokens", "sft_epochs": "--sft-epochs", "seed": "--seed",
            "seeds": "--seeds", "core": "--core", "test_users": "--test-users",
            "val_users": "--val-users"}  # reproduce.json's settings and their options
ADDED = {"model_fingerprint"}  # settings that reproductions made before they were recorded lack: not compared then


def settings_of(out: Path, settings: dict, resume: bool) -> None:
    """Record the reproduction's settings in reproduce.json; on --resume they must be the recorded ones, since its
    finished runs are reused as they are, or extend them: every arm after a --core one, more seeds. Those add runs
    without changing any finished run's command, so a CPU budget can be spent over several sessions."""
    saved = out / "reproduce.json"
    if resume and saved.exists():
        old = read_json(saved)
        if changed := [option for key, option in SETTINGS.items() if old.get(key) != settings.get(key)
                       and not extends(key, old.get(key), settings.get(key)) and (key in old or key not in ADDED)]:
            raise UserError(f"{out}: --resume with other settings ({', '.join(changed)}) than the reproduction "
                            "there; give the recorded ones (reproduce.json), extend them (drop --core, raise "
                            "--seeds) or --overwrite to start over")
    write_json(saved, settings)


def extends(key: str, old, new) -> bool:
    """Whether a setting changed on --resume only adds runs: all arms after --core, or more seeds."""
    return (key == "core" and old is True and new is False) or (key == "seeds" and isinstance(old, int) and new > old)


def reproduction_files(out: Path) -> str | None:
    """own_output's check: a reproduction holds reproduce.json, its log, its report and its seeds' folders only."""
    names = {"reproduce.json", "runs.json", "commands.log", "report.md", "report.json"}
    return marked(out, "reproduce.json", names=names | {p.name for p in out.glob("seed-*") if p.name[5:].isdigit()})


def seeded_base(model: Path, folder: Path, seed: int, resume: bool = False) -> Path:
    """The base model of one seed: a model `init` made gets this seed's initialisation (the same tokenizer and shape,
    weights from init_weights(seed), written once and remade when --model is no longer what it was made from); a
    pretrained LLM is its own base for every seed."""
    marker = read_json(model / "config.json").get(INIT_MARKER)
    if not isinstance(marker, dict) or marker.get("seed") == seed:
        return model
    tokenizer = Tokenizer.from_pretrained(model)
    source = hashlib.sha256((model / "config.json").read_bytes() + tokenizer.fingerprint().encode()).hexdigest()[:16]
    if (folder / "config.json").exists():
        made = read_json(folder / "config.json").get(INIT_MARKER) or {}
        if made.get("from") == source or (resume and "from" not in made):  # (bases made before "from" was kept)
            return folder
        if resume:
            raise UserError(f"{folder}: this seed's base model was made from another {model} (was `init` run again?),"
                            " so the finished runs are not this model's; --overwrite to start over")
    net = Decoder.from_pretrained(model)
    init_weights(net, seed)
    net.config.extra[INIT_MARKER] = {"seed": seed, "from": source}
    with atomic_dir(folder) as tmp:  # a base of our own (seed-S/base) is replaced, never anything else
        net.write_checkpoint(tmp, tokenizer)
    return folder


def plan(out: Path, data: Path, model: Path, domain: str, cpt_tokens: int, sft_epochs: float, seed: int,
         core: bool, test_users: int, val_users: int | None, resume: bool = False) -> list[tuple[list, Path]]:
    """Every command of one seed's arms, in order, with the result file that says it is done."""
    base = seeded_base(model, out / "base", seed, resume)
    train = ["--data", str(data), "--seed", str(seed), "--no-progress"]
    val = [] if val_users is None else ["--val-users", str(val_users)]
    runs = [(["pretrain", *train, "--model", str(base), "--out", str(out / name), "--kinds", kinds, "--schedule",
              schedule, "--tokens", str(cpt_tokens), "--save-every", "0"], out / name / "results.json")
            for name, (kinds, schedule) in CPT_RUNS.items() if measured(name, core)]
    runs += [(["evaluate", "--data", str(data), "--model", str(start), "--domain", domain, "--seed", str(seed),
               "--users", str(test_users), "--no-progress", "--out", str(out / f"{name}.json")], out / f"{name}.json")
             for name, start in [("zero-shot-base", base), ("zero-shot-cpt", out / "cpt" / "final")]]
    runs += [(["finetune", *train, "--domain", domain, "--model", str(base if start == "base" else
                                                                       out / start / "final"),
               "--out", str(out / name), "--users-fraction", str(fraction), "--epochs", str(sft_epochs),
               "--test-users", str(test_users), *val], out / name / "results.json")
             for name, (start, fraction) in SFT_RUNS.items() if measured(name, core)]
    runs += [(["baseline", "--data", str(data), "--domain", domain, "--seed", str(seed), "--no-progress", "--out",
               str(out / "baseline")], out / "baseline" / "results.json")]
    runs += [(["evaluate", "--data", str(data), "--model", str(out / sft / "best"), "--domain", domain, "--seed",
               str(seed), "--users", str(test_users), "--beams", "50", "--no-progress", "--out",
               str(out / f"{name}.json")], out / f"{name}.json") for name, sft in DEEP.items() if measured(name, core)]
    runs += [(["align", *train, "--domain", domain, "--model", str(out / sft / "best"), "--out", str(out / name),
               "--users-fraction", str(SFT_RUNS[sft][1]), "--test-users", str(test_users), *val],
              out / name / "results.json")
             for name, sft in ALIGN_RUNS.items() if measured(name, core)]
    return runs


def reproduce(out: Path, data: Path, model: Path, domain: str, cpt_tokens: int, sft_epochs: float, seed: int,
              resume: bool, overwrite: bool, core: bool = False, test_users: int = 0,
              val_users: int | None = None, fingerprint: str = "", progress: bool = False, seeds: int = 1) -> dict:
    """Every comparison (or with `core` the claims a pretrained LLM can be measured on with CPU budgets: zero-shot
    before/after CPT, SFT on 10% of the users from either start, post-training after it) for each of `seeds` seeds;
    `test_users` > 0 evaluates a seeded subset, `val_users` sets each SFT run's validation users."""
    out = own_output(out, what="reproduction", overwrite=True, check=reproduction_files, inputs=[data, model])
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise UserError(f"{out}: already holds a reproduction; pass --resume to reuse its finished runs or "
                        "--overwrite to start over")
    out.mkdir(parents=True, exist_ok=True)
    lock(out, "reproduction")
    if not resume:  # a report of the earlier runs, or their seeds' folders, never stand beside the new ones
        for name in ("report.md", "report.json", "runs.json"):
            (out / name).unlink(missing_ok=True)
        for folder in out.glob("seed-*"):  # reproduction_files accepted them as ours
            shutil.rmtree(folder)
    settings_of(out, {"data_fingerprint": fingerprint, "model": str(Path(model).resolve()),
                      "model_fingerprint": model_fingerprint(model), "domain": domain,
                      "cpt_tokens": cpt_tokens, "sft_epochs": sft_epochs, "seed": seed, "seeds": seeds,
                      "core": core, "test_users": test_users, "val_users": val_users}, resume)
    runs = [r for s in range(seed, seed + seeds) for r in plan(out / f"seed-{s}", data, model, domain, cpt_tokens,
                                                                 sft_epochs, s, core, test_users, val_users,
                                                                 resume)]
    made = Made(out, fingerprint, resume)
    with open(out / "commands.log", "a" if resume else "w") as log, \
            progress_bar(len(runs), "reproduce runs", progress) as advance:
        for args, result in runs:
            run(args, result, resume, log, made)
            advance(1, args[0])
    report = collect([out / f"seed-{s}" for s in range(seed, seed + seeds)], domain, core)
    report["seconds"] = wall_time(out / "commands.log")
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    return report


def wall_time(log: Path) -> float:
    """Seconds of all runs, from commands.log: the latest timing of each command (reused runs keep theirs; one
    continued with --resume adds to its interrupted start)."""
    seconds, line, continued = {}, None, False
    for text in log.read_text().splitlines():
        if text.startswith("$ "):
            line = text.replace(" --no-progress", "").replace(" --overwrite", "").replace(" --resume", "")
            continued = text.endswith(" --resume")  # the rest of an interrupted run: its time adds up
        elif text.startswith("# ") and text.endswith(" s") and line:
            seconds[line] = seconds.get(line, 0.0) * continued + float(text[2:-2])
    return sum(seconds.values())


# --------------------------------------------------------------------------------------------------- the report
def result_of(folder: Path, name: str) -> dict:
    evaluated = name in ZERO_SHOT or name in DEEP
    return read_json(folder / f"{name}.json" if evaluated else folder / name / "results.json")


def collect(folders: list[Path], domain: str, core: bool = False) -> dict:
    """Each arm's test metrics over the seeds (mean, spread, each seed's), the CPT validation losses, the costs of
    post-training, and every claim's difference, from the runs' own result files."""
    names = [*ZERO_SHOT, *(n for n in SFT_RUNS if measured(n, core)), "baseline",
             *(n for n in DEEP if measured(n, core)), *(n for n in ALIGN_RUNS if measured(n, core))]
    results = {name: [result_of(f, name) for f in folders] for name in names}
    test = {name: over_seeds([r["model"] for r in rs]) for name, rs in results.items()}
    test["popularity"] = over_seeds([r["popularity"] for r in results["zero-shot-base"]])
    cpt = {name: over_seeds([{"val_loss": result_of(f, name)["training"]["validation"]["val_loss"]} for f in
                             folders])["val_loss"] for name in CPT_RUNS if measured(name, core)}
    costs = {name: over_seeds([{**r["top10"], "recall@50": r["model"]["recall@50"],
                                **({"held_out_loglik": r["held_out_loglik"]["after"],
                                    "held_out_loglik_before": r["held_out_loglik"]["before"]}
                                   if "held_out_loglik" in r else {})} for r in results[name]])
             for name in [*DEEP, *ALIGN_RUNS] if name in results}
    pairs = [(claim, a, b) for claim, a, b in PAIRS if a in results and b in results]
    return {"domain": domain, "seeds": [f.name for f in folders], "protocol": results["zero-shot-base"][0]["protocol"],
            "baseline_protocol": results["baseline"][0]["protocol"], "test": test, "cpt_val_loss": cpt,
            "post_training": costs,
            "differences": [{"claim": claim, "a": a, "b": b, **difference(folders, a, b)} for claim, a, b in pairs]}


def over_seeds(figures: list[dict]) -> dict:
    """Each figure's mean over the seeds, with its standard deviation and every seed's value."""
    return {k: {"mean": statistics.fmean(f[k] for f in figures),
                "sd": statistics.stdev([f[k] for f in figures]) if len(figures) > 1 else 0.0,
                "seeds": [f[k] for f in figures]} for k in figures[0]}


def per_user_ranks(folder: Path, name: str) -> dict[str, float]:
    """Each test user's 0-based rank of the target in run `name` (inf where the target was not retrieved)."""
    evaluated = name in ZERO_SHOT or name in DEEP
    path = folder / f"{name}-per_user.jsonl" if evaluated else folder / name / "results-per_user.jsonl"
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
            raise UserError(f"{path}: line {number} is not a per-user rank ({quote(line, 60)}); expected "
                            f"{{\"user\": ..., \"rank\": ...}} as evaluate writes it; {redo}") from None
    return ranks


def paired_bootstrap(ranks_a, ranks_b, k: int = 10, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """NDCG@k of ranker A minus ranker B on the same users, with a 95% paired-bootstrap interval (resampling users):
    the interval excludes 0 when the difference is unlikely to be the luck of this particular test set."""
    return seeded_bootstrap([(ranks_a, ranks_b)], k, samples, seed)[:3]


def seeded_bootstrap(pairs, k: int = 10, samples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float, list[float]]:
    """NDCG@k of A minus B over several training seeds, each seed's pair of runs ranked on the same users: the mean
    difference, a 95% interval of a two-level bootstrap (draw the seeds with replacement, then each drawn seed's
    users), and each seed's difference. It widens with the spread between seeds as well as with the users'."""
    diffs = [ndcg_gains(np.asarray(a, float), k) - ndcg_gains(np.asarray(b, float), k) for a, b in pairs]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(samples):
        drawn = rng.integers(0, len(diffs), len(diffs)) if len(diffs) > 1 else [0]
        means.append(np.mean([diffs[s][rng.integers(0, len(diffs[s]), len(diffs[s]))].mean() for s in drawn]))
    low, high = np.percentile(means, [2.5, 97.5])
    per_seed = [float(d.mean()) for d in diffs]
    return float(np.mean(per_seed)), float(low), float(high), per_seed


def difference(folders: list[Path], a: str, b: str) -> dict:
    """NDCG@10 of run a minus run b: paired over the users of each seed (one run may hold a seeded subset of the
    other's users, an LLM on --test-users beside SASRec on all: then that subset's), with a two-level bootstrap
    interval over the seeds and their users."""
    pairs = []
    for folder in folders:
        ranks_a, ranks_b = per_user_ranks(folder, a), per_user_ranks(folder, b)
        users = sorted(set(ranks_a) & set(ranks_b))
        if len(users) != min(len(ranks_a), len(ranks_b)):
            raise UserError(f"{folder}: runs {a} and {b} were evaluated on different users; rerun with --overwrite")
        pairs.append(([ranks_a[u] for u in users], [ranks_b[u] for u in users]))
    delta, low, high, per_seed = seeded_bootstrap(pairs)
    return {"ndcg@10": delta, "ci95": [low, high], "users": len(pairs[0][0]), "per_seed": per_seed}


def verdict(d: dict) -> str:
    """A claim holds (or is reversed) when its 95% interval excludes 0 and every seed's difference has that sign: with
    few seeds the bootstrap's seed level has few distinct draws (10 for 3 seeds) and understates their spread."""
    low, high = d["ci95"]
    if low > 0 or high < 0:
        if all((x > 0) == (low > 0) and x != 0 for x in d["per_seed"]):
            return "yes" if low > 0 else "no, reversed"
        return "inconclusive: the seeds disagree"
    return "inconclusive"


def markdown(report: dict) -> str:
    t, loss, n = report["test"], report["cpt_val_loss"], len(report["seeds"])
    spread = lambda x: f"{x['mean']:.4f}" + (f" ± {x['sd']:.4f}" if n > 1 else "")  # noqa: E731
    row = lambda label, name: (  # noqa: E731
        f"| {label} | {spread(t[name]['recall@10'])} | {spread(t[name]['ndcg@10'])} |\n" if name in t else "")
    seeds = f"{n} seeds ({', '.join(report['seeds'])}), mean ± sd" if n > 1 else "one seed"
    lines = [f"Test split of `{report['domain']}`; {report['protocol']}. {seeds}.\n\n",
             "| setting | Recall@10 | NDCG@10 |\n|---|---|---|\n",
             row("popularity", "popularity"), row("SASRec on item IDs, same split", "baseline"),
             row("base model (no CPT), zero-shot", "zero-shot-base"),
             row("after all-domain CPT, zero-shot", "zero-shot-cpt"),
             row("SFT from base (no CPT), 100% users", "sft-base"), row("SFT from CPT, 100% users", "sft-cpt"),
             row("SFT from base (no CPT), 10% users", "sft-base-10%"), row("SFT from CPT, 10% users", "sft-cpt-10%"),
             row("SFT from CPT, then post-training (S-DPO)", "align-cpt"),
             row("SFT from CPT on 10% users, then post-training", "align-cpt-10%"),
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
            lines.append(f"| {label} | {spread(loss[cpt])} | {spread(t[sft]['recall@10'])} | "
                         f"{spread(t[sft]['ndcg@10'])} |\n")
    costs = report["post_training"]
    if costs:
        lines.append("\n| 50 beams | NDCG@10 | Recall@50 | top-10 coverage | top-10 popularity percentile | held-out "
                     "log-likelihood |\n|---|---|---|---|---|---|\n")
        for label, name in (("SFT from CPT", "sft-cpt-50beams"), ("then post-training", "align-cpt"),
                            ("SFT from CPT, 10% users", "sft-cpt-10%-50beams"),
                            ("then post-training", "align-cpt-10%")):
            if name in costs:
                c = costs[name]
                loglik = c.get("held_out_loglik", costs.get(ALIGN_RUNS_OF.get(name, ""), {}).get(
                    "held_out_loglik_before"))
                lines.append(f"| {label} | {spread(t[name]['ndcg@10'])} | {spread(c['recall@50'])} | "
                             f"{spread(c['coverage'])} | {spread(c['popularity_percentile'])} | "
                             f"{spread(loglik) if loglik else '-'} |\n")
    interval = "two-level bootstrap over seeds and users" if n > 1 else "paired bootstrap over users"
    lines.append(f"\n| claim | NDCG@10 difference | 95% CI ({interval}) | holds here |\n|---|---|---|---|\n")
    for d in report["differences"]:
        low, high = d["ci95"]
        each = f" (seeds: {', '.join(f'{x:+.4f}' for x in d['per_seed'])})" if n > 1 else ""
        lines.append(f"| {d['claim']} | {d['ndcg@10']:+.4f}{each} | [{low:+.4f}, {high:+.4f}] | {verdict(d)} |\n")
    lines.append(f"\nWall time: {report['seconds'] / 60:.1f} min.\n")
    return "".join(lines)


ALIGN_RUNS_OF = {f"{sft}-50beams": name for name, sft in ALIGN_RUNS.items()}  # SFT's row: align's "before"


# --------------------------------------------------------------------------------------------------- the command
def command(out: Path = typer.Option(Path("runs/reproduce"), help="Directory of all runs and the report."),
            data: Path = typer.Option(DEFAULT_DATA, help="Dataset (default: the built-in world)."),
            model: Optional[Path] = typer.Option(None, help="Base model (default: models/small)."),
            domain: str = typer.Option("games", help="Downstream domain of the comparisons."),
            cpt_tokens: int = typer.Option(1_000_000, help="Token budget of each CPT run."),
            sft_epochs: float = typer.Option(5.0, help="Epochs of each SFT run."),
            seed: int = typer.Option(0, help="The first seed; with --seeds N also seed + 1, ..., seed + N - 1."),
            seeds: int = typer.Option(1, help="Train every arm this many times, one seed each."),
            resume: bool = typer.Option(False, help="Reuse the finished runs of an earlier reproduction."),
            overwrite: bool = typer.Option(False, help="Replace an earlier reproduction."),
            core: bool = typer.Option(False, help="Only zero-shot before/after CPT, SFT with 10% of the users from "
                                      "either start and post-training after it (a pretrained LLM on CPU budgets)."),
            test_users: int = typer.Option(0, help="Evaluate a seeded subset of test users (0 = all)."),
            val_users: Optional[int] = typer.Option(None, help="Validation users of each SFT run (default: finetune's "
                                                    "500; a large LLM on CPU: fewer)."),
            progress: bool = PROGRESS):
    """Run the comparisons behind CPRec's claims (zero-shot, CPT vs no CPT, limited SFT, sequence kinds, schedules)
    and post-training's, with one budget over one or several seeds, and write runs/reproduce/report.md."""
    for option, amount in (("--cpt-tokens", cpt_tokens), ("--sft-epochs", sft_epochs), ("--seeds", seeds)):
        if not amount > 0:
            raise UserError(f"{option} {amount}: expected a value > 0")
    ds = open_dataset(data)
    if ds.domain(domain).role != "downstream":
        downstream = [k for k, d in ds.domains.items() if d.role == "downstream"]
        raise UserError(f"--domain {quote(domain)} is a pre-training domain: CPT reads it, so the zero-shot and CPT "
                        f"claims would not be about an unseen domain; choose one of {', '.join(downstream) or 'none'}"
                        " (prepare the data with --downstream)")
    if model is not None and not (model / "config.json").is_file():
        raise UserError(f"--model {model}: no checkpoint there (config.json not found)")
    start = base_model(model, data, 0)
    Tokenizer.from_pretrained(start)  # a broken model is refused here rather than as the first of many failed runs
    Decoder.from_pretrained(start)
    for option, count in (("--test-users", test_users), ("--val-users", val_users)):
        if count is not None and count < 0:
            raise UserError(f"{option} {count}: expected 0 (all) or a positive count")
    report = reproduce(out, data, start, domain, cpt_tokens, sft_epochs, seed, resume, overwrite, core, test_users,
                       val_users, ds.fingerprint, progress, seeds)
    console.print((out / "report.md").read_text(), highlight=False)
    say(f"report in {out / 'report.md'} ({report['seconds'] / 60:.1f} min)")
