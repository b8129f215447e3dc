"""Template, splits, no leakage, mixed-sequence order, the built-in world, the CPT stream, packing and loss masks."""
import io

import numpy as np
import pytest

from data import (
    IGNORE,
    SEQUENCE_KINDS,
    TEST,
    TRAIN,
    VALID,
    Blocks,
    Encoder,
    Examples,
    Segments,
    cpt_sequences,
    cpt_stream,
    eval_cases,
    load_dataset,
    render,
    sft_examples,
    target_example,
    train_sequences,
    windows,
)
from extras.world import WorldConfig, write_world
from infra.files import UserError
from infra.tokenizer import Tokenizer


def split_of(ds, user, item):
    rows = np.flatnonzero((np.array(ds.user_ids)[ds.user] == user) & (np.array(ds.item_ids)[ds.item] == item))
    return int(ds.split[rows[0]])


def test_titles_are_cleaned_and_made_unique_within_a_domain(small):
    assert small.titles[small.item_ids.index("b5")] == "Red Dragon Tales (2)"
    assert small.titles[small.item_ids.index("g1")] == "Red Dragon Quest"  # other domains may share words


def test_leave_one_out_split_with_stable_ties(small):
    # u1's books in time order: b1, b2, b3 (t=40, id before b4), b4 (t=40), b5 -> b4 valid, b5 test
    assert [split_of(small, "u1", i) for i in ["b1", "b2", "b3", "b4", "b5"]] == [TRAIN, TRAIN, TRAIN, VALID, TEST]
    assert [split_of(small, "u1", i) for i in ["m1", "m2", "m3"]] == [TRAIN, VALID, TEST]
    # fewer than 3 items in a domain: no evaluation case, everything stays TRAIN
    assert [split_of(small, "u3", i) for i in ["g2", "g3", "m1", "m2"]] == [TRAIN] * 4


def test_template_renders_domain_and_mixed_sequences(small):
    books = small.domain("books")
    assert render(small, [0, 1], books) == "User history in Books, oldest first:\nRed Dragon Tales\nBlue Ocean Guide\n"
    assert render(small, [0, 5], None) == ("User history across all domains, oldest first:\n"
                                           "[Books] Red Dragon Tales\n[Movies and TV] Red Dragon Film\n")


def test_cpt_sequences_kinds_time_order_and_no_held_out_items(small):
    seqs = [(render(small, items, d)) for items, d in cpt_sequences(small)]
    mixed_u1 = ("User history across all domains, oldest first:\n[Books] Red Dragon Tales\n[Movies and TV] "
                "Red Dragon Film\n[Books] Blue Ocean Guide\n[Books] Jazz Poems\n")
    assert mixed_u1 in seqs  # merged by time across domains; held-out m2, b4, m3, b5 are absent
    assert "User history in Books, oldest first:\nRed Dragon Tales\nBlue Ocean Guide\nJazz Poems\n" in seqs
    assert not any("Video Games" in s or "Quest" in s for s in seqs)  # downstream domains are unseen by CPT
    assert not any("Star Diaries" in s or "(2)" in s or "Jazz Special" in s for s in seqs)  # valid/test targets
    assert len(cpt_sequences(small, ["domain"])) == 3 and len(cpt_sequences(small, ["mixed"])) == 2
    with pytest.raises(UserError, match="--kinds"):
        cpt_sequences(small, ["sessions"])


def test_eval_cases_histories(small):
    (test,) = eval_cases(small, "books", TEST)
    (valid,) = eval_cases(small, "books", VALID)
    ids = lambda items: [small.item_ids[i] for i in items]  # noqa: E731
    assert ids(valid.history) == ["b1", "b2", "b3"] and small.item_ids[valid.target] == "b4"
    assert ids(test.history) == ["b1", "b2", "b3", "b4"] and small.item_ids[test.target] == "b5"
    assert ids(eval_cases(small, "books", TEST, window=2)[0].history) == ["b3", "b4"]
    assert test.prompt.endswith("Star Diaries\n")
    with pytest.raises(UserError, match="unknown domain 'gamez'.*known: books, movies, games"):
        eval_cases(small, "gamez", TEST)


def test_no_target_leaks_into_cpt_or_sft_text(world, tiny_model):
    """Decode the actual token streams and look for the titles of items that are only ever held out."""
    ds = load_dataset(world)
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    item_domain = ds.item_domain[ds.item]
    text = encoder.tokenizer.decode(cpt_stream(ds, encoder).tolist())
    pretrain = [k for k, d in enumerate(ds.domains.values()) if d.role == "pretrain"]
    train_rows = (ds.split == TRAIN) & np.isin(item_domain, pretrain)
    held_rows = (ds.split != TRAIN) & np.isin(item_domain, pretrain)
    only_held = set(ds.item[held_rows]) - set(ds.item[train_rows])  # items nobody has in training
    assert only_held, "the fixture should have items that appear only as targets"
    for i in only_held:
        assert ds.titles[i] + "\n" not in text
    games = [ds.titles[i] for i in set(ds.item[(ds.split != TRAIN) & (item_domain == ds.domain_index("games"))])
             - set(ds.item[(ds.split == TRAIN) & (item_domain == ds.domain_index("games"))])]
    sft_text = "".join(encoder.tokenizer.decode(e.ids.tolist()) for e in
                       sft_examples(ds, encoder, train_sequences(ds, "games"), "games"))
    assert games and not any(t + "\n" in sft_text for t in games)


