"""The reproduction report is assembled from the runs' own result files and command log, over one or several seeds."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from extras.reproduce import (
    ALIGN_RUNS,
    CPT_RUNS,
    DEEP,
    SFT_RUNS,
    collect,
    difference,
    markdown,
    paired_bootstrap,
    seeded_bootstrap,
    wall_time,
)
from infra.files import UserError


def metrics(r10):
    return {"recall@10": r10, "ndcg@10": r10 / 2, "recall@50": min(1.0, 2 * r10)}


def per_user(path, hits, users=200):
    """`users` users; the first `hits` find the target at rank 0, the rest miss it."""
    path.write_text("".join(json.dumps({"user": f"u{u:03d}", "rank": 0 if u < hits else None}) + "\n"
                            for u in reversed(range(users))))  # any order: users are matched by id


def result(folder: Path, name: str, r10: float, hits: int, users: int = 200, **more) -> None:
    """Run `name`'s results as its command writes them: an evaluation's NAME.json, a run's NAME/results.json."""
    evaluated = name.startswith("zero-shot") or name.endswith("50beams")
    path = folder / f"{name}.json" if evaluated else folder / name / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": metrics(r10), "popularity": metrics(0.08), "top10": {
        "coverage": 0.5, "popularity_percentile": 0.7}, "protocol": "full ranking over all 9 items", **more}))
    per_user(path.with_name(path.stem + "-per_user.jsonl"), hits, users)


def seed_folder(folder: Path, shift: int = 0, core: bool = False) -> Path:
    """One seed's results: the SFT runs hit 100 of 200 users (sft-base 120, sft-cpt-constant 95) plus `shift`."""
    for k, name in enumerate(["zero-shot-base", "zero-shot-cpt"]):
        result(folder, name, 0.1 * k, 100 * k)
    for k, name in enumerate(SFT_RUNS):
        if not core or name in ("sft-cpt-10%", "sft-base-10%"):
            result(folder, name, 0.2 + k / 100, {"sft-base": 120, "sft-cpt-constant": 95}.get(name, 100) + shift)
    result(folder, "baseline", 0.15, 60, 300 if core else 200, protocol="full ranking; SASRec-style")
    for name in DEEP:
        result(folder, name, 0.2, 100 + shift)
    for name in ALIGN_RUNS:
        result(folder, name, 0.25, 110 + 2 * shift, held_out_loglik={"before": -5.0, "after": -5.5})
    for k, name in enumerate(CPT_RUNS):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "results.json").write_text(json.dumps({"training": {"validation": {"val_loss": 1 + k}}}))
    return folder


def test_report_from_result_files(tmp_path):
    report = collect([seed_folder(tmp_path / "seed-0")], "games")
    (tmp_path / "commands.log").write_text(
        "$ python cprec.py pretrain --out a\n# 100 s\n$ python cprec.py evaluate --out b\n# 2 s\n"
        "$ python cprec.py pretrain --out a --no-progress\n# reused a/results.json\n"
        "$ python cprec.py evaluate --out b\n# 30 s\n"
        "$ python cprec.py finetune --out c --overwrite\n# 7 s\n$ python cprec.py finetune --out c --resume\n# 5 s\n")
    report["seconds"] = wall_time(tmp_path / "commands.log")
    assert report["seconds"] == 142  # the failed first evaluate was superseded; finetune's two parts add up
    assert report["test"]["popularity"]["recall@10"]["mean"] == 0.08 and report["cpt_val_loss"]["cpt-constant"][
        "mean"] == 5
    text = markdown(report)
    assert "one seed" in text and "| after all-domain CPT, zero-shot | 0.1000 | 0.0500 |" in text
    assert "| SFT from CPT, 10% users | 0.2100 | 0.1050 |" in text
    assert "| constant | 5.0000 | 0.2700 | 0.1350 |" in text and "Wall time: 2.4 min." in text
    assert "| CPT helps zero-shot | +0.5000 | [+0.4" in text  # half the users gained a perfect hit
    assert "| CPT helps SFT, 100% users | -0.1000 | [-0.1" in text and "| no, reversed |" in text
    assert "| both kinds beat domain-only | +0.0000 | [+0.0000, +0.0000] | inconclusive |" in text
    assert "| popularity | 0.0800 | 0.0400 |\n| SASRec on item IDs, same split | 0.1500 | 0.0750 |" in text
    assert "| CPT+SFT beats SASRec (item IDs) | +0.2000 | [+0.1" in text  # 100 vs 60 of 200 users at rank 0
    assert "| post-training beats SFT | +0.0500 |" in text  # 110 vs 100 of 200 users
    assert "| then post-training | 0.1250 | 0.5000 | 0.5000 | 0.7000 | -5.5000 |" in text
    assert "| SFT from CPT | 0.1000 | 0.4000 | 0.5000 | 0.7000 | -5.0000 |" in text  # align's "before"


