"""`evaluate --unconstrained`: beam search without the trie (eval.free_search) against a brute-force enumeration on a
fake tokenizer with a merged terminator; the share of catalogue items; the metrics with invalid entries dropped."""
import itertools
import math

import numpy as np
import pytest
import torch

import eval as evaluation
from data import Encoder
from eval import INVALID, ending_tokens, evaluate, free_search
from helpers import cli, ok, random_decoder, refused
from infra.tokenizer import Tokenizer
from model import Decoder

# A fake tokenizer of 8 tokens for a model of 9 (token 8 has no text: never written). "c\n" merges the terminator
# into a token, "\n\n" holds it twice, "ab" writes what "a" "b" write: several beams write one title.
TEXTS = ["a", "b", "c", "\n", "c\n", "\n\n", "ab", ""]


class FakeTokenizer:
    vocab_size, eos_id = len(TEXTS), len(TEXTS) - 1

    def decode(self, ids):
        return "".join(TEXTS[i] for i in ids)


@pytest.fixture(scope="module")
def model():
    return random_decoder(9, seed=5, sharpen=8)


def test_ending_tokens_group_tokens_by_the_title_they_end():
    group, first = ending_tokens(FakeTokenizer(), 9)
    # "\n", "\n\n" and EOS end a beam adding nothing (one group), "c\n" adds "c"; token 8 is never written
    assert group.tolist() == [-1, -1, -1, 0, 1, 0, -1, 0, -2] and first.tolist() == [3, 4]


def brute_force(model, prompt, longest, titles, exclude=()):
    """Every text the model can write, ended at the first token holding the terminator (or EOS) or after `longest`
    tokens, scored by one plain forward pass; the best score of each title, best first."""
    ends = {3, 4, 5, 7}
    seqs = [seq for n in range(1, longest + 1) for seq in itertools.product(range(8), repeat=n)
            if not any(t in ends for t in seq[:-1]) and (n == longest or seq[-1] in ends)]
    with torch.no_grad():  # right-padded with token 0: the padding never reaches a real position
        logp = torch.log_softmax(model(torch.tensor([prompt + list(s) + [0] * (longest - len(s)) for s in seqs])), -1)
    best = {}
    for row, seq in enumerate(seqs):
        score = float(sum(logp[row, len(prompt) - 1 + i, t] for i, t in enumerate(seq)))
        title = "".join(TEXTS[t] for t in seq).split("\n")[0]
        if titles.get(title, INVALID) not in exclude:
            best[title] = max(best.get(title, -math.inf), score)
    return sorted(best.items(), key=lambda e: -e[1])


def test_free_search_equals_brute_force_with_merged_terminators_and_duplicate_titles(model):
    """8 beams keep every open prefix (4 open tokens) of the 2 tokens a beam may write: the search is exhaustive, so
    its list must be the brute force's best 8 titles, each once with its best score, whichever tokens wrote it ("c"
    as "c\n" or "c" "\n" or "c" EOS; "ab" as "ab" or "a" "b"). The second user may not get "ab"."""
    catalogue = [[6, 3], [4], [1, 3], [2, 0, 3]]  # "ab\n", "c\n", "b\n", "ca\n"
    titles = {"ab": 0, "c": 1, "b": 2, "ca": 3}
    prompts = [[0, 1, 3, 2], [6, 3]]
    exclude = [[], [0]]
    items, scores = free_search(model, prompts, 8, 0, FakeTokenizer(), catalogue, 2, exclude)
    for row, prompt in enumerate(prompts):
        best = brute_force(model, prompt, 2, titles, exclude[row])[:8]
        assert items[row].tolist() == [titles.get(t, INVALID) for t, _ in best]
        torch.testing.assert_close(scores[row], torch.tensor([s for _, s in best]), atol=1e-4, rtol=1e-5)
    assert 0 not in items[1].tolist() and 1 in items[0].tolist() and INVALID in items[0].tolist()
    alone, alone_scores = free_search(model, prompts[1:], 8, 0, FakeTokenizer(), catalogue, 2, exclude[1:])
    assert alone[0].tolist() == items[1].tolist()  # batched users equal one at a time
    torch.testing.assert_close(alone_scores[0], scores[1], atol=1e-5, rtol=1e-5)


def test_unconstrained_reports_invalid_items_the_trie_never_returns(small, tiny_model):
    model = Decoder.from_pretrained(tiny_model).eval()
    encoder = Encoder(Tokenizer.from_pretrained(tiny_model))
    trie = evaluate(model, encoder, small, "books")
    free = evaluate(model, encoder, small, "books", unconstrained=True)
    assert trie["valid"] == {"@5": 1.0, "@10": 1.0, "@20": 1.0} and "model_valid_only" not in trie
    assert free["valid"]["@20"] < 1 and "without the trie" in free["protocol"]  # an untrained model writes garbage
    assert any(None in u["top10"] for u in free["per_user"])
    assert set(free["model_valid_only"]) == set(free["model"])


def test_dropped_invalid_entries_by_hand(small, tiny_model, monkeypatch):
    """books' one user has target b5: as generated it ranks 3rd (0-based) behind two invalid titles and b1; with the
    invalid entries dropped, 1st. 3 of the 5 entries are items."""
    catalogue = [small.item_ids[i] for i in small.catalogue("books")]
    b1, b5, b2 = (catalogue.index(i) for i in ("b1", "b5", "b2"))

    def fake(model, prompts, **_):
        return (torch.tensor([[INVALID, b1, INVALID, b5, b2] + [-1] * 15]),
                torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0] + [-math.inf] * 15]))

    monkeypatch.setattr(evaluation, "free_search", fake)
    model = Decoder.from_pretrained(tiny_model)
    result = evaluate(model, Encoder(Tokenizer.from_pretrained(tiny_model)), small, "books", unconstrained=True)
    assert result["per_user"][0]["rank"] == 3 and result["per_user"][0]["top10"] == [None, "b1", None, "b5", "b2"]
    assert result["model"]["ndcg@5"] == pytest.approx(1 / math.log2(5)) and result["model"]["mrr"] == 1 / 4
    assert result["model_valid_only"]["ndcg@5"] == pytest.approx(1 / math.log2(3))
    assert result["model_valid_only"]["mrr"] == 1 / 2 and result["model_valid_only"]["recall@5"] == 1
    assert result["valid"] == {"@5": 3 / 5, "@10": 3 / 5, "@20": 3 / 5}
    assert np.isclose(result["top10"]["coverage"], 3 / 5)  # the items shown: b1, b5, b2 of 5


def test_evaluate_command_unconstrained(world, tiny_model, tmp_path):
    out = ok(cli("evaluate", "--domain", "games", "--model", tiny_model, "--data", world, "--users", "3",
                 "--unconstrained", "--out", tmp_path / "free.json"))
    assert "valid only" in out and "catalogue items among the top-K" in out
    refused(cli("evaluate", "--domain", "games", "--model", tiny_model, "--data", world, "--unconstrained", "--exact",
                "--out", tmp_path / "both.json"), "--unconstrained with --exact")
