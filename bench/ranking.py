"""Ranking sections: beam search against exact scoring on the built-in world (eval), the recommend command's latency
and batch throughput (recommend), a 100k-item synthetic catalogue's speed and memory (catalogue), beam search on a
movie catalogue (movies), and the small model beside a pretrained LLM (llm)."""
from __future__ import annotations

import contextlib
import gc
import json
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.harness import Options, console, fresh_processes, peak_memory, throughput, time_interleaved, timed
from bench.training import train_step
from data import TEST, VALID, Encoder
from extras.init import init_weights
from extras.world import open_dataset
from infra.config import SMALL, config_from_hf
from infra.device import autocast
from infra.files import read_json
from infra.tokenizer import Tokenizer
from model import Decoder


# --------------------------------------------------------------------------------------------------- eval
def only_users(ds, users: set[str]):
    """`ds` with the test items of every other user marked VALID, so evaluate() on the test split sees exactly
    `users`; their histories and the popularity counts (TRAIN only) are unchanged."""
    others = ~np.isin(np.asarray(ds.user_ids), list(users))[ds.user]
    return replace(ds, split=np.where((ds.split == TEST) & others, VALID, ds.split).astype(ds.split.dtype))


def bench_eval(o: Options) -> list[dict]:
    from eval import evaluate
    ds = open_dataset(o.data)  # the built-in world is created on first use
    console.print(f"eval: {o.model} on {o.data}, domain games")
    model = Decoder.from_pretrained(o.model, device=o.device)
    encoder = Encoder(Tokenizer.from_pretrained(o.model))
    rows = []
    for precision in o.precisions:
        with autocast(precision, torch.device(o.device)):
            beam = evaluate(model, encoder, ds, "games", beams=o.beams, users=o.eval_users, seed=o.seed)
            beam_top = {r["user"]: r["top10"] for r in beam["per_user"]}
            # Exact scoring is far slower: a seeded subset of the beam run's users, scored again exactly.
            chosen = np.random.default_rng(o.seed).choice(list(beam_top), min(o.exact_users, len(beam_top)), False)
            exact = evaluate(model, encoder, only_users(ds, set(chosen)), "games", exact=True)
        pairs = [(beam_top[r["user"]], r["top10"]) for r in exact["per_user"]]
        assert len(pairs) == len(chosen), "the exact run did not score the chosen users"
        common = dict(section="eval", precision=precision, items=beam["items"], model=str(o.model))
        rows += [dict(common, ranker=f"beam search, {o.beams} beams", users=beam["users"],
                      users_per_s=beam["users_per_s"],
                      speedup=beam["users_per_s"] / exact["users_per_s"],
                      overlap=statistics.mean(len(set(b) & set(e)) / max(len(e), 1) for b, e in pairs),
                      same_order=statistics.mean(b == e for b, e in pairs)),
                 dict(common, ranker="exact scoring", users=exact["users"], users_per_s=exact["users_per_s"])]
    return rows


# --------------------------------------------------------------------------------------------------- llm
LLM_CPT, LLM_SFT = (256, 4, 1), (128, 8, 1)  # (block, micro-batch, accumulation): 1,024 tokens a step
SFT_SUPERVISED = 8  # tokens with a loss per SFT row: about one title after a 120-token prompt


