"""The generate section: our ranking (eval.evaluate, a trie-constrained beam search batched over users with one KV
cache per prompt) beside what the peers run, transformers' `generate` with `num_beams` and a prefix-trie
`prefix_allowed_tokens_fn` (LC-Rec at batch 1, MiniOneRec at batch 8), on the same checkpoint, prompts, beams,
precision and threads. Both rankings are then scored again by the exact scorer and checked against the exhaustive
ranking (every item scored exactly) on a few users."""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import Options, console
from bench.ranking import only_users
from data import TEST, Encoder, eval_cases, pad
from extras.init import tokenizer_corpus
from extras.world import WorldConfig, open_dataset, write_world
from infra.config import DEFAULT_DATA, SMALL
from infra.device import autocast, peak_flops, resolve_precision
from infra.files import UserError
from infra.tokenizer import Tokenizer
from model import Decoder

KEY, HF_BATCHES, OURS = "games", (1, 8), "ours (evaluate)"  # generate at batch 1: LC-Rec; 8: MiniOneRec
QUICK_WORLD = WorldConfig(users=150, items_per_domain=0.1)  # 100 games items: --quick without a world at hand


# --------------------------------------------------------------------------------------------------- transformers
def require_transformers() -> None:
    """Refuse at once, in one line, where transformers (a benchmark-only dependency) is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"the generate section needs transformers ({e}); install it with: pip install "
                        "'transformers>=4.45'") from None


def load_transformers(path: Path, device: str) -> torch.nn.Module:
    """The same HF-layout checkpoint through AutoModelForCausalLM, fp32 weights like ours (autocast does the rest)."""
    from transformers import AutoModelForCausalLM

    from bench.decoder import quiet_transformers
    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device, torch.float32).eval()


def prefix_trie(items: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """Every proper prefix of an item -> the tokens that may follow it: the peers' trie (a dict over prefixes)."""
    allowed: dict[tuple[int, ...], set[int]] = {}
    for item in items:
        for n in range(len(item)):
            allowed.setdefault(tuple(item[:n]), set()).add(item[n])
    return {prefix: sorted(tokens) for prefix, tokens in allowed.items()}


def terminator(items: list[list[int]]) -> int:
    """The token every item ends with and no item holds elsewhere: generate's eos, so that a beam ends exactly where
    an item does and its score is the item's, terminator included, as ours."""
    last = {item[-1] for item in items}
    if len(last) != 1 or any(item[-1] in item[:-1] for item in items):
        raise UserError("the generate section needs one terminator token ending every item and inside none; this "
                        f"tokenizer ends items with {sorted(last)[:5]}")
    return last.pop()


