"""Metrics against hand-computed ranks, the item trie, the batched beam search against exact scoring and against
the plain one (eval.plain_beam_search), masking, popularity, progress."""
import math
import re

import numpy as np
import pytest
import torch

from data import Encoder, item_text, load_dataset
from eval import (
    BeamCache,
    beam_search,
    build_trie,
    evaluate,
    exact_scores,
    metrics,
    plain_beam_search,
    popularity,
    prompt_cache,
    rank_in_list,
    rank_in_scores,
)
from helpers import random_decoder
from infra.files import UserError
from infra.tokenizer import Tokenizer
from model import Decoder


def test_metrics_match_hand_computed_values():
    m = metrics([0, 3, 12, math.inf], ks=(5, 10))
    assert m["recall@5"] == 0.5 and m["recall@10"] == 0.5
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 4)


def test_ranks_count_ties_against_the_target():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5])
    assert rank_in_scores(scores, 0) == 3  # 0.9 and the two other 0.5s go first
    assert rank_in_scores(scores, 1) == 0
    assert rank_in_scores(scores, 0, excluded=[1, 4]) == 1  # masked items do not count
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 4, (5, 9)).astype(float)  # many ties
    targets, excluded = rng.integers(0, 9, 5), [rng.choice(9, k, replace=False) for k in range(5)]
    counted = [sum(j != t and j not in ex and row[j] >= row[t] for j in range(9))  # every user's rank at once
               for row, t, ex in zip(matrix, targets, excluded)]
    assert rank_in_scores(matrix, targets, excluded).tolist() == counted
    items, top = np.array([7, 3, 9]), np.array([-1.0, -2.0, -2.0])
    assert rank_in_list(items, top, 9) == 2 and rank_in_list(items, top, 3) == 2 and rank_in_list(items, top, 7) == 0
    assert rank_in_list(items, top, 5) == math.inf


def test_trie_shares_prefixes_and_refuses_prefix_items():
    trie = build_trie([[5, 6, 1], [5, 7, 1], [8, 1]])
    assert trie.offsets.tolist()[:2] == [0, 2]  # the root branches on 5 and 8 only
    tokens, child = trie.children(torch.tensor([0]))
    assert tokens.tolist() == [[5, 8]]
    tokens, _ = trie.children(child[:, :1].flatten())
    assert tokens.tolist() == [[6, 7]] and trie.depth == 3
    assert sorted(trie.item[trie.item >= 0].tolist()) == [0, 1, 2]
    with pytest.raises(UserError, match="prefix"):
        build_trie([[5, 6], [5, 6, 1]])
    with pytest.raises(UserError, match="prefix"):
        build_trie([[5, 6, 1], [5, 6]])


@pytest.fixture(scope="module")
def random_model():
    return random_decoder(40, seed=3, sharpen=20)


ITEMS = [[5, 6, 1], [5, 7, 1], [5, 7, 8, 1], [9, 1], [9, 10, 11, 1], [12, 1], [13, 5, 1], [14, 6, 1]]
PROMPTS = [[2, 3, 4, 20, 21], [2, 30], [2, 22, 23, 24, 25, 26, 27, 28]]  # different lengths in one batch


def test_beam_search_equals_exact_scoring_when_beam_covers_the_catalogue(random_model):
    trie = build_trie(ITEMS)
    items, scores = beam_search(random_model, PROMPTS, trie, beams=len(ITEMS), pad_id=0)
    for row, prompt in enumerate(PROMPTS):
        exact = exact_scores(random_model, prompt, ITEMS, pad_id=0)
        order = torch.argsort(exact, descending=True)
        assert items[row].tolist() == order.tolist()
        torch.testing.assert_close(scores[row], exact[order], atol=1e-4, rtol=1e-5)
        plain, plain_scores = plain_beam_search(random_model, prompt, trie, beams=len(ITEMS))  # the specification too
        assert plain == order.tolist()
        torch.testing.assert_close(torch.tensor(plain_scores), exact[order], atol=1e-4, rtol=1e-5)


def test_exact_scores_are_true_log_likelihoods(random_model):
    prompt, item = PROMPTS[0], ITEMS[2]
    with torch.no_grad():
        logp = torch.log_softmax(random_model(torch.tensor([prompt + item])), -1)[0]
    expected = sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(item))
    torch.testing.assert_close(exact_scores(random_model, prompt, ITEMS, pad_id=0, chunk=3)[2], expected)


