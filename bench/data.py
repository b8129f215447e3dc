"""The data sections over synthetic Amazon Reviews 2023 corpora: prepare (records/s and peak RSS of the conversion),
scale (every phase of the data path at growing sizes) and scale-eval (evaluation of large catalogues)."""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.harness import Options, console, cprec, rss_kib

# --------------------------------------------------------------------------------------------------- prepare
CATEGORY = "Bench_Synthetic"
WORDS = ("dragon ocean star forest desert frost city jazz robot garden pirate knight ninja safari mystery ghost "
         "retro spice summit fairy steam viking zen great fun quality price works well love bought gift battery "
         "easy sturdy small cheap fast nice broke after week return again recommend son daughter").split()


def amazon_source(n: int, seed: int = 0, root: Path | None = None, categories: int = 1,
                  title_words: tuple[int, int] | None = None) -> Path:
    """A synthetic Amazon Reviews 2023 corpus of `n` reviews over `categories` categories (CATEGORY, CATEGORY_2, ...,
    users shared): the real files' fields and ~500-byte lines, a user per ~8 reviews, an item per ~25 with skewed
    popularity; titles of a few words, or with `title_words` (low, high) realistic ones of low-high words of a
    5,000-word vocabulary. Cached under /tmp by its settings: 1M reviews are ~0.5 GB."""
    name = f"cprec-bench-amazon2023-v3-{n}-{seed}-{categories}-{'-'.join(map(str, title_words or ()))}"
    out = (root or Path(tempfile.gettempdir())) / name
    if (out / "done").exists():
        return out
    rng = np.random.default_rng(seed)
    n_users = max(1, n // 8)

    def ids(k: int, width: int) -> list[str]:  # k random upper-case ids, vectorised
        return rng.integers(65, 91, (k, width), np.uint8).view(f"S{width}")[:, 0].astype(str).tolist()
    users = ids(n_users, 28)
    texts = [" ".join(rng.choice(WORDS, 45)).capitalize() + "." for _ in range(997)]
    vocabulary = [("".join(rng.choice(list("bcdfghklmnprstvz"), 3)) + rng.choice(list("aeiou")) +
                   "".join(rng.choice(list("bcdfghklmnprstvz"), 2))).capitalize() for _ in range(5000)]
    out.mkdir(parents=True, exist_ok=True)
    for c in range(categories):
        category, m = CATEGORY + f"_{c + 1}" * (c > 0), n // categories + (c < n % categories)
        n_items = max(1, m // 25)
        items = [f"B{c}" + s for s in ids(n_items, 8)]
        user, item = rng.integers(0, n_users, m), (n_items * rng.random(m) ** 2).astype(int)  # popular items first
        stamp = rng.integers(1_300_000_000_000, 1_700_000_000_000, m)  # milliseconds, as in the 2023 files
        rating, votes = rng.integers(1, 6, m), rng.geometric(0.5, m) - 1
        with open(out / f"{category}.jsonl", "w") as f:
            for k, (u, i, t, r, v) in enumerate(zip(user.tolist(), item.tolist(), stamp.tolist(), rating.tolist(),
                                                    votes.tolist())):
                f.write(f'{{"rating": {r}.0, "title": "{texts[k % 997][:30]}", "text": "{texts[(k * 7) % 997]}", '
                        f'"images": [], "asin": "{items[i]}", "parent_asin": "{items[i]}", "user_id": "{users[u]}", '
                        f'"timestamp": {t}, "helpful_vote": {v}, "verified_purchase": true}}\n')
        if title_words:
            lengths = rng.integers(title_words[0], title_words[1] + 1, n_items)
            words = rng.integers(0, len(vocabulary), (n_items, title_words[1]))
            titles = [" ".join(vocabulary[w] for w in row[:k]) for row, k in zip(words.tolist(), lengths.tolist())]
        else:
            titles = [f"{texts[i % 997][:40]} {i}" for i in range(n_items)]
        with open(out / f"meta_{category}.jsonl", "w") as f:
            for i, (asin, title) in enumerate(zip(items, titles)):
                f.write(f'{{"main_category": "Synthetic", "title": "{title}", "average_rating": 4.1, '
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




# --------------------------------------------------------------------------------------------------- scale
SCALE_CATEGORIES = [CATEGORY, CATEGORY + "_2", CATEGORY + "_3"]  # two for CPT, the last downstream
PHASES = ("prepare", "init", "cpt stream", "sft examples", "trie")


def scale_probe(phase: str, source: Path, work: Path) -> dict:
    """One phase of the data path over a synthetic corpus, in this (fresh) process: records, seconds, peak RSS."""
    from data import Encoder, cpt_stream, load_dataset, sft_examples, train_sequences
    from eval import build_trie, catalogue_tokens
    from extras.init import create_model, tokenizer_corpus
    from extras.prepare import convert_amazon
    from infra.config import SMALL
    from infra.tokenizer import Tokenizer
    before, t = rss_kib("VmRSS"), time.perf_counter()
    down = SCALE_CATEGORIES[-1]
    if phase == "prepare":
        manifest = convert_amazon(2023, source, SCALE_CATEGORIES, work / "data", downstream=[down])
        records, unit = sum(f["lines"] for p, f in manifest["report"]["files"].items() if "meta_" not in p), "reviews"
    else:
        ds = load_dataset(work / "data")
        if phase == "init":
            texts = tokenizer_corpus(ds)
            create_model(texts, work / "model", SMALL)
            records, unit = len(texts), "texts"
        else:
            encoder = Encoder(Tokenizer.from_pretrained(work / "model"))
            if phase == "cpt stream":
                stream = cpt_stream(ds, encoder)
                records, unit = len(stream), "tokens"
            elif phase == "sft examples":
                records, unit = len(sft_examples(ds, encoder, train_sequences(ds, down), down)), "examples"
            else:
                records, unit = len(build_trie(catalogue_tokens(encoder, ds, down)).item), "trie nodes"
    seconds = time.perf_counter() - t
    return dict(phase=phase, records=records, unit=unit, seconds=seconds, records_per_s=records / seconds,
                rss_before_mib=before / 1024, peak_rss_mib=rss_kib("VmHWM") / 1024)


def shared_stream(path: str, ready, go) -> dict:
    """A rank of a multi-process run reading the whole CPT stream (as an epoch of training does), with another rank
    doing the same at once: what the stream added to its private memory (RssAnon) and to the page-cache pages it
    maps (RssFile, shared by every rank that maps the file)."""
    import numpy as np
    anon, file = rss_kib("RssAnon"), rss_kib("RssFile")
    stream = np.load(path, mmap_mode="r")
    ready.wait()
    checksum = sum(int(stream[i:i + 2**22].sum(dtype=np.uint64)) for i in range(0, len(stream), 2**22))
    go.wait()  # both have read it all: measured while the other holds its mapping
    return dict(tokens=len(stream), checksum=checksum, rss_anon_mib=(rss_kib("RssAnon") - anon) / 1024,
                rss_file_mib=(rss_kib("RssFile") - file) / 1024)


def bench_scale(o: Options) -> list[dict]:
    """The data path over synthetic Amazon corpora of growing size: each phase in a fresh process, then two
    processes reading the largest CPT stream at once."""
    rows = []
    for n in o.scale_reviews:
        source = amazon_source(n, o.seed, categories=3, title_words=(8, 20))
        with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=o.scale_dir) as work:
            for phase in PHASES:
                with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                    row = pool.submit(scale_probe, phase, source, Path(work)).result()
                rows.append(dict(section="scale", reviews=n, **row))
                console.print(f"scale {n:,}: {phase} {row['seconds']:.0f} s, peak {row['peak_rss_mib']:,.0f} MiB")
            stream = next(Path(work, "data", "cache").glob("cpt-*.npy"))
            ctx = mp.get_context("spawn")
            with ctx.Manager() as manager, ProcessPoolExecutor(2, mp_context=ctx) as pool:
                ready, go = manager.Barrier(2), manager.Barrier(2)
                ranks = [pool.submit(shared_stream, str(stream), ready, go) for _ in range(2)]
                ranks = [r.result() for r in ranks]
            rows.append(dict(section="scale", reviews=n, phase="2 ranks read the stream", records=ranks[0]["tokens"],
                             unit="tokens", rss_anon_mib=max(r["rss_anon_mib"] for r in ranks),
                             checksums_equal=ranks[0]["checksum"] == ranks[1]["checksum"],
                             rss_file_mib=max(r["rss_file_mib"] for r in ranks),
                             stream_mib=stream.stat().st_size / 2**20))
    return rows


# --------------------------------------------------------------------------------------------------- scale-eval
def cprec_checked(args: list, log: Path) -> float:
    status, seconds = cprec(args, log)
    if status:
        raise RuntimeError(f"`cprec.py {' '.join(map(str, args))}` exited {status}; its output: {log}")
    return seconds


def evaluate_probe(args: list, log: Path) -> dict:
    """`cprec.py evaluate ARGS` from this (fresh) process, so RUSAGE_CHILDREN's peak RSS is that command's alone."""
    seconds = cprec_checked(args, log)
    return dict(eval_s=seconds, peak_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def bench_scale_eval(o: Options) -> list[dict]:
    """Full-ranking evaluation of catalogues of 10^4 and 10^5 items of 8-20-word titles by a briefly fine-tuned
    model, each step as a user types it: prepare, init, finetune on about `scale_eval_train_users` users for an
    epoch, then evaluate (20 beams) `scale_eval_users` test users in a fresh process (users/s, the command's seconds
    with loading, tokenizing the catalogue and building the trie, and its peak RSS)."""
    from data import Encoder, load_dataset
    from eval import catalogue_tokens
    from infra.tokenizer import Tokenizer
    rows = []
    for items in o.scale_eval_items:
        reviews = 25 * items  # amazon_source makes an item per ~25 reviews and a user per ~8
        source = amazon_source(reviews, o.seed, title_words=(8, 20))
        with tempfile.TemporaryDirectory(prefix="bench-scale-eval-", dir=o.scale_dir) as work:
            work = Path(work)
            data, model, run, result = work / "data", work / "model", work / "sft", work / "eval.json"
            cprec_checked(["prepare", "amazon2023", source, "--categories", CATEGORY, "--out", data],
                          work / "prepare.log")
            cprec_checked(["init", "--data", data, "--out", model], work / "init.log")
            fraction = min(1.0, o.scale_eval_train_users / (reviews // 8))
            sft_s = cprec_checked(["finetune", "--domain", CATEGORY, "--data", data, "--model", model, "--out", run,
                                   "--users-fraction", f"{fraction:.6f}", "--epochs", 1, "--val-users", 20,
                                   "--test-users", 1, "--no-progress"], work / "finetune.log")
            args = ["evaluate", "--domain", CATEGORY, "--data", data, "--model", run / "best", "--users",
                    o.scale_eval_users, "--out", result, "--no-progress"]
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                probe = pool.submit(evaluate_probe, args, work / "evaluate.log").result()
            r = json.loads(result.read_text())
            titles = catalogue_tokens(Encoder(Tokenizer.from_pretrained(model)), load_dataset(data), CATEGORY)
            rows.append(dict(section="scale-eval", items=r["items"], users=r["users"],
                             title_tokens=float(np.mean([len(t) for t in titles])), users_per_s=r["users_per_s"],
                             rank_s=r["seconds"], **probe,
                             finetune_s=sft_s, ndcg=r["model"]["ndcg@10"], popularity_ndcg=r["popularity"]["ndcg@10"]))
            console.print(f"scale-eval {r['items']:,} items: {r['users_per_s']:.2f} users/s, evaluate "
                          f"{probe['eval_s']:.0f} s, peak {probe['peak_rss_mib']:,.0f} MiB")
    return rows