def test_seeds_are_summarised_with_their_spread_and_a_two_level_interval(tmp_path):
    folders = [seed_folder(tmp_path / f"seed-{s}", shift) for s, shift in enumerate([0, 10, -10])]
    report = collect(folders, "games")
    sft = report["test"]["sft-cpt"]["ndcg@10"]
    assert sft["seeds"] == [0.1, 0.1, 0.1] and sft["sd"] == 0.0  # the (made-up) metrics do not move
    post = next(d for d in report["differences"] if d["claim"] == "post-training beats SFT")
    assert post["per_seed"] == pytest.approx([0.05, 0.1, 0.0])  # 110 + 2 shift vs 100 + shift of 200 users
    low, high = post["ci95"]
    assert post["ndcg@10"] == pytest.approx(0.05) and low < 0.03 and high > 0.07  # the seeds' spread shows
    text = markdown({**report, "seconds": 60})
    assert "3 seeds (seed-0, seed-1, seed-2), mean ± sd" in text and "(seeds: +0.0500, +0.1000, +0.0000)" in text


def test_differences_pair_the_same_users(tmp_path):
    """A run on a subset of another's users is compared on that subset; runs on overlapping sets are refused."""
    for name, users, rank in [("sft-cpt", range(3), 0), ("sft-base", range(5), None), ("sft-cpt-10%", range(1, 7), 0)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results-per_user.jsonl").write_text(
            "".join(json.dumps({"user": f"u{u}", "rank": rank}) + "\n" for u in users))
    d = difference([tmp_path], "sft-cpt", "sft-base")  # 3 users, each a hit (gain 1) against a miss
    assert (d["users"], d["ndcg@10"], d["ci95"]) == (3, 1.0, [1.0, 1.0])
    with pytest.raises(UserError, match="different users"):
        difference([tmp_path], "sft-cpt", "sft-cpt-10%")


def test_core_report_needs_only_the_core_runs(tmp_path):
    """--core (a pretrained LLM on CPU budgets): zero-shot before/after CPT, 10%-user SFT from either start and
    post-training after it; SASRec is evaluated on all 300 test users, the LLM runs on a seeded 200 of them."""
    report = collect([seed_folder(tmp_path, core=True)], "games", core=True)
    assert [d["claim"] for d in report["differences"]] == [
        "CPT helps zero-shot", "CPT helps SFT, 10% users", "CPT+SFT on 10% users beats SASRec (item IDs)",
        "post-training beats SFT, 10% users"]
    assert report["differences"][2]["ndcg@10"] == pytest.approx(0.2) and report["differences"][2]["users"] == 200
    report["seconds"] = 60
    text = markdown(report)
    assert "| SFT from CPT, 10% users | 0.2100 | 0.1050 |" in text and "100% users" not in text
    assert "CPT sequences" not in text and "CPT schedule" not in text
    with pytest.raises(UserError):  # the full report needs every run (sft-cpt is missing)
        collect([tmp_path], "games")


