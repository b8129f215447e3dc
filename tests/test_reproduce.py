"""The reproduction report is assembled from the runs' own result files and command log."""
import json
from pathlib import Path

import pytest

from extras.reproduce import CPT_RUNS, SFT_RUNS, collect, difference, markdown, wall_time
from infra.files import UserError


def metrics(r10):
    return {"recall@10": r10, "ndcg@10": r10 / 2}


def per_user(path, hits, users=200):
    """`users` users; the first `hits` find the target at rank 0, the rest miss it."""
    path.write_text("".join(json.dumps({"user": f"u{u:03d}", "rank": 0 if u < hits else None}) + "\n"
                            for u in reversed(range(users))))  # any order: users are matched by id


def test_report_from_result_files(tmp_path):
    for k, name in enumerate(["zero-shot-base", "zero-shot-cpt"]):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"model": metrics(0.1 * k), "popularity": metrics(0.08), "protocol": "full ranking over all 9 items"}))
        per_user(tmp_path / f"{name}-per_user.jsonl", 100 * k)
    for k, name in enumerate(SFT_RUNS):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"model": metrics(0.2 + k / 100)}))
        per_user(tmp_path / name / "results-per_user.jsonl", {"sft-base": 120, "sft-cpt-constant": 95}.get(name, 100))
    (tmp_path / "baseline").mkdir()  # the SASRec baseline: results and per-user ranks like any SFT run
    (tmp_path / "baseline" / "results.json").write_text(json.dumps(
        {"model": metrics(0.15), "protocol": "full ranking over all 9 items; SASRec-style; history window 200"}))
    per_user(tmp_path / "baseline" / "results-per_user.jsonl", 60)
    for k, name in enumerate(CPT_RUNS):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"training": {"validation": {"val_loss": 1 + k}}}))
    (tmp_path / "commands.log").write_text(
        "$ python cprec.py pretrain --out a\n# 100 s\n$ python cprec.py evaluate --out b\n# 2 s\n"
        "$ python cprec.py pretrain --out a --no-progress\n# reused a/results.json\n"
        "$ python cprec.py evaluate --out b\n# 30 s\n")
    report = collect(tmp_path, "games")
    report["seconds"] = wall_time(tmp_path / "commands.log")
    assert report["seconds"] == 130  # the failed first evaluate (2 s) was superseded; the reused run keeps 100 s
    assert report["test"]["popularity"] == metrics(0.08) and report["cpt_val_loss"]["cpt-constant"] == 5
    text = markdown(report)
    assert "| after all-domain CPT, zero-shot | 0.1000 | 0.0500 |" in text
    assert "| SFT from CPT, 10% users | 0.2100 | 0.1050 |" in text
    assert "| constant | 5.0000 | 0.2700 | 0.1350 |" in text and "Wall time: 2.2 min." in text
    assert "| CPT helps zero-shot | +0.5000 | [+0.4" in text  # half the users gained a perfect hit
    assert "| CPT helps SFT, 100% users | -0.1000 | [-0.1" in text and "| no, reversed |" in text
    assert "| both kinds beat domain-only | +0.0000 | [+0.0000, +0.0000] | inconclusive |" in text
    assert "| WSA beats constant | +0.0250 | [+0.0" in text
    assert "| popularity | 0.0800 | 0.0400 |\n| SASRec on item IDs, same split | 0.1500 | 0.0750 |" in text
    assert "SASRec: full ranking over all 9 items; SASRec-style; history window 200." in text
    assert "| CPT+SFT beats SASRec (item IDs) | +0.2000 | [+0.1" in text  # 100 vs 60 of 200 users at rank 0


def test_differences_pair_the_same_users(tmp_path):
    """A run on a subset of another's users is compared on that subset; runs on overlapping sets are refused."""
    for name, users, rank in [("sft-cpt", range(3), 0), ("sft-base", range(5), None), ("sft-cpt-10%", range(1, 7), 0)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results-per_user.jsonl").write_text(
            "".join(json.dumps({"user": f"u{u}", "rank": rank}) + "\n" for u in users))
    d = difference(tmp_path, "sft-cpt", "sft-base")  # 3 users, each a hit (gain 1) against a miss
    assert (d["users"], d["ndcg@10"], d["ci95"]) == (3, 1.0, [1.0, 1.0])
    with pytest.raises(UserError, match="different users"):
        difference(tmp_path, "sft-cpt", "sft-cpt-10%")