def test_batched_users_equal_one_at_a_time_and_small_beams_are_a_prefix(random_model):
    trie = build_trie(ITEMS)
    batched, batched_scores = beam_search(random_model, PROMPTS, trie, beams=3, pad_id=0)
    for row, prompt in enumerate(PROMPTS):
        alone, alone_scores = beam_search(random_model, [prompt], trie, beams=3, pad_id=0)
        assert batched[row].tolist() == alone[0].tolist()
        torch.testing.assert_close(batched_scores[row], alone_scores[0], atol=1e-5, rtol=1e-5)


def test_the_batched_engine_equals_the_plain_beam_search_on_varied_lengths(random_model):
    """Pruned beams, users finishing at different depths, a prompt cache that shrinks and excluded items must not
    change a thing: the same items and scores as the plain beam search, one prompt at a time without a cache."""
    rng = np.random.default_rng(0)
    items = list({tuple(rng.integers(2, 40, n - 1).tolist()) + (1,): None for n in rng.integers(1, 13, 120)})
    items = [list(i) for i in items]
    assert min(map(len, items)) == 1 and max(map(len, items)) == 12
    prompts = [rng.integers(2, 40, n).tolist() for n in rng.integers(1, 30, 12)]
    exclude = [rng.choice(len(items), k, replace=False).tolist() for k in rng.integers(0, 4, 12)]
    trie = build_trie(items)
    for beams in (3, 10):
        fast_items, fast_scores = beam_search(random_model, prompts, trie, beams, 0, exclude)
        for row, prompt in enumerate(prompts):
            plain_items, plain_scores = plain_beam_search(random_model, prompt, trie, beams, exclude[row])
            assert fast_items[row].tolist() == plain_items
            torch.testing.assert_close(fast_scores[row], torch.tensor(plain_scores), atol=1e-4, rtol=1e-5)
        assert not set(fast_items[0].tolist()) & set(exclude[0])


def test_beam_cache_rows_follow_their_own_prompt(random_model):
    """Rows of uneven counts per prompt (the grid path), after the cache dropped the prompts with no rows left: each
    row decodes exactly as its prompt alone followed by its token would."""
    prompts = [[2, 3, 4, 20, 21], [2, 30], [2, 22, 23, 24, 25, 26, 27, 28], [5, 6, 7]]
    kv, _ = prompt_cache(random_model, prompts, 0)
    cache = BeamCache(kv, torch.tensor([0, 0, 1, 2, 2, 3]), 0).select(torch.tensor([3, 4, 0]))  # prompts 2, 2, 0
    assert cache.prompt.k.shape[1] == 2 and cache.owner.tolist() == [1, 1, 0] and cache.width == 2
    tokens = [7, 8, 9]
    got = random_model(torch.tensor(tokens)[:, None], kv_cache=cache)[:, -1]
    with torch.no_grad():
        for row, p in enumerate([prompts[2], prompts[2], prompts[0]]):
            alone = random_model(torch.tensor([p + [tokens[row]]]))[0, -1]
            torch.testing.assert_close(got[row], alone, atol=1e-4, rtol=1e-4)


def test_history_masking_drops_items_from_the_ranking(random_model):
    trie = build_trie(ITEMS)
    full, _ = beam_search(random_model, PROMPTS[:1], trie, beams=len(ITEMS), pad_id=0)
    masked, masked_scores = beam_search(random_model, PROMPTS[:1], trie, beams=len(ITEMS), pad_id=0,
                                        exclude=[full[0, :2].tolist()])
    assert masked[0, :len(ITEMS) - 2].tolist() == full[0, 2:].tolist()
    assert masked[0, -2:].tolist() == [-1, -1] and torch.isinf(masked_scores[0, -2:]).all()
    # More beams than allowed items: the -inf fillers are -1, never an excluded item (which would count as a hit)
    wide, wide_scores = beam_search(random_model, PROMPTS[:1], trie, beams=len(ITEMS) + 3, pad_id=0,
                                    exclude=[full[0, :2].tolist()])
    assert not set(full[0, :2].tolist()) & set(wide[0].tolist())
    assert (wide[0, len(ITEMS) - 2:] == -1).all() and torch.isinf(wide_scores[0, len(ITEMS) - 2:]).all()
    assert rank_in_list(wide[0].numpy(), wide_scores[0].numpy(), int(full[0, 0])) == math.inf