def test_core_runs_and_their_options(tmp_path, monkeypatch):
    """--core runs CPT, both zero-shot evaluations, the two 10%-user SFT runs, the baseline, the 50-beam evaluation
    and post-training (on the 10% SFT's users), passing --test-users and --val-users on; every seed gets its own
    folder and, for a model `init` made, its own initialisation."""
    from extras import reproduce
    issued = []
    monkeypatch.setattr(reproduce, "run", lambda args, result, resume, log, made: issued.append([str(a) for a in args]))
    monkeypatch.setattr(reproduce, "collect", lambda folders, domain, core: {"seconds": 0})
    monkeypatch.setattr(reproduce, "markdown", lambda report: "")
    monkeypatch.setattr(reproduce, "wall_time", lambda log: 0.0)
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text("{}")  # no init marker: a pretrained LLM, its own base for every seed
    reproduce.reproduce(tmp_path / "r", tmp_path / "data", llm, "games", 1000, 1.0, 0, False, False, core=True,
                        test_users=200, val_users=50, seeds=2)
    runs = [(args[0], Path(args[args.index("--out") + 1]).parent.name, Path(args[args.index("--out") + 1]).name)
            for args in issued]
    one = [("pretrain", "cpt"), ("evaluate", "zero-shot-base.json"), ("evaluate", "zero-shot-cpt.json"),
           ("finetune", "sft-cpt-10%"), ("finetune", "sft-base-10%"), ("baseline", "baseline"),
           ("evaluate", "sft-cpt-10%-50beams.json"), ("align", "align-cpt-10%")]
    assert runs == [(c, f"seed-{s}", n) for s in (0, 1) for c, n in one]
    for args in issued:
        if args[0] in ("finetune", "align"):
            assert args[args.index("--val-users") + 1] == "50" and args[args.index("--test-users") + 1] == "200"
            assert args[args.index("--users-fraction") + 1] == "0.1"  # align post-trains on its SFT run's users
        if args[0] == "evaluate":
            assert args[args.index("--users") + 1] == "200"
        if args[0] == "pretrain":
            assert args[args.index("--model") + 1] == str(llm)
    issued.clear()
    reproduce.reproduce(tmp_path / "r2", tmp_path / "data", llm, "games", 1000, 1.0, 0, False, False)
    assert len(issued) == len(CPT_RUNS) + 2 + len(SFT_RUNS) + 1 + len(DEEP) + len(ALIGN_RUNS)
    assert not any("--val-users" in args for args in issued)  # finetune's own default


def test_a_model_init_made_is_initialised_anew_for_each_seed(tiny_model, tmp_path):
    from extras.reproduce import seeded_base
    from helpers import assert_same_weights
    from model import Decoder
    assert seeded_base(tiny_model, tmp_path / "b0", 0) == tiny_model  # init's own seed: the model itself
    other = seeded_base(tiny_model, tmp_path / "b1", 1)
    assert other == tmp_path / "b1" and json.loads((other / "config.json").read_text())["cprec_init"]["seed"] == 1
    weights = {k: v.detach() for k, v in Decoder.from_pretrained(other).state_dict().items()}
    with pytest.raises(AssertionError):  # other weights, the same shape and tokenizer
        assert_same_weights({("model." + k if k != "lm_head.weight" else k): v for k, v in weights.items()
                             if k != "lm_head.weight"}, tiny_model, which=".")
    assert (other / "tokenizer.model").read_bytes() == (tiny_model / "tokenizer.model").read_bytes()


def test_a_seeds_base_is_remade_when_its_model_is_not_what_it_was_made_from(tiny_model, tmp_path):
    """`init` run again (here: another shape) under the same --model: --overwrite remakes each seed's base from it,
    --resume refuses, since the finished runs were trained from the old one."""
    import shutil

    from extras.reproduce import seeded_base
    from infra.files import UserError
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    base = seeded_base(model, tmp_path / "b1", 1)
    assert seeded_base(model, tmp_path / "b1", 1, resume=True) == base  # unchanged: reused
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
    with pytest.raises(UserError, match="base model was made from another"):
        seeded_base(model, tmp_path / "b1", 1, resume=True)
    assert json.loads((seeded_base(model, tmp_path / "b1", 1) / "config.json").read_text())["rope_theta"] == 500000.0


def test_a_missing_or_truncated_per_user_file_is_one_line(tmp_path):
    (tmp_path / "sft-cpt").mkdir()
    with pytest.raises(UserError, match="results-per_user.jsonl: cannot be read"):
        difference([tmp_path], "sft-cpt", "sft-base")
    per_user(tmp_path / "sft-cpt" / "results-per_user.jsonl", 10)
    path = tmp_path / "sft-cpt" / "results-per_user.jsonl"
    path.write_text(path.read_text()[:100])  # three whole records of 31 characters, then a cut one
    with pytest.raises(UserError, match=r"results-per_user.jsonl: line 4 is not a per-user rank .*--resume"):
        difference([tmp_path], "sft-cpt", "sft-base")


