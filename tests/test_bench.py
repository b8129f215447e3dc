"""The benchmarks, run as users run them (`python -m bench`, a fresh process: nothing imports bench), on tiny inputs;
the figures must hold the relations they claim, not only exist."""
import json
import math
import os
import subprocess
import sys

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