def bench_llm(o: Options) -> list[dict]:
    """The default small model beside a pretrained LLM (SmolLM2-135M-Instruct): CPT and SFT optimizer steps (random
    weights: speed does not depend on their values) and evaluation users/s of the real checkpoints on games."""
    from eval import evaluate
    if not (o.llm / "config.json").exists():
        console.print(f"llm: skipped, no checkpoint in {o.llm} (build it with ../shared/tools/smollm2, or --llm)")
        return []
    ds = open_dataset(o.data)
    models = {"small": (SMALL, o.model), o.llm.name: (config_from_hf(read_json(o.llm / "config.json")), o.llm)}
    rows = []
    for name, (config, path) in models.items():
        steps = {(kind, p): train_step(config, batch, p, o, supervised)
                 for kind, batch, supervised in (("cpt", LLM_CPT, 0), ("sft", LLM_SFT, SFT_SUPERVISED))
                 for p in o.precisions}
        times, slots = time_interleaved(steps, o.warmup, o.reps, o.device)
        del steps
        gc.collect()
        model = Decoder.from_pretrained(path, device=o.device)
        encoder = Encoder(Tokenizer.from_pretrained(path))
        for p in o.precisions:
            with autocast(p, torch.device(o.device)):
                result = evaluate(model, encoder, ds, "games", beams=20, users=o.llm_users, seed=o.seed)
            cpt, sft = (throughput(times[kind, p], math.prod(batch), 0)["tokens_per_s"]
                        for kind, batch in (("cpt", LLM_CPT), ("sft", LLM_SFT)))
            rows.append(dict(section="llm", model=name, params=config.n_params, precision=p, cpt_tokens_per_s=cpt,
                             sft_tokens_per_s=sft, users=result["users"], users_per_s=result["users_per_s"],
                             ndcg=result["model"]["ndcg@10"]))
    return rows


def bench_recommend(o: Options) -> list[dict]:
    """One recommendation at a time (latency, as `cprec.py recommend --history ...` spends it after loading) and
    the JSONL batch mode (`--input`, 256 histories a batch): the test histories of the world's games users as titles."""
    from data import eval_cases
    from extras.recommend import Recommender
    ds = open_dataset(o.data)
    console.print(f"recommend: {o.model} on {o.data}, domain games")
    model = Decoder.from_pretrained(o.model, device=o.device)
    cases = eval_cases(ds, "games", TEST)
    chosen = np.random.default_rng(o.seed).choice(len(cases), min(o.eval_users, len(cases)), replace=False)
    histories = [[ds.titles[i] for i in cases[c].history] for c in chosen]
    rows = []
    for precision in o.precisions:
        rec = Recommender(model, Encoder(Tokenizer.from_pretrained(o.model)), ds, precision=precision)
        rows.append(dict(section="recommend", precision=precision, items=len(ds.catalogue("games")),
                         **recommend_probe(rec, histories, o.device)))
    return rows


def recommend_probe(rec, histories: list[list[str]], device: str) -> dict:
    from extras.recommend import recommend_file
    rec.recommend(histories[:1], "games")  # the trie and title index are built once, on first use
    singles = histories[:RECOMMEND_LATENCY_CALLS]
    times = [timed(lambda h=h: rec.recommend([h], "games", k=10), device) for h in singles]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "users.jsonl"
        source.write_text("".join(json.dumps({"id": n, "titles": h}) + "\n" for n, h in enumerate(histories)))
        seconds = timed(lambda: recommend_file(rec, source, Path(tmp) / "out.jsonl", "games", 10), device)
    p50, p95 = np.percentile(times, [50, 95]) * 1000
    return dict(calls=len(singles), p50_ms=p50, p95_ms=p95, users=len(histories), users_per_s=len(histories) / seconds)


RECOMMEND_LATENCY_CALLS = 50


# --------------------------------------------------------------------------------------------------- catalogue
CATALOGUE_USERS = {"beam": 16, "exact": 2}  # beam: all in one beam_search batch
CATALOGUE_BEAMS, PROMPT_TOKENS, PAD, TERMINATOR = 20, 100, 0, 1


def synthetic_catalogue(n: int, vocab: int, seed: int) -> list[list[int]]:
    """`n` distinct items of 3-8 random tokens and then TERMINATOR (like a title's closing newline), which occurs in
    no item's body: so no item is another's prefix, as with real items."""
    rng, items = np.random.default_rng(seed), {}
    while len(items) < n:
        k = n - len(items)
        bodies, lengths = rng.integers(TERMINATOR + 1, vocab, (k, 8)).tolist(), rng.integers(3, 9, k).tolist()
        items.update(dict.fromkeys(tuple(body[:m]) + (TERMINATOR,) for body, m in zip(bodies, lengths)))
    return [list(item) for item in items]


