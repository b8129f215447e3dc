"""Fixtures: a small hand-made dataset, a tiny built-in world and a tiny model, all created in the test session.
MFU's peak probe (seconds of matmuls on a busy CPU) is replaced by a fixed peak, except in the test of the probe, and
the run-folder locks a test took are released after it."""
import pytest

from data import load_dataset
from extras.init import create_model, tokenizer_corpus
from extras.world import WorldConfig, write_world
from helpers import TINY
from infra.datasets import Domain, write_dataset
from infra.files import release_locks

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


@pytest.fixture(autouse=True)
def fixed_peak(request, monkeypatch):
    if "peak_probe" not in request.node.name:
        monkeypatch.setattr("train.peak_flops", lambda device, precision, remeasure=False: 1e12)
    yield
    release_locks()  # run folders opened in this process (the CLI releases them at its end, train.train does not)


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