def generate_rank(hf: torch.nn.Module, prompts: list[list[int]], items: list[list[int]], beams: int, pad_id: int,
                  batch: int) -> tuple[list[list[int]], list[list[float]], float]:
    """Each prompt's top-`beams` catalogue positions and generate's scores (best first), and the seconds the
    `generate` calls took: left-padded batches of `batch` prompts, as the peers call it."""
    from transformers import GenerationConfig
    eos, allowed = terminator(items), prefix_trie(items)
    position = {tuple(item): k for k, item in enumerate(items)}
    # length_penalty 0 and early_stopping "never": the score is the sum of log-probabilities (ours), and the search
    # stops once no live beam can beat the worst finished one (HF's "canonical beam search").
    config = GenerationConfig(num_beams=beams, num_return_sequences=beams, do_sample=False, length_penalty=0.0,
                              early_stopping="never", max_new_tokens=max(map(len, items)), eos_token_id=eos,
                              pad_token_id=pad_id, return_dict_in_generate=True, output_scores=True)
    device, outputs, seconds = next(hf.parameters()).device, [], 0.0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        ids = torch.as_tensor(pad(chunk, pad_id, left=True), device=device)
        mask = torch.as_tensor(pad([[1] * len(p) for p in chunk], 0, left=True), device=device)
        width = ids.shape[1]
        # Off the trie (a beam of -inf candidates, or a finished user's padding) only eos is allowed: the row ends.
        fn = lambda _, row, w=width: allowed.get(tuple(row[w:].tolist()), [eos])  # noqa: E731
        t = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config, prefix_allowed_tokens_fn=fn)
        seconds += time.perf_counter() - t
        outputs.append((out.sequences[:, width:].tolist(), out.sequences_scores.float().tolist()))
    tops, scores = [], []
    for sequences, seq_scores in outputs:
        for u in range(len(sequences) // beams):
            top, score = [], []
            for tokens, s in zip(sequences[u * beams:(u + 1) * beams], seq_scores[u * beams:(u + 1) * beams]):
                k = position.get(tuple(tokens[:tokens.index(eos) + 1] if eos in tokens else tokens))
                if k is not None and np.isfinite(s) and k not in top:
                    top.append(k), score.append(s)
            tops.append(top), scores.append(score)
    return tops, scores, seconds


# --------------------------------------------------------------------------------------------------- the work
@contextlib.contextmanager
def counting(model: torch.nn.Module, config):
    """Count the matmul FLOPs a ranker spends: every token through the embedding runs the decoder's body (2 FLOPs a
    weight), every row through the output layer runs the vocabulary projection; attention scores are left out (a few
    percent at these lengths), and ours is counted high by its prompt pass's last layer, which finishes only the
    last position. The same hooks on ours and on transformers' model: what each search computes."""
    body = config.n_params - config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) - config.dim
    count = {"flops": 0.0}
    ours = isinstance(model, Decoder)
    embed = model.embed_tokens if ours else model.get_input_embeddings()
    head = model.lm_head if ours else model.get_output_embeddings()

    def add(flops: float):
        count["flops"] += flops
    hooks = [embed.register_forward_hook(lambda m, args, out: add(2 * body * args[0].numel())),
             head.register_forward_hook(lambda m, args, out: add(2 * m.weight.numel() * args[0][..., 0].numel()))]
    try:
        yield count
    finally:
        for hook in hooks:
            hook.remove()


# Where ours' time goes: the profiler's self CPU time by kind of op, and the prompt pass apart (timed by a wrapper).
KINDS = {"weights matmul (body and vocabulary projection)": ("aten::mm", "aten::addmm"),
         "attention matmul": ("aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"),
         "log-softmax and softmax": ("aten::_log_softmax", "aten::_softmax"),
         "cache and grid copies": ("aten::index_select", "aten::index_copy_", "aten::copy_", "aten::cat",
                                   "aten::index", "aten::index_put_", "aten::fill_", "aten::zeros", "aten::empty"),
         "norms, RoPE, SiLU, residuals": ("aten::mul", "aten::add", "aten::silu", "aten::neg", "aten::pow",
                                          "aten::mean", "aten::rsqrt", "aten::sum", "aten::masked_fill_"),
         "search bookkeeping (trie, top-k, pool)": ("aten::topk", "aten::unique_consecutive", "aten::gather",
                                                    "aten::where", "aten::nonzero", "aten::any", "aten::eq",
                                                    "aten::bincount", "aten::argsort", "aten::sort")}


def where_time_goes(model: Decoder, encoder: Encoder, ds, users: int, beams: int, seed: int) -> dict:
    """Shares of ours' self CPU time by kind of op (KINDS; the rest is "other": views, Python and small ops), and the
    prompt pass's share of the wall time."""
    from torch.profiler import ProfilerActivity, profile

    import eval as evaluation
    prompt_pass, seconds = evaluation.prompt_cache, {"prompt pass": 0.0}

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return prompt_pass(*args, **kwargs)
        finally:
            seconds["prompt pass"] += time.perf_counter() - start
    evaluation.prompt_cache = timed  # search() looks it up in the module at each call
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            began = time.perf_counter()
            evaluation.evaluate(model, encoder, ds, KEY, beams=beams, users=users, seed=seed)
            wall = time.perf_counter() - began
    finally:
        evaluation.prompt_cache = prompt_pass
    self_time = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_time.values())
    shares = {kind: sum(self_time.get(op, 0) for op in ops) / total for kind, ops in KINDS.items()}
    shares["other"] = 1 - sum(shares.values())
    return dict(shares, **{"the prompt pass, of the wall time": seconds["prompt pass"] / wall})


