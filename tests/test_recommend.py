"""Recommendations against evaluation's top-10 and exact scoring, title matching, history prompts and masking, the
JSONL batch mode and the `recommend` command's output and errors."""
import json

import numpy as np
import pytest
import torch

from data import TEST, Encoder, eval_cases, load_dataset
from eval import catalogue_tokens, evaluate, exact_scores, user_prompts
from extras.recommend import Recommender, recommend_file
from helpers import cli, ok, refused
from infra.datasets import Domain, write_dataset
from infra.files import UserError
from infra.tokenizer import Tokenizer
from model import Decoder


def recommender(model_dir, ds, **options) -> Recommender:
    return Recommender(Decoder.from_pretrained(model_dir), Encoder(Tokenizer.from_pretrained(model_dir)), ds,
                       **options)


def index(ds, *item_ids) -> list[int]:
    return [ds.item_ids.index(i) for i in item_ids]


@pytest.fixture(scope="module")
def world_rec(world, tiny_model):
    return recommender(tiny_model, load_dataset(world))


def test_recommendations_equal_evaluations_top10(world_rec):
    """The tiny model was never fine-tuned and games is a downstream domain: this is the zero-shot use too."""
    ds = world_rec.ds
    result = evaluate(world_rec.model, world_rec.encoder, ds, "games", users=6, beams=20)
    cases = {ds.user_ids[c.user]: c for c in eval_cases(ds, "games", TEST)}
    histories = [cases[row["user"]].history for row in result["per_user"]]
    by_items = world_rec.recommend_items(histories, "games", k=10)
    by_titles = world_rec.recommend([[ds.titles[i] for i in h] for h in histories], "games", k=10)
    for row, items, titles in zip(result["per_user"], by_items, by_titles):
        assert [r.item_id for r in items] == row["top10"] == [r.item_id for r in titles]
    # The scores are the items' true log-likelihoods after evaluation's prompt; shares are their softmax.
    prompt = user_prompts(world_rec.encoder, ds, histories[:1], "games")[0]
    exact = exact_scores(world_rec.model, prompt, catalogue_tokens(world_rec.encoder, ds, "games"), 0)
    catalogue = list(ds.catalogue("games"))
    expected = [exact[catalogue.index(ds.item_ids.index(r.item_id))].item() for r in by_items[0]]
    np.testing.assert_allclose([r.logprob for r in by_items[0]], expected, rtol=1e-5, atol=1e-4)
    shares = np.exp(expected) / np.exp(expected).sum()
    np.testing.assert_allclose([r.share for r in by_items[0]], shares, rtol=1e-4, atol=1e-7)


def test_titles_match_exactly_then_ignoring_case_and_unknown_ones_get_suggestions(tmp_path, tiny_model):
    items = {"b1": ("books", "Jazz"), "b2": ("books", "Red Dragon Tales"), "g1": ("games", "Jazz"),
             "g2": ("games", "jazz arena"), "g3": ("games", "JAZZ ARENA"), "m1": ("movies", "Jazz Arena")}
    domains = [Domain("books", "Books", "pretrain"), Domain("movies", "Movies", "pretrain"),
               Domain("games", "Video Games", "downstream")]
    write_dataset(tmp_path / "d", source="test", domains=domains, items=items, interactions=[("u", "b1", 1)])
    ds = load_dataset(tmp_path / "d")
    rec = recommender(tiny_model, ds)
    assert rec.find("Jazz", "games") == index(ds, "g1")[0]  # the target domain's item first
    assert rec.find("Jazz", "books") == index(ds, "b1")[0]
    assert rec.find("Red Dragon Tales", "games") == index(ds, "b2")[0]  # other domains' titles are history too
    assert rec.find("Jazz Arena", "games") == index(ds, "m1")[0]  # exact beats the target domain's case-insensitive
    assert rec.find("jAZZ aRENA", "games") == index(ds, "g2")[0]  # then case-insensitive: target domain, then order
    assert rec.find("red dragon tales", "movies") == index(ds, "b2")[0]
    with pytest.raises(UserError, match=r"title 'Red Dragn Tale' is not in .*; closest: 'Red Dragon Tales'$"):
        rec.find("Red Dragn Tale", "games")
    with pytest.raises(UserError, match="closest: none near it"):
        rec.find("qqqqqqqqqqqq", "games")
    assert rec.item("g3") == index(ds, "g3")[0]
    with pytest.raises(UserError, match="item id 'g9' is not in"):
        rec.item("g9")


