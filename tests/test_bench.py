"""The benchmarks, run as users run them (`python -m bench`, a fresh process: nothing imports bench), on tiny inputs;
the figures must hold the relations they claim, not only exist."""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT


def test_bench_sections_hold_their_relations(world, tiny_model, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    items = 100  # the tiny world's games catalogue: with as many beams, beam search is exhaustive
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "train,loss,eval", "--no-memory",
                           "--reps", "4", "--warmup", "0", "--precisions", "fp32", "--data", str(world), "--model",
                           str(tiny_model), "--eval-users", "6", "--exact-users", "3", "--beams", str(items),
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["section"], r.get("ranker") or r.get("impl") or r.get("model")): r for r in report["rows"]}
    beam = rows["eval", f"beam search, {items} beams"]
    assert beam["items"] == items and beam["overlap"] == 1.0 and beam["same_order"] == 1.0  # = exact scoring
    assert rows["eval", "exact scoring"]["users"] == 3
    for section, impl in (("loss", "chunked (train.py)"), ("loss", "full logits")):  # timed interleaved A B, B A
        row = rows[section, impl]
        assert row["slots"] == ([0, 1, 0, 1] if impl.startswith("chunked") else [1, 0, 1, 0])
        assert math.isclose(row["tokens_per_s"] * row["step_s"], row["tokens"])  # the median step's throughput
    train = rows["train", "small"]
    assert train["batch"] == "64×4×1" and math.isclose(train["mfu"], train["flops_per_s"] / report["peaks"]["fp32"])
    assert math.isclose(train["flops_per_s"], train["tokens_per_s"] * train["flops_per_token"])


def run_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})})


def test_baseline_section_without_recbole_says_how_to_install_it(world, tmp_path):
    blocked = tmp_path / "site" / "recbole"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('No module named recbole')\n")
    done = run_bench("--quick", "--only", "baseline", "--baseline-data", str(world), "--baseline-domains", "games",
                     env={"PYTHONPATH": str(blocked.parent)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install --no-deps recbole==1.2.1" in done.stdout and "Traceback" not in done.stderr


def test_baseline_section_ranks_recboles_scores_as_recbole_does(world, tmp_path):
    """Side by side with RecBole (when installed): the same split user by user, and our ranking of RecBole's test
    scores equal to RecBole's own evaluator (it masks no history for sequential models)."""
    pytest.importorskip("recbole")
    out = tmp_path / "baseline.json"
    done = run_bench("--quick", "--only", "baseline", "--baseline-data", str(world), "--baseline-domains", "games",
                     "--no-baseline-before", "--baseline-window", "7", "--baseline-recbole-epochs", "1", "--json",
                     str(out))
    if done.returncode == 2 and "the baseline section needs RecBole" in done.stdout:  # recbole without its own deps
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = json.loads(out.read_text())["rows"]
    assert ours["impl"] == "ours (defaults)" and theirs["impl"] == "RecBole 1.2.1 SASRec"
    assert ours["window"] == theirs["window"] == 7 and theirs["epochs"] == 1 and "RecBole epoch 1:" in done.stdout
    assert "the same history and test item in both pipelines" in theirs["split_check"]
    assert theirs["own"]["ndcg@10"] == pytest.approx(theirs["unmasked"]["ndcg@10"], abs=1e-4)  # RecBole rounds
    assert theirs["own"]["recall@10"] == pytest.approx(theirs["unmasked"]["recall@10"], abs=1e-4)
    for row in (ours, theirs):
        assert row["masked"]["recall@50"] >= row["unmasked"]["recall@50"]  # masking only removes competitors
        assert 1 <= row["best_epoch"] <= row["epochs"] <= 2 and row["to_best_s"] > 0


@pytest.mark.parametrize("args", [["--scale-eval-items", "abc"], ["--scale-reviews", "0,5"], ["--threads", "-1"],
                                  ["--device", "tpu"], ["--shape", "dim=0"], ["--json", "/nonexistent/bench.json"]])
def test_bad_counts_are_refused_before_any_section_runs(args):
    done = run_bench("--only", "scale", *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stdout.strip().splitlines()) == 1
    assert f"Invalid value for {args[0]}" in " ".join((done.stdout + done.stderr).split())


def test_generate_section_ranks_as_transformers_generate_with_a_prefix_trie(world, tiny_model, tmp_path):
    """Ours beside transformers' generate, both models of the section (the tiny one twice): with as many beams as
    items both searches are exhaustive, so both find the exhaustive top-10, the same items, at batch 1 and 8."""
    pytest.importorskip("transformers")
    out = tmp_path / "generate.json"
    done = run_bench("--only", "generate", "--data", str(world), "--model", str(tiny_model), "--llm", str(tiny_model),
                     "--beams", "100", "--generate-users", "3", "--generate-llm-users", "2",
                     "--generate-exact-users", "2", "--generate-precision", "fp32", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    rankers = ("ours (evaluate)", "generate, batch 1", "generate, batch 8")
    assert [(r["model"], r["ranker"]) for r in rows] == [(m, r) for m in ("small", tiny_model.name) for r in rankers]
    for row in rows:
        assert row["items"] == 100 and row["exhaustive_users"] == 2 and row["exhaustive_overlap"] == 1.0
        assert row["users"] == (3 if row["model"] == "small" else 2) and row["users_per_s"] > 0
        if row["ranker"].startswith("generate"):
            assert row["overlap"] == 1.0 and row["higher"] == {"ours": 0.0, "same": 1.0, "generate": 0.0}
            assert row["ndcg"] == pytest.approx(rows[0 if row["model"] == "small" else 3]["ndcg"])
        else:
            assert row["exhaustive_same"] == 1.0  # ours = the exhaustive ranking, order included


def test_generate_section_without_transformers_says_how_to_install_it(world, tiny_model, tmp_path):
    blocked = tmp_path / "site" / "transformers"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('No module named transformers')\n")
    done = run_bench("--only", "generate", "--data", str(world), "--model", str(tiny_model),
                     env={"PYTHONPATH": str(blocked.parent)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install 'transformers>=4.45'" in done.stdout and "Traceback" not in done.stderr