# --------------------------------------------------------------------------------------------------- one model
def compare(name: str, path: Path, ds, users: int, precision: str, o: Options) -> list[dict]:
    """Ours and generate at each batch size on `users` test users of `path`, then the exact scores and the
    exhaustive check; a row per ranker."""
    from eval import catalogue_tokens, evaluate, exact_scores, metrics, rank_in_list, user_prompts
    model = Decoder.from_pretrained(path, device=o.device)
    encoder = Encoder(Tokenizer.from_pretrained(path))
    hf = load_transformers(path, o.device)
    catalogue = ds.catalogue(KEY)
    position = {ds.item_ids[item]: k for k, item in enumerate(catalogue)}
    items, pad_id = catalogue_tokens(encoder, ds, KEY), encoder.tokenizer.pad_id
    with autocast(precision, torch.device(o.device)):
        evaluate(model, encoder, ds, KEY, beams=o.beams, users=1, seed=o.seed)  # warm-up: thread pools, oneDNN
        with counting(model, model.config) as work:
            ours = evaluate(model, encoder, ds, KEY, beams=o.beams, users=users, seed=o.seed)
        # generate ranks the very users evaluate ranked, in its order, from the same prompts
        by_user = {ds.user_ids[c.user]: c for c in eval_cases(ds, KEY, TEST)}
        cases = [by_user[r["user"]] for r in ours["per_user"]]
        assert [ds.item_ids[c.target] for c in cases] == [r["target"] for r in ours["per_user"]], "other cases"
        prompts = user_prompts(encoder, ds, [c.history for c in cases], KEY)
        generate_rank(hf, prompts[:1], items, o.beams, pad_id, 1)  # warm-up
        ranked = {OURS: ([[position[i] for i in r["top10"]] for r in ours["per_user"]], None,
                                           ours["seconds"])}
        flops = {OURS: work["flops"]}
        for batch in HF_BATCHES:
            with counting(hf, model.config) as work:
                ranked[f"generate, batch {batch}"] = generate_rank(hf, prompts, items, o.beams, pad_id, batch)
            flops[f"generate, batch {batch}"] = work["flops"]
        # Every list's top-10 scored again by the exact scorer, once per user over their union.
        exact = []
        for u, prompt in enumerate(prompts):
            union = sorted({k for tops, _, _ in ranked.values() for k in tops[u][:10]})
            exact.append(dict(zip(union, exact_scores(model, prompt, [items[k] for k in union], pad_id).tolist())))
        # The exhaustive ranking of a seeded subset of the users: every item scored exactly.
        chosen = set(np.random.default_rng(o.seed).choice([r["user"] for r in ours["per_user"]],
                                                          min(o.generate_exact_users, users), replace=False).tolist())
        full = evaluate(model, encoder, only_users(ds, chosen), KEY, exact=True)
    exhaustive = {r["user"]: [position[i] for i in r["top10"]] for r in full["per_user"]}
    assert set(exhaustive) == chosen, "the exact run did not score the chosen users"
    user_ids = [r["user"] for r in ours["per_user"]]
    sums = {ranker: [sum(exact[u][k] for k in tops[u][:10]) for u in range(len(prompts))]
            for ranker, (tops, _, _) in ranked.items()}
    ours_tops = ranked[OURS][0]
    common = dict(section="generate", model=name, model_path=str(path), params=model.config.n_params,
                  precision=precision, items=len(catalogue), beams=o.beams, threads=o.threads)
    with autocast(precision, torch.device(o.device)):
        shares = where_time_goes(model, encoder, ds, users, o.beams, o.seed)
    console.print(f"generate {name}, where ours' time goes (self CPU time, profiled): " + "; ".join(
        f"{kind} {share:.0%}" for kind, share in shares.items()), highlight=False)
    rows = []
    for ranker, (tops, scores, seconds) in ranked.items():
        chosen_tops = [(tops[u], exhaustive[user]) for u, user in enumerate(user_ids) if user in exhaustive]
        row = dict(common, ranker=ranker, users=len(prompts), users_per_s=len(prompts) / seconds,
                   gflop_per_user=flops[ranker] / len(prompts) / 1e9, gflops=flops[ranker] / seconds / 1e9,
                   top10_logp=float(np.mean([s / max(len(t[:10]), 1) for s, t in zip(sums[ranker], tops)])),
                   exhaustive_users=len(chosen_tops),
                   exhaustive_same=float(np.mean([t[:10] == e for t, e in chosen_tops])),
                   exhaustive_overlap=float(np.mean([len(set(t[:10]) & set(e)) / max(len(e), 1)
                                                     for t, e in chosen_tops])))
        if scores is None:
            row.update(ndcg=ours["model"]["ndcg@10"], time_shares=shares)
        else:
            targets = [position[r["target"]] for r in ours["per_user"]]
            ranks = [rank_in_list(np.array(t), np.array(s), g) for t, s, g in zip(tops, scores, targets)]
            same = [set(t[:10]) == set(mine[:10]) for t, mine in zip(tops, ours_tops)]
            diff = np.array(sums[ranker]) - np.array(sums[OURS])
            row.update(ndcg=metrics(ranks)["ndcg@10"], ratio=rows[0]["users_per_s"] / row["users_per_s"],
                       overlap=float(np.mean([len(set(t[:10]) & set(mine[:10])) / max(len(mine[:10]), 1)
                                              for t, mine in zip(tops, ours_tops)])),
                       higher=dict(ours=float(np.mean((diff < 0) & ~np.array(same))), same=float(np.mean(same)),
                                   generate=float(np.mean((diff > 0) & ~np.array(same)))))
            h = row["higher"]
            console.print(f"generate {name}: by the exact score, ours finds the higher-scoring top-10 for "
                          f"{h['ours']:.0%} of users, {ranker} for {h['generate']:.0%}, the same items for "
                          f"{h['same']:.0%}", highlight=False)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- the section