def catalogue_probe(ranker: str, n: int, precision: str, o: Options) -> dict:
    """One ranker on a synthetic catalogue of `n` items, in this (fresh) process: the trie's build time and peak
    memory (beam), users/s, and the memory ranking needs beyond the resident model, items and trie, after a warm-up
    on one user (exact: and 1,000 items)."""
    from eval import beam_search, build_trie, exact_scores
    torch.set_num_threads(o.threads)
    device, users = o.device, CATALOGUE_USERS[ranker]
    model = Decoder(SMALL)
    init_weights(model, o.seed)
    model.to(device).eval()
    items = synthetic_catalogue(n, SMALL.vocab_size, o.seed)
    prompts = np.random.default_rng(o.seed + 1).integers(TERMINATOR + 1, SMALL.vocab_size, (users, PROMPT_TOKENS))
    prompts = prompts.tolist()
    row = dict(section="catalogue", precision=precision, items=n, users=users)
    if ranker == "beam":
        t = time.perf_counter()
        trie, memory = peak_memory(lambda: build_trie(items, device), device)
        row.update(ranker=f"beam search, {CATALOGUE_BEAMS} beams", trie_s=time.perf_counter() - t,
                   trie_peak_mib=memory.get("peak_mem_mib"))
        rank = lambda some: beam_search(model, some, trie, CATALOGUE_BEAMS, PAD)  # noqa: E731
        warm_up = lambda: rank(prompts[:1])  # noqa: E731
    else:
        row.update(ranker="exact scoring")
        rank = lambda some: [exact_scores(model, p, items, PAD) for p in some]  # noqa: E731
        warm_up = lambda: exact_scores(model, prompts[0], items[:1000], PAD)  # noqa: E731
    with autocast(precision, torch.device(device)):
        warm_up()  # one-time allocations (thread pools, oneDNN primitives, RoPE table) are not the ranking's
        gc.collect()
        t = time.perf_counter()
        _, memory = peak_memory(lambda: rank(prompts), device)
        seconds = time.perf_counter() - t
    if memory:
        row["resident_mib"] = memory["peak_total_mib"] - memory["peak_mem_mib"]
    return dict(row, users_per_s=users / seconds, seconds=seconds, **memory)


def bench_catalogue(o: Options) -> list[dict]:
    console.print(f"catalogue: {o.catalogue_items:,} synthetic items, model SMALL (random init)")
    rows = []
    with fresh_processes() as pool:  # a fresh process per probe: no other probe's memory in its peak
        for precision in o.precisions:
            for ranker in CATALOGUE_USERS:
                rows.append(pool.submit(catalogue_probe, ranker, o.catalogue_items, precision, o).result())
    return rows


# --------------------------------------------------------------------------------------------------- movies
MOVIE_BEAMS, MOVIE_PROMPT, MOVIE_ITEMS, MOVIE_EXACT = 20, 150, 3000, 10