def test_a_list_short_of_excluded_items_is_searched_again_until_full(random_model):
    """29 of 39 items excluded: the first pass's beams end mostly in excluded items; the list must still hold the 10
    best allowed items, those of the exhaustive search."""
    rng = np.random.default_rng(1)
    items = [list(t) for t in {tuple(rng.integers(2, 12, 2).tolist()) + (1,): None for _ in range(200)}][:39]
    trie, prompt = build_trie(items), PROMPTS[0]
    exact = exact_scores(random_model, prompt, items, pad_id=0)
    excluded = torch.argsort(exact, descending=True)[:29].tolist()  # the model's favourites: they fill the beams
    got, _ = beam_search(random_model, [prompt], trie, beams=10, pad_id=0, exclude=[excluded])
    allowed = [i for i in torch.argsort(exact, descending=True).tolist() if i not in excluded]
    assert got[0].tolist() == allowed[:10]
    few, _ = beam_search(random_model, [prompt], trie, beams=20, pad_id=0, exclude=[excluded])  # only 10 allowed
    assert few[0, :10].tolist() == allowed and (few[0, 10:] == -1).all()


def test_popularity_counts_training_interactions(small):
    counts = popularity(small, "games")  # u2's g1, g2 (g3 valid, g4 test) and u3's g2, g3 (fewer than 3: train)
    assert counts.tolist() == [1, 2, 1, 0]


def test_evaluate_end_to_end_on_a_small_dataset(small, tiny_model):
    model = Decoder.from_pretrained(tiny_model)
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    beam = evaluate(model, encoder, small, "books", beams=20)
    exact = evaluate(model, encoder, small, "books", exact=True)
    assert beam["users"] == 1 and beam["items"] == 5 and "all 5 items of Books" in beam["protocol"]
    # 5 items < 20 beams: the beam search is exhaustive; exact scoring also reports K = 50
    assert beam["model"] == {k: v for k, v in exact["model"].items() if not k.endswith("@50")}
    assert beam["per_user"][0]["target"] == "b5" and beam["per_user"][0]["popularity_rank"] == 4
    assert beam["popularity"]["recall@5"] == 1.0 and beam["popularity"]["ndcg@5"] == pytest.approx(1 / math.log2(6))
    with pytest.raises(UserError, match="--beams 5"):
        evaluate(model, encoder, small, "books", beams=5)


def test_world_beam_matches_exact_top10(world, tiny_model):
    """On a real tokenizer and catalogue, a trained-free model still ranks identically at the top."""
    ds = load_dataset(world)
    model = Decoder.from_pretrained(tiny_model).eval()
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    beam = evaluate(model, encoder, ds, "games", users=5, beams=ds.catalogue("games").size)
    exact = evaluate(model, encoder, ds, "games", users=5, exact=True)
    assert [u["top10"] for u in beam["per_user"]] == [u["top10"] for u in exact["per_user"]]
    assert beam["model"] == pytest.approx(exact["model"])  # the catalogue's size in beams: K = 50 on both


def test_item_tokens_end_with_the_terminator(tiny_model):
    tok = Tokenizer.from_pretrained(tiny_model)
    encoder = Encoder(tok)
    assert tok.decode(encoder(item_text("Red Dragon Quest"))).endswith("\n")


def test_evaluate_progress_shows_users_and_nests_in_an_open_bar(small, tiny_model, capsys, monkeypatch):
    """A bar with the users done only when asked and on a terminal; inside another bar (validation inside training)
    it becomes a second line of that bar rather than a second live display."""
    import rich.console

    from infra import console
    from infra.console import progress
    model = Decoder.from_pretrained(tiny_model)
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    evaluate(model, encoder, small, "books", progress=True)
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal: quiet
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    evaluate(model, encoder, small, "books")
    assert capsys.readouterr().err == ""  # not asked
    evaluate(model, encoder, small, "books", progress=True)
    assert "evaluate books test" in capsys.readouterr().err  # the bar's final frame shows when it stops
    with progress(3, "step", start=1) as advance:
        with progress(2, "inner") as inner:
            assert len(console._bars) == 1 and len(console._bars[0].tasks) == 2  # one display, two lines
            inner(2)
        assert [t.description for t in console._bars[0].tasks] == ["step"]
        advance(1, "loss 1.5")
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().err).strip().splitlines()[-1]  # final frame
    assert last.startswith("step 2/3") and last.endswith("loss 1.5")


def test_beyond_accuracy_by_hand(small):
    """games' training counts are [1, 2, 1, 0] (g1..g4): mid-rank percentiles 0.5, 1, 0.5, 0."""
    from infra.beyond import beyond_accuracy
    got = beyond_accuracy(popularity(small, "games"), [[1, 0], [1, 3]])
    assert got == {"coverage": 3 / 4, "popularity_percentile": pytest.approx((1 + 0.5 + 1 + 0) / 4)}