def test_world_is_deterministic(tmp_path):
    small = WorldConfig(users=60, items_per_domain=0.05)
    a = write_world(tmp_path / "a", small)
    b = write_world(tmp_path / "b", small)
    c = write_world(tmp_path / "c", WorldConfig(users=60, items_per_domain=0.05, seed=1))
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]
    assert (tmp_path / "a" / "interactions.tsv").read_bytes() == (tmp_path / "b" / "interactions.tsv").read_bytes()
    roles = {d["key"]: d["role"] for d in a["domains"]}
    assert len(roles) == 10 and roles["games"] == "downstream" and sum(r == "pretrain" for r in roles.values()) == 7


def test_world_has_cross_domain_users_and_sequels(world):
    ds = load_dataset(world)
    domains_per_user = [len(set(ds.item_domain[ds.item[ds.user_start[u]:ds.user_start[u + 1]]]))
                        for u in range(len(ds.user_ids))]
    assert np.mean(np.array(domains_per_user) >= 2) > 0.9
    titles = [ds.titles[i] for i in ds.item]
    sequels = sum(b == a + " 2" for a, b in zip(titles, titles[1:]))
    assert sequels > 0.02 * len(titles)


def test_encoder_tokenizes_segments_and_marks_item_starts(small, tiny_model):
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    ids, starts = encoder.sequence(small, [0, 5], None)
    tok = encoder.tokenizer
    expected = ([tok.bos_id] + tok.encode("User history across all domains, oldest first:\n") + tok.encode("[Books] ")
                + tok.encode("Red Dragon Tales\n") + tok.encode("[Movies and TV] ") + tok.encode("Red Dragon Film\n"))
    assert ids == expected
    assert ids[starts[1]:] == tok.encode("Red Dragon Film\n")


def test_cpt_stream_is_each_sequence_encoded_in_seeded_order_joined_by_eos(small, tiny_model):
    """The segment table, its chunked gather and the cache change nothing: the stream is Encoder.sequence of each CPT
    sequence in the seed's order, each closed by EOS, written as np.save writes it and read back from the file."""
    encoder, seen = Encoder(Tokenizer.from_pretrained(tiny_model)), set()
    for kinds, seed in [(SEQUENCE_KINDS, 0), (["mixed"], 1), (["domain"], 2)]:
        sequences = cpt_sequences(small, kinds)
        shuffled = [sequences[k] for k in np.random.default_rng(seed).permutation(len(sequences))]
        expected = [t for s in shuffled for t in encoder.sequence(small, *s)[0] + [encoder.tokenizer.eos_id]]
        assert cpt_stream(small, encoder, kinds, seed).tolist() == expected
        assert np.concatenate(list(Segments(small, encoder).stream(shuffled, chunk=2))).tolist() == expected
        (cache,) = set((small.path / "cache").glob("cpt-*.npy")) - seen  # one file per kinds and seed
        seen.add(cache)
        saved = io.BytesIO()
        np.save(saved, np.array(expected, np.uint32))
        assert cache.read_bytes() == saved.getvalue()
        assert isinstance(stream := cpt_stream(small, encoder, kinds, seed), np.memmap) and stream.tolist() == expected


def test_packing_uses_every_token():
    stream = np.arange(1, 42, dtype=np.uint32)  # 41 tokens -> (41 - 1) // 8 = 5 blocks of 8 (+1 shared)
    blocks = Blocks(stream, length=8, rows=2, seed=0)
    batches = blocks.micro_batches(0)
    assert blocks.n == 5 and len(batches) == 2 and all(len(b) == 2 for b in batches)
    x, y = blocks.collate([0, 4])
    assert x.tolist() == [list(range(1, 9)), list(range(33, 41))] and y.tolist() == [list(range(2, 10)),
                                                                                      list(range(34, 42))]
    assert blocks.n_targets([0, 4]) == 16 and blocks.micro_batches(1) != batches  # reshuffled each epoch
    with pytest.raises(UserError, match="fewer than one micro-batch"):
        Blocks(stream, length=8, rows=6, seed=0)


@pytest.mark.parametrize("n", range(2, 60, 7))
def test_windows_cover_each_target_once_with_bounded_history(n):
    targets = []
    for start, first, end in windows(n, window=10):
        assert end - start <= 11 and first - start >= min(first, 5)
        targets += range(first, end)
    assert targets == list(range(1, n))


def test_sft_loss_mask_covers_exactly_the_target_items(small, tiny_model):
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    tok = encoder.tokenizer
    (example,) = sft_examples(small, encoder, [np.array([8, 9, 10])], "games")
    supervised = example.ids[example.supervised].tolist()
    assert supervised == tok.encode("Blue Ocean Racer\n") + tok.encode("Jazz Arena\n")
    data = Examples([example, target_example(small, encoder, eval_cases(small, "games", TEST)[0], "games")],
                    tokens=1000, pad_id=tok.pad_id, seed=0)
    (batch,) = data.micro_batches(0)
    inputs, targets = data.collate(sorted(batch))
    assert inputs.shape == targets.shape and (targets != IGNORE).sum() == data.n_targets(batch)
    assert targets[1][targets[1] != IGNORE].tolist() == tok.encode("Star Legends\n")
    assert targets[0, len(example):].tolist() == [IGNORE] * (inputs.shape[1] - len(example))  # padding


def test_sft_batches_are_length_bucketed(world, tiny_model):
    ds = load_dataset(world)
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    data = Examples(sft_examples(ds, encoder, train_sequences(ds, "games"), "games"), 1024, 0, seed=0)
    batches = data.micro_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(data.examples)))
    real = sum(data.n_tokens(b) for b in batches)
    padded = sum(data.collate(b)[0].size for b in batches)
    assert data.padding(0) == pytest.approx(1 - real / padded) and data.padding(0) <= 0.10