def bench_generate(o: Options) -> list[dict]:
    """The small model (--model, else a fresh SMALL one) and the pretrained LLM (--llm, skipped when absent or in
    --quick), each ranked by ours and by transformers' generate."""
    require_transformers()
    precision = resolve_precision(o.generate_precision, torch.device(o.device))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        data = o.data
        if o.quick and data == DEFAULT_DATA and not (data / "manifest.json").exists():
            data = Path(tmp) / "world"  # the 6,000-user world takes longer to write than the whole quick run
            write_world(data, QUICK_WORLD)
        ds = open_dataset(data)
        small = o.model
        if small is None:
            console.print("generate: no checkpoint, so a fresh (untrained) small model: N@10 means little; pass "
                          "--model runs/finetune-games/best")
            from extras.init import create_model
            small = Path(tmp) / "small"
            create_model(tokenizer_corpus(ds), small, SMALL, seed=o.seed)
        models = [("small", small, o.generate_users)]
        if o.quick:
            console.print("generate: --quick ranks the small model only")
        elif not (o.llm / "config.json").exists():
            console.print(f"generate: {o.llm.name} skipped, no checkpoint in {o.llm} (build it with "
                          "../shared/tools/smollm2, or --llm)")
        else:
            models.append((o.llm.name, o.llm, o.generate_llm_users))
        peak = peak_flops(torch.device(o.device), precision)
        console.print(f"generate: {data}, domain {KEY}, {o.beams} beams, {precision}, {o.threads} threads; the "
                      f"exhaustive ranking of {o.generate_exact_users} of the users; matmul peak {peak / 1e9:.0f} "
                      "GFLOP/s (infra.device.peak_flops)")
        for name, path, users in models:
            rows += [dict(row, peak_gflops=peak / 1e9) for row in compare(name, path, ds, users, precision, o)]
    return rows