def test_prompts_of_domain_and_mixed_histories_and_exact_top_k(small, tiny_model):
    rec = recommender(tiny_model, small, window=2)
    enc = rec.encoder
    games, books = index(small, "g1", "g2", "g3"), index(small, "b1", "m1")
    prompt, kind = rec.prompt(games, "games")
    assert kind == "domain" and prompt == user_prompts(enc, small, [games[-2:]], "games")[0]  # the window: last 2
    prompt, kind = rec.prompt(books, "games")
    assert kind == "mixed"
    assert prompt == enc.sequence(small, books, None)[0] + enc("[Video Games] ")
    text = enc.tokenizer.decode(prompt)  # SentencePiece shows segment starts as spaces; the tag ends the prompt
    assert "[Movies and TV] Red Dragon Film\n" in text and text.endswith("[Video Games]")
    # 4 games < 20 beams: the beam search is exhaustive, so the top 4 are the exact ranking of the mixed prompt.
    top = rec.recommend_items([books], "games", k=4)[0]
    exact = exact_scores(rec.model, prompt, catalogue_tokens(enc, small, "games"), 0)
    order = torch.argsort(exact, descending=True)
    assert [r.item_id for r in top] == [small.item_ids[small.catalogue("games")[i]] for i in order]
    np.testing.assert_allclose([r.logprob for r in top], exact[order].numpy(), rtol=1e-5, atol=1e-4)
    assert sum(r.share for r in top) == pytest.approx(1.0)


def test_exclude_history_drops_history_items_and_keeps_the_order(small, tiny_model):
    rec = recommender(tiny_model, small)
    history = index(small, "b1", "g3", "g1")
    full = [r.item_id for r in rec.recommend_items([history], "games", k=4)[0]]
    kept = [r.item_id for r in rec.recommend_items([history], "games", k=4, exclude_history=True)[0]]
    assert sorted(full) == ["g1", "g2", "g3", "g4"]
    assert kept == [i for i in full if i not in ("g1", "g3")]


def test_user_history_is_every_split_of_the_domain_else_every_domain(small, tiny_model):
    rec = recommender(tiny_model, small)
    assert rec.user_history("u2", "games").tolist() == index(small, "g1", "g2", "g3", "g4")  # valid, test too
    assert rec.user_history("u1", "games").tolist() == index(small, "b1", "m1", "b2", "m2", "b3", "b4", "m3", "b5")
    with pytest.raises(UserError, match="user 'u9' is not in"):
        rec.user_history("u9", "games")


def test_batch_file_counts_malformed_lines_and_keeps_the_order(small, tiny_model, tmp_path):
    rec = recommender(tiny_model, small)
    lines = ['{"id": "a", "titles": ["Red Dragon Quest", "blue ocean racer"]}', "not json",
             '{"id": 7, "items": ["g3"]}', "", '{"id": "c", "titles": ["Red Dragon Quets"]}',
             '{"titles": []}', '{"id": "d", "titles": ["Jazz Arena"], "items": ["g1"]}', '{"id": "e", "items": []}']
    folder = tmp_path / "io"
    folder.mkdir()
    source = folder / "users.jsonl"
    source.write_text("\n".join(lines) + "\n")
    stats = recommend_file(rec, source, folder / "out.jsonl", "games", k=3, batch=2)
    assert stats["lines"] == 7 and stats["users"] == 3 and stats["malformed"] == 4
    assert [m.split(": ")[0] for m in stats["first_malformed"]] == [f"{source}:{n}" for n in (2, 5, 6, 7)]
    assert "closest: 'Red Dragon Quest'" in stats["first_malformed"][1]
    out = [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", 7, "e"]
    expected = rec.recommend_items([index(small, "g1", "g2"), index(small, "g3"), []], "games", k=3)
    assert [[r["item_id"] for r in o["recommendations"]] for o in out] == [[r.item_id for r in e] for e in expected]
    assert sorted(p.name for p in folder.iterdir()) == ["out.jsonl", "users.jsonl"]  # no temporary file left


def test_recommend_command(world, tiny_model, tmp_path):
    args = ["recommend", "--model", tiny_model, "--data", world, "--domain", "games"]
    ds = load_dataset(world)
    titles = [ds.titles[i] for i in ds.catalogue("games")[:2]]
    printed = json.loads(ok(cli(*args, "--history", titles[0], "--history", titles[1].upper(), "-k", 3, "--json",
                                  "--precision", "fp32", "--exclude-history")))
    expected = recommender(tiny_model, ds).recommend([titles], "games", k=3, exclude_history=True)[0]
    assert printed["prompt"] == "domain" and [h["title"] for h in printed["history"]] == titles
    assert [r["item_id"] for r in printed["recommendations"]] == [r.item_id for r in expected]
    assert not {r["title"] for r in printed["recommendations"]} & set(titles)
    assert [r["rank"] for r in printed["recommendations"]] == [1, 2, 3]
    refused(cli(*args, "--history", titles[0] + "x"), f"title {titles[0] + 'x'!r} is not in", "closest:")

    source, target = tmp_path / "users.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": 1, "titles": [titles[0]]}) + '\n{"id": 2, "items": "g1"}\n')
    result = ok(cli(*args, "--input", source, "--output", target, "--no-progress"))
    assert "skipped 1 malformed line(s) of 2" in result and f"{source}:2: " in result
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == [1]
    refused(cli(*args, "--input", source, "--output", target), "out.jsonl: a recommendation file already exists there;",
            "pass --overwrite")
    ok(cli(*args, "--input", source, "--output", target, "--overwrite", "-k", 2))
    assert len(json.loads(target.read_text())["recommendations"]) == 2
