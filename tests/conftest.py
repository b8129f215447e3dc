"""Shared fixtures: a small hand-made dataset, a tiny built-in world and tiny models, all created in the test; and
the launcher of scripts in fresh processes (torchrun on a free port for several)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from config import ModelConfig
from data import Domain, load_dataset, tokenizer_corpus, write_dataset
from model import create_model
from world import WorldConfig, write_world

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                   max_positions=512)
# transformers configs of tiny Llama, Qwen2 (GQA 7:1) and Llama 3.1 RoPE scaling, for parity and config tests
LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
QWEN2 = dict(vocab_size=96, hidden_size=56, intermediate_size=80, num_hidden_layers=2, num_attention_heads=7,
             num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}

# Two pre-training domains and one downstream. u1 shops in both pre-training domains, interleaved in time; the
# books items "b3" and "b4" tie at t=40 and t=40 (broken by item id); u3 has only 2 games items (no eval case).
ITEMS = {"b1": ("books", "Red Dragon Tales"), "b2": ("books", "Blue Ocean Guide"), "b3": ("books", "Jazz Poems"),
         "b4": ("books", "Star Diaries"), "b5": ("books", "Red Dragon Tales"),
         "m1": ("movies", "Red Dragon Film"), "m2": ("movies", "Blue Ocean Film"), "m3": ("movies", "Jazz Special"),
         "g1": ("games", "Red Dragon Quest"), "g2": ("games", "Blue Ocean Racer"), "g3": ("games", "Jazz Arena"),
         "g4": ("games", "Star Legends")}
INTERACTIONS = [
    ("u1", "b1", 10), ("u1", "m1", 15), ("u1", "b2", 20), ("u1", "m2", 25), ("u1", "b4", 40), ("u1", "b3", 40),
    ("u1", "m3", 50), ("u1", "b5", 60),
    ("u2", "g1", 5), ("u2", "g2", 6), ("u2", "g3", 7), ("u2", "g4", 8), ("u2", "b1", 9), ("u2", "b2", 10),
    ("u3", "g2", 1), ("u3", "g3", 2), ("u3", "b3", 3), ("u3", "m1", 4), ("u3", "m2", 5),
]
DOMAINS = [Domain("books", "Books", "pretrain"), Domain("movies", "Movies and TV", "pretrain"),
           Domain("games", "Video Games", "downstream")]


@pytest.fixture
def small(tmp_path):
    write_dataset(tmp_path / "small", source="test", domains=DOMAINS, items=ITEMS, interactions=INTERACTIONS)
    return load_dataset(tmp_path / "small")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "world"
    write_world(path, WorldConfig(users=150, items_per_domain=0.1))
    return path


@pytest.fixture(scope="session")
def tiny_model(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    create_model(tokenizer_corpus(load_dataset(world)), path, TINY, seed=0)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str | Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """Run a script in fresh processes, under torchrun for several; fail the test with its stderr unless it succeeds."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
              str(free_port())] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run(prefix + [str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