def test_resume_may_extend_a_reproduction_but_not_change_it(tmp_path):
    """--resume after a --core reproduction may add every other arm, and may add seeds: neither changes a finished
    run's command, so they are reused. Any other change (fewer seeds, --core after a full one, another seed or
    budget) is refused in one line naming the options."""
    from extras.reproduce import settings_of
    core = {"data_fingerprint": "f", "model": "m", "domain": "games", "cpt_tokens": 1000, "sft_epochs": 5.0,
            "seed": 0, "seeds": 3, "core": True, "test_users": 1000, "val_users": None}
    settings_of(tmp_path, core, resume=False)
    full = {**core, "core": False, "seeds": 5}
    settings_of(tmp_path, full, resume=True)
    assert json.loads((tmp_path / "reproduce.json").read_text()) == full
    for change, options in (({"core": True}, "--core"), ({"seeds": 4}, "--seeds"),
                            ({"seed": 1, "cpt_tokens": 10}, "--cpt-tokens, --seed")):
        with pytest.raises(UserError, match=f"other settings \\({options}\\)"):
            settings_of(tmp_path, {**full, **change}, resume=True)
    assert json.loads((tmp_path / "reproduce.json").read_text()) == full  # a refusal records nothing


def test_a_claim_holds_only_when_its_interval_and_every_seed_agree():
    from extras.reproduce import verdict
    assert verdict({"ci95": [0.01, 0.03], "per_seed": [0.02, 0.01, 0.03]}) == "yes"
    assert verdict({"ci95": [-0.03, -0.01], "per_seed": [-0.02, -0.01, -0.03]}) == "no, reversed"
    assert verdict({"ci95": [0.001, 0.03], "per_seed": [0.02, -0.001, 0.03]}) == "inconclusive: the seeds disagree"
    assert verdict({"ci95": [-0.01, 0.03], "per_seed": [0.02, 0.01, 0.03]}) == "inconclusive"
    assert verdict({"ci95": [0.01, 0.03], "per_seed": [0.02]}) == "yes"  # one seed: the users' interval alone


def test_paired_bootstrap_difference_and_interval():
    a, b = [0, 0, 1, math.inf], [math.inf, 0, 3, 2]
    delta, low, high = paired_bootstrap(a, b, k=10, samples=500)
    hand = ((1 - 0) + (1 - 1) + (1 / math.log2(3) - 1 / math.log2(5)) + (0 - 0.5)) / 4
    assert delta == pytest.approx(hand) and low <= delta <= high
    assert paired_bootstrap(b, a, k=10, samples=500)[0] == pytest.approx(-hand)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)  # the same ranker: no difference and no uncertainty
    ones = paired_bootstrap([0] * 50, [math.inf] * 50)
    assert ones == (1.0, 1.0, 1.0)
    wide, narrow = (paired_bootstrap([0, math.inf] * n, [0, 0] * n) for n in (10, 1000))  # half the users lost
    assert wide[0] == narrow[0] == -0.5 and wide[2] - wide[1] > narrow[2] - narrow[1] > 0  # more users: narrower


def test_the_two_level_bootstrap_is_zero_for_identical_arms_and_widens_with_the_seeds_spread():
    rng = np.random.default_rng(0)
    ranks = [rng.integers(0, 30, 400).astype(float) for _ in range(3)]
    assert seeded_bootstrap([(r, r) for r in ranks])[:3] == (0.0, 0.0, 0.0)
    hit, miss = np.zeros(400), np.full(400, np.inf)  # NDCG@10 1 and 0: the difference is the share of hits
    def arm(shares):  # per seed: A hits that share of the users, B none
        return [(np.where(np.arange(400) < 400 * s, hit, miss), miss) for s in shares]
    steady, spread = seeded_bootstrap(arm([0.2, 0.2, 0.2])), seeded_bootstrap(arm([0.0, 0.2, 0.4]))
    assert steady[0] == pytest.approx(0.2) and spread[0] == pytest.approx(0.2)
    assert spread[2] - spread[1] > 3 * (steady[2] - steady[1]) and spread[3] == pytest.approx([0.0, 0.2, 0.4])
