"""bench.py's train, loss, eval, recommend, catalogue, movies, llm, fsdp and prepare sections on tiny inputs,
in-process (the CLI runs the same functions)."""
import shutil
from dataclasses import replace

import bench
from config import ModelConfig


def test_train_eval_prepare_sections_run_on_tiny_inputs(world, tiny_model, tmp_path, monkeypatch):
    o = bench.Options(device="cpu", threads=1, precisions=["fp32"], reps=1, warmup=0, seed=0, memory=False, quick=True,
                      shape=ModelConfig(), seq=8, batch=1, data=world, model=tiny_model, eval_users=4, exact_users=2)
    (train,) = bench.bench_train(o)
    assert train["tokens_per_s"] > 0 and train["batch"] == "64×4×1"
    monkeypatch.setattr(bench, "QWEN_05B", ModelConfig(vocab_size=3000, dim=16))  # the loss section's shape
    chunked, full = bench.bench_loss(o)
    assert (chunked["impl"], full["impl"]) == bench.LOSSES and chunked["tokens"] == 256 and full["tokens_per_s"] > 0
    beam, exact = bench.bench_eval(o)
    assert (beam["users"], exact["users"]) == (4, 2) and 0 <= beam["overlap"] <= 1 and beam["speedup"] > 0
    assert len({tuple(i) for i in bench.synthetic_catalogue(3000, 40, 0)}) == 3000  # forces a redraw of duplicates
    for ranker in ("beam", "exact"):  # in-process here; build_trie refuses an item that is another's prefix
        row = bench.catalogue_probe(ranker, 200, "fp32", o)
        assert row["items"] == 200 and row["users"] == bench.CATALOGUE_USERS[ranker] and row["users_per_s"] > 0
    movies = bench.bench_movies(replace(o, movie_users=3, exact_users=1))  # asserts new == old beam search items
    assert [r["ranker"] for r in movies] == ["beam search (new)", "beam search (old, 47acd71)", "exact scoring"]
    assert movies[0]["users"] == 3 and movies[2]["users"] == 1 and movies[0]["max_score_diff"] < 1e-4
    source = bench.amazon_source(300, root=tmp_path)
    for phase in ("parse", "convert"):  # both assert that no synthetic line is malformed
        assert bench.prepare_probe(phase, source)["records"] == 300


def test_recommend_section_runs_on_tiny_inputs(world, tiny_model):
    o = bench.Options(device="cpu", threads=1, precisions=["fp32"], reps=1, warmup=0, seed=0, memory=False, quick=True,
                      shape=ModelConfig(), seq=8, batch=1, data=world, model=tiny_model, eval_users=4)
    (row,) = bench.bench_recommend(o)
    assert (row["calls"], row["users"], row["items"]) == (4, 4, 100) and 0 < row["p50_ms"] <= row["p95_ms"]
    assert row["users_per_s"] > 0


def test_llm_section_puts_the_small_model_beside_the_llm(world, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SMALL", ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                                    head_dim=16, intermediate_size=64))
    monkeypatch.setattr(bench, "LLM_CPT", (16, 2, 1))
    monkeypatch.setattr(bench, "LLM_SFT", (16, 2, 1))
    llm = shutil.copytree(tiny_model, tmp_path / "llm")  # the same weights under another name
    o = bench.Options(device="cpu", threads=1, precisions=["fp32"], reps=1, warmup=0, seed=0, memory=False, quick=True,
                      shape=ModelConfig(), seq=8, batch=1, data=world, model=tiny_model, llm=llm, llm_users=3)
    small, other = bench.bench_llm(o)
    assert (small["model"], other["model"], small["users"], other["users"]) == ("small", "llm", 3, 3)
    assert small["ndcg"] == other["ndcg"]  # the same checkpoint ranks the same users identically
    assert other["params"] == bench.config_from_hf(bench.read_json(llm / "config.json")).n_params
    assert min(small["cpt_tokens_per_s"], small["sft_tokens_per_s"], other["users_per_s"]) > 0
    assert bench.bench_llm(replace(o, llm=tmp_path / "absent")) == []
