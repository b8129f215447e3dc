"""Preference post-training: the S-DPO loss by hand and as DPO for k = 1, one step widens the chosen item's margin,
negatives never hold the chosen item nor the history, resume equals uninterrupted, bad options get one line."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import extras.align as align
from data import Encoder, limited_users, load_dataset, train_sequences
from extras.align import AlignConfig, Preferences, dpo_loss, item_logps, preference_cases, reference_logps, sdpo
from helpers import assert_same_weights, cli, ok, read_records, refused
from infra.tokenizer import Tokenizer
from model import Decoder


def test_the_loss_by_hand_and_as_dpo_for_one_rejected_item():
    policy, reference = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.5, -1.5]])
    # rewards 0.5, -0.5, -1.5: rejected minus chosen -1 and -2; log(e^-1 + e^-2) = -0.686738...
    assert float(sdpo(policy, reference, 1.0)) == pytest.approx(math.log1p(math.exp(math.log(math.exp(-1) +
                                                                                             math.exp(-2)))))
    assert float(sdpo(policy, reference, 1.0)) == pytest.approx(0.407606, abs=1e-6)  # log(1 + e^-1 + e^-2)
    for beta in (0.1, 1.0, 3.0):  # k = 1: DPO's -log sigmoid(beta (r_chosen - r_rejected))
        dpo = -torch.nn.functional.logsigmoid(beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] -
                                                                                            reference[:, 1])))
        torch.testing.assert_close(sdpo(policy[:, :2], reference[:, :2], beta), dpo)


@pytest.fixture(scope="module")
def setting(world, tiny_model):
    ds, encoder = load_dataset(world), Encoder(Tokenizer.from_pretrained(tiny_model))
    return ds, encoder, Decoder.from_pretrained(tiny_model)


@pytest.mark.parametrize("negatives, history", [("hard", False), ("random", False), ("hard", True)])
def test_negatives_never_hold_the_chosen_item_nor_unless_asked_the_history(setting, negatives, history):
    ds, encoder, model = setting
    cfg = AlignConfig(k=5, negatives=negatives, history_negatives=history)
    cases = preference_cases(model, encoder, ds, "games", cfg, seed=0)
    position = {int(i): p for p, i in enumerate(ds.catalogue("games"))}
    sequences = [s for s in train_sequences(ds, "games") if len(s) >= 2]
    assert cases.items.shape == (len(sequences), 6) and len(cases.prompts) == len(sequences)
    seen_history = False
    for seq, (chosen, *rejected) in zip(sequences, cases.items.tolist()):
        past = {position[int(i)] for i in seq[:-1]}
        assert chosen == position[int(seq[-1])] and chosen not in rejected and len(set(rejected)) == 5
        seen_history |= bool(past & set(rejected))
        assert history or not past & set(rejected)
    if negatives == "hard" and not history:  # the model's own top wrong items, in its order
        prompt, banned = cases.prompts[0], [cases.items[0, 0]] + [position[int(i)] for i in sequences[0][:-1]]
        trie = evaluation.build_trie(evaluation.catalogue_tokens(encoder, ds, "games"))
        top, _ = evaluation.beam_search(model, [prompt], trie, 20, encoder.tokenizer.pad_id, [banned])
        assert top[0, :5].tolist() == cases.items[0, 1:].tolist()


def test_after_a_limited_sft_post_training_sees_the_same_users(setting):
    """--users-fraction draws as finetune does (data.limited_users, same seed): post-training after SFT on 10% of the
    users prefers over those users' last items, not over the other 90%'s (which would be more data, not DPO)."""
    ds, encoder, model = setting
    cases = preference_cases(model, encoder, ds, "games", AlignConfig(negatives="random"), seed=3, fraction=0.1)
    sft = limited_users(train_sequences(ds, "games"), 0.1, seed=3)  # finetune --users-fraction 0.1 --seed 3
    position = {int(i): p for p, i in enumerate(ds.catalogue("games"))}
    chosen = [position[int(s[-1])] for s in sft if len(s) >= 2]
    assert 0 < len(chosen) < len(train_sequences(ds, "games")) // 5 and cases.items[:, 0].tolist() == chosen
    assert cases.prompts == evaluation.user_prompts(encoder, ds, [s[:-1][-20:] for s in sft if len(s) >= 2], "games")


def test_one_step_widens_the_chosen_items_margin(setting, tiny_model):
    ds, encoder, model = setting
    cases = preference_cases(model, encoder, ds, "games", AlignConfig(k=3), seed=0)
    data = Preferences(cases, evaluation.catalogue_tokens(encoder, ds, "games"), encoder.tokenizer.pad_id, 16, 0)
    data.reference = reference_logps(model, data, "fp32")
    inputs, targets, reference = (torch.as_tensor(a) for a in data.collate(list(range(16))))
    net = Decoder.from_pretrained(tiny_model)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)

    def margin() -> float:  # the chosen item's log-likelihood over the rejected ones', mean over the cases
        with torch.no_grad():
            logps = item_logps(net, inputs, targets).view(16, -1)
        return float((logps[:, :1] - logps[:, 1:]).mean())

    before = margin()
    dpo_loss(net, inputs, targets, reference, beta=1.0).backward()
    optimizer.step()
    assert margin() > before + 1e-3


ALIGN = ["align", "--domain", "games", "--epochs", 1, "--batch-cases", 16, "--micro-cases", 8, "--val-users", 5,
         "--test-users", 5, "--save-every", 2, "--eval-every", 4, "--no-progress", "--precision", "fp32"]


def test_resume_equals_uninterrupted_on_the_negatives_it_began_with(world, tiny_model, tmp_path, monkeypatch):
    args = [*ALIGN, "--data", world, "--model", tiny_model]
    ok(cli(*args, "--out", tmp_path / "whole"))
    collate, calls = Preferences.collate, []

    def ctrl_c_at_step_3(self, batch):
        calls.append(1)
        if len(calls) == 5:  # 2 micro-batches a step
            os.kill(os.getpid(), signal.SIGINT)
        return collate(self, batch)

    monkeypatch.setattr(Preferences, "collate", ctrl_c_at_step_3)
    assert cli(*args, "--out", tmp_path / "cut")[0] == 130
    monkeypatch.setattr(Preferences, "collate", collate)
    drawn = align.preference_cases

    def drawn_otherwise(*a, **kw):  # a redraw may differ (another GPU batch, near-ties): the run keeps its own
        cases = drawn(*a, **kw)
        cases.items[:, 1:] = np.roll(cases.items[:, 1:], 1, axis=0)
        return cases

    monkeypatch.setattr(align, "preference_cases", drawn_otherwise)
    ok(cli(*args, "--out", tmp_path / "cut", "--resume"))
    monkeypatch.setattr(align, "preference_cases", drawn)
    assert_same_weights(load_file(tmp_path / "whole" / "final" / "model.safetensors"), tmp_path / "cut")
    strip = lambda run: [r.get("loss", r.get("validation")) for r in read_records(run)]  # noqa: E731
    assert strip(tmp_path / "cut") == strip(tmp_path / "whole")
    whole = np.load(tmp_path / "whole" / "reference.npz")["logps"]
    assert np.array_equal(np.load(tmp_path / "cut" / "reference.npz")["logps"], whole)
    ok(cli(*args, "--out", tmp_path / "cut", "--overwrite"))  # its reference.npz is this project's own output
    assert_same_weights(load_file(tmp_path / "whole" / "final" / "model.safetensors"), tmp_path / "cut")


@pytest.mark.parametrize("option, fragment", [
    (["--beta", 0], "--beta 0.0: expected a value > 0"), (["--k", 0], "--k 0: expected 1 to 99"),
    (["--k", 100], "--k 100: expected 1 to 99"), (["--negatives", "popular"], "--negatives 'popular': expected"),
    (["--k", 95], "users have fewer allowed rejected items"), (["--beams", 20], "--beams 20: expected at least 50"),
    (["--users-fraction", 0], "--users-fraction 0.0: expected a value in (0, 1]"),
])
def test_bad_options_get_one_line_before_any_run(option, fragment, world, tiny_model, tmp_path):
    refused(cli(*ALIGN, "--data", world, "--model", tiny_model, "--out", tmp_path / "run", *option), fragment,
            alone=False)
    assert not (tmp_path / "run").exists()


def test_a_note_when_post_training_draws_other_users_than_its_sft_run(tmp_path, monkeypatch):
    from extras import align
    said = []
    monkeypatch.setattr(align, "say", said.append)
    (tmp_path / "best").mkdir()
    (tmp_path / "run_config.json").write_text(json.dumps({"command": "finetune", "users_fraction": 0.1,
                                                          "train": {"seed": 2}}))
    align.note_other_users(tmp_path / "best", 0.1, 2)
    assert said == []  # the same users
    align.note_other_users(tmp_path / "best", 1.0, 2)
    align.note_other_users(tmp_path / "best", 0.1, 0)
    assert len(said) == 2 and all("--users-fraction 0.1 --seed 2" in s for s in said)
    (tmp_path / "run_config.json").write_text("{broken")
    align.note_other_users(tmp_path / "best", 1.0, 2)  # only a note: an unreadable run folder says nothing
    assert len(said) == 2
