"""The data section: Amazon Reviews 2023 conversion of a synthetic category (records/s and peak RSS per phase)."""
from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.harness import Options, console, rss_kib

# --------------------------------------------------------------------------------------------------- prepare
CATEGORY = "Bench_Synthetic"
WORDS = ("dragon ocean star forest desert frost city jazz robot garden pirate knight ninja safari mystery ghost "
         "retro spice summit fairy steam viking zen great fun quality price works well love bought gift battery "
         "easy sturdy small cheap fast nice broke after week return again recommend son daughter").split()


def amazon_source(n: int, seed: int = 0, root: Path | None = None) -> Path:
    """A synthetic Amazon Reviews 2023 category of `n` reviews: the real files' fields and ~500-byte lines, a user
    per ~8 reviews, an item per ~25 with skewed popularity. Cached under /tmp by `n`: 1M reviews are ~0.5 GB."""
    out = (root or Path(tempfile.gettempdir())) / f"cprec-bench-amazon2023-v2-{n}-{seed}"
    if (out / "done").exists():
        return out
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1, n // 8), max(1, n // 25)

    def ids(k: int, width: int) -> list[str]:  # k random upper-case ids, vectorised
        return rng.integers(65, 91, (k, width), np.uint8).view(f"S{width}")[:, 0].astype(str).tolist()
    users, items = ids(n_users, 28), ["B0" + s for s in ids(n_items, 8)]
    texts = [" ".join(rng.choice(WORDS, 45)).capitalize() + "." for _ in range(997)]
    user, item = rng.integers(0, n_users, n), (n_items * rng.random(n) ** 2).astype(int)  # popular items first
    stamp = rng.integers(1_300_000_000_000, 1_700_000_000_000, n)  # milliseconds, as in the 2023 files
    rating, votes = rng.integers(1, 6, n), rng.geometric(0.5, n) - 1
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{CATEGORY}.jsonl", "w") as f:
        for k, (u, i, t, r, v) in enumerate(zip(user.tolist(), item.tolist(), stamp.tolist(), rating.tolist(),
                                                votes.tolist())):
            f.write(f'{{"rating": {r}.0, "title": "{texts[k % 997][:30]}", "text": "{texts[(k * 7) % 997]}", '
                    f'"images": [], "asin": "{items[i]}", "parent_asin": "{items[i]}", "user_id": "{users[u]}", '
                    f'"timestamp": {t}, "helpful_vote": {v}, "verified_purchase": true}}\n')
    with open(out / f"meta_{CATEGORY}.jsonl", "w") as f:
        for i, asin in enumerate(items):
            f.write(f'{{"main_category": "Synthetic", "title": "{texts[i % 997][:40]} {i}", "average_rating": 4.1, '
                    f'"rating_number": {i % 500}, "features": [], "description": [], "price": null, "images": [], '
                    f'"videos": [], "store": "Store {i % 97}", "categories": [], "details": {{}}, '
                    f'"parent_asin": "{asin}", "bought_together": null}}\n')
    (out / "done").touch()
    return out


def prepare_probe(phase: str, source: Path) -> dict:
    """Time one phase in this (fresh) process: parse = prepare._read_reviews consumed, convert = convert_amazon."""
    from extras import prepare
    before, report = rss_kib("VmRSS"), {"files": {}}
    path = source / f"{CATEGORY}.jsonl"
    t = time.perf_counter()
    if phase == "parse":
        for _ in prepare._read_reviews(path, prepare.AMAZON[2023][2], report, False):
            pass
    else:
        with tempfile.TemporaryDirectory(prefix="bench-prepare-") as out:
            report = prepare.convert_amazon(2023, source, [CATEGORY], Path(out) / "data")["report"]
    seconds = time.perf_counter() - t
    stats = report["files"][str(path)]
    assert stats["malformed"] == 0, f"the synthetic reviews have malformed lines: {stats}"
    records = stats["lines"]
    return dict(records=records, seconds=seconds, records_per_s=records / seconds, rss_before_mib=before / 1024,
                peak_rss_mib=rss_kib("VmHWM") / 1024)


def bench_prepare(o: Options) -> list[dict]:
    t = time.perf_counter()
    source = amazon_source(o.prepare_records, o.seed)
    console.print(f"prepare: {source} ({sum(f.stat().st_size for f in source.glob('*.jsonl')) / 1e6:,.0f} MB, "
                  f"ready in {time.perf_counter() - t:.1f} s)")
    rows = []
    for phase in ("parse", "convert"):  # spawn: a fresh interpreter, so its peak RSS is this phase's alone
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            rows.append(dict(section="prepare", phase=phase, **pool.submit(prepare_probe, phase, source).result()))
    return rows