def movie_catalogue(seed: int) -> tuple[list[list[int]], str]:
    """Item token sequences of a movie catalogue, and where they come from: MovieLens-100k's titles (recbole's copy,
    when installed) through a 1,024-piece SentencePiece model trained on them (7.9 tokens a title with the closing
    newline, up to 34); else MOVIE_ITEMS synthetic titles of 3-40 tokens with a long tail (median 7)."""
    with contextlib.suppress(ImportError):
        import recbole
        path = Path(recbole.__file__).parent / "dataset_example" / "ml-100k" / "ml-100k.item"
        if path.exists():
            from infra.tokenizer import train_tokenizer
            lines = path.read_text(encoding="latin-1").splitlines()[1:]
            titles = list(dict.fromkeys(line.split("\t")[1] + "\n" for line in lines))  # 1,659 distinct
            with tempfile.TemporaryDirectory(prefix="bench-movies-") as tmp:
                train_tokenizer(titles, Path(tmp), 1024)
                tokenizer = Tokenizer.from_pretrained(tmp)
            return [tokenizer.encode(t) for t in titles], f"MovieLens-100k titles ({path})"
    rng, items = np.random.default_rng(seed), {}
    while len(items) < MOVIE_ITEMS:
        length = int(np.clip(np.round(rng.lognormal(np.log(7), 0.5)), 3, 40))
        items[tuple(rng.integers(TERMINATOR + 1, 1024, length - 1).tolist()) + (TERMINATOR,)] = None
    return [list(item) for item in items], "synthetic titles (MovieLens-100k not installed)"


def movie_prompts(items: list[list[int]], users: int, seed: int) -> list[list[int]]:
    """Each user's last MOVIE_PROMPT tokens of a random history of whole titles, as in a 20-item prompt."""
    rng, prompts = np.random.default_rng(seed), []
    for _ in range(users):
        history: list[int] = []
        while len(history) < MOVIE_PROMPT:
            history += items[rng.integers(len(items))]
        prompts.append(history[-MOVIE_PROMPT:])
    return prompts


def bench_movies(o: Options) -> list[dict]:
    """Beam search against exact scoring on a movie-sized catalogue and the default model with random weights. Each
    repetition is a whole pass over the users; users/s is the median pass."""
    from eval import auto_batch_users, beam_search, build_trie, exact_scores
    items, source = movie_catalogue(o.seed)
    lengths = [len(i) for i in items]
    console.print(f"movies: {len(items):,} items from {source}, {statistics.mean(lengths):.1f} tokens a title (max "
                  f"{max(lengths)}), {MOVIE_PROMPT}-token prompts, SMALL with random weights")
    model = Decoder(SMALL)
    init_weights(model, o.seed)
    model.to(o.device).eval()
    trie = build_trie(items, o.device)
    prompts = movie_prompts(items, o.movie_users, o.seed)
    step = auto_batch_users(model, MOVIE_BEAMS, MOVIE_PROMPT, trie.depth)
    batches = [prompts[start:start + step] for start in range(0, len(prompts), step)]
    rows = []
    for precision in o.precisions:
        speed = []
        with autocast(precision, torch.device(o.device)):
            beam_search(model, prompts[:2], trie, MOVIE_BEAMS, PAD)  # warm-up: thread pools, oneDNN primitives
            for _ in range(o.movie_reps):
                t = time.perf_counter()
                found = [beam_search(model, b, trie, MOVIE_BEAMS, PAD)[0].cpu() for b in batches]  # .cpu(): a sync
                speed.append(len(prompts) / (time.perf_counter() - t))
            tops = torch.cat(found)[:, :10].tolist()
            seconds, exact_top = 0.0, {}
            for u in range(min(o.exact_users, MOVIE_EXACT, len(prompts))):
                t = time.perf_counter()
                scores = exact_scores(model, prompts[u], items, PAD).cpu()
                seconds += time.perf_counter() - t
                exact_top[u] = torch.argsort(scores, descending=True, stable=True)[:10].tolist()
        beam, exact = statistics.median(speed), len(exact_top) / seconds
        common = dict(section="movies", precision=precision, items=len(items), source=source, batch_users=step)
        rows += [dict(common, ranker="beam search", users=len(prompts), users_per_s=beam, passes=speed,
                      vs_exact=beam / exact,
                      overlap=statistics.mean(len(set(tops[u]) & set(e)) / 10 for u, e in exact_top.items()),
                      same_order=statistics.mean(tops[u] == e for u, e in exact_top.items())),
                 dict(common, ranker="exact scoring", users=len(exact_top), users_per_s=exact)]
    return rows