def test_core_report_needs_only_the_core_runs(tmp_path):
    """--core (a pretrained LLM on CPU budgets): zero-shot before/after CPT and 10%-user SFT from either start."""
    for k, name in enumerate(["zero-shot-base", "zero-shot-cpt"]):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"model": metrics(0.1 * k), "popularity": metrics(0.08), "protocol": "full ranking over all 9 items"}))
        per_user(tmp_path / f"{name}-per_user.jsonl", 100 * k)
    for name, hits in [("sft-cpt-10%", 80), ("sft-base-10%", 40), ("baseline", 60)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"model": metrics(hits / 200), "protocol": "p"}))
        # SASRec is evaluated on all 300 test users, the LLM runs on a seeded 200 of them: paired on those 200
        per_user(tmp_path / name / "results-per_user.jsonl", hits, 300 if name == "baseline" else 200)
    (tmp_path / "cpt").mkdir()
    (tmp_path / "cpt" / "results.json").write_text(json.dumps({"training": {"validation": {"val_loss": 1.5}}}))
    report = collect(tmp_path, "games", core=True)
    assert [d["claim"] for d in report["differences"]] == ["CPT helps zero-shot", "CPT helps SFT, 10% users",
                                                          "CPT+SFT on 10% users beats SASRec (item IDs)"]
    assert report["differences"][1]["ndcg@10"] == pytest.approx(0.2)  # 80 vs 40 of 200 users at rank 0 (gain 1)
    assert report["differences"][2]["ndcg@10"] == pytest.approx(0.1) and report["differences"][2]["users"] == 200
    report["seconds"] = 60
    text = markdown(report)
    assert "| SFT from CPT, 10% users | 0.4000 | 0.2000 |" in text and "100% users" not in text
    assert "CPT sequences" not in text and "CPT schedule" not in text
    with pytest.raises(UserError):  # the full report needs every run
        collect(tmp_path, "games")


def test_core_runs_and_their_options(tmp_path, monkeypatch):
    """--core runs CPT, both zero-shot evaluations, the two 10%-user SFT runs and the baseline, passing --test-users
    and --val-users to every SFT run (a pretrained LLM validates on fewer users)."""
    from extras import reproduce
    issued = []
    monkeypatch.setattr(reproduce, "run", lambda args, result, resume, log: issued.append([str(a) for a in args]))
    monkeypatch.setattr(reproduce, "collect", lambda out, domain, core: {"seconds": 0})
    monkeypatch.setattr(reproduce, "markdown", lambda report: "")
    monkeypatch.setattr(reproduce, "wall_time", lambda log: 0.0)
    reproduce.reproduce(tmp_path / "r", tmp_path / "data", tmp_path / "llm", "games", 1000, 1.0, 0, False, False,
                        core=True, test_users=200, val_users=50)
    runs = [(args[0], Path(args[args.index("--out") + 1]).name) for args in issued]
    assert runs == [("pretrain", "cpt"), ("evaluate", "zero-shot-base.json"), ("evaluate", "zero-shot-cpt.json"),
                    ("finetune", "sft-cpt-10%"), ("finetune", "sft-base-10%"), ("baseline", "baseline")]
    for args in issued:
        if args[0] == "finetune":
            assert args[args.index("--val-users") + 1] == "50" and args[args.index("--test-users") + 1] == "200"
            assert args[args.index("--users-fraction") + 1] == "0.1"
        if args[0] == "evaluate":
            assert args[args.index("--users") + 1] == "200"
    issued.clear()
    reproduce.reproduce(tmp_path / "r2", tmp_path / "data", tmp_path / "llm", "games", 1000, 1.0, 0, False, False)
    assert len(issued) == len(CPT_RUNS) + 2 + len(SFT_RUNS) + 1
    assert not any("--val-users" in args for args in issued)  # finetune's own default


def test_a_missing_or_truncated_per_user_file_is_one_line(tmp_path):
    (tmp_path / "sft-cpt").mkdir()
    with pytest.raises(UserError, match="results-per_user.jsonl: cannot be read"):
        difference(tmp_path, "sft-cpt", "sft-base")
    per_user(tmp_path / "sft-cpt" / "results-per_user.jsonl", 10)
    path = tmp_path / "sft-cpt" / "results-per_user.jsonl"
    path.write_text(path.read_text()[:100])  # three whole records of 31 characters, then a cut one
    with pytest.raises(UserError, match=r"results-per_user.jsonl: line 4 is not a per-user rank .*--resume"):
        difference(tmp_path, "sft-cpt", "sft-base")
