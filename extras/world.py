"""The built-in world: a seeded, Amazon-like multi-domain dataset that makes CPRec's claims testable offline.

Ten domains share one vocabulary of 24 themes. A title is a franchise (two words of one theme) plus a word of its
domain and a sequel number: "Ember Wyrm Tactics 2" is a game, "Ember Wyrm Chronicles" a book. Users have one or two
favourite themes and shop in several domains, interleaved in time. Each next item is, in this order of chance:
  - the sequel of the user's last item in that domain (series structure),
  - the same franchise in a new domain, right after buying it elsewhere (cross-domain follow-up),
  - a popular item of a favourite theme (taste that transfers across domains through the shared words),
  - a popular item of the domain (popularity skew: franchise popularity is Zipf-distributed).
Seven domains are for pre-training; games, toys and office are downstream and never seen by CPT. A model that
learned themes and sequels from the other domains can use them in games; popularity alone cannot.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import load_dataset
from infra.config import DEFAULT_DATA
from infra.console import counted, say
from infra.datasets import Domain, write_dataset
from infra.distributed import barrier

THEMES = [w.split() for w in """
Dragon Ember Wyrm Flame Scale Ash Cinder Blaze | Ocean Tide Coral Reef Harbor Wave Pearl Drift
Star Nebula Orbit Comet Galaxy Rocket Lunar Cosmic | Forest Oak Fern Moss Grove Willow Acorn Timber
Desert Dune Mirage Oasis Sand Cactus Sahara Mesa | Frost Snow Glacier Ice Winter Polar Tundra Sleet
City Neon Metro Tower Street Urban Subway Skyline | Jazz Swing Blues Velvet Saxophone Groove Bebop Midnight
Robot Circuit Android Cyber Gear Servo Chrome Signal | Garden Rose Tulip Blossom Petal Lily Meadow Bloom
Pirate Anchor Cutlass Galleon Parrot Treasure Corsair Plank | Knight Castle Sword Shield Crown Banner Squire Throne
Ninja Shadow Katana Shuriken Dojo Lotus Silent Ronin | Safari Lion Savanna Zebra Jungle Tiger Rhino Elephant
Mystery Clue Detective Cipher Riddle Secret Enigma Alibi | Ghost Haunted Crypt Phantom Raven Grave Specter Hollow
Champion Victory Rally Trophy Sprint Goal Medal Podium | Retro Arcade Pixel Vintage Cassette Disco Jukebox Boombox
Spice Pepper Honey Basil Saffron Ginger Cinnamon Vanilla | Summit Peak Alpine Ridge Canyon Granite Boulder Eagle
Fairy Pixie Unicorn Rainbow Sparkle Wish Dream Charm | Steam Brass Clockwork Copper Engine Cog Piston Valve
Viking Rune Thunder Fjord Longship Hammer Raider Valkyrie | Zen Bamboo Tranquil Harmony Lantern Jade Serene Koi
""".replace("\n", " | ").split("|") if w.strip()]

# key, display name, role, domain words, catalogue size
DOMAINS = [
    ("books", "Books", "pretrain", "Chronicles Tales Novel Guide Poems Diaries Handbook Stories", 1000),
    ("movies", "Movies and TV", "pretrain", "Film Documentary Miniseries Special Feature Serial Cartoon Drama", 800),
    ("music", "CDs and Vinyl", "pretrain", "Album Sessions Live Remixes Anthem Ballads Soundtrack Symphony", 800),
    ("electronics", "Electronics", "pretrain", "Headphones Speaker Charger Tablet Camera Keyboard Monitor Drone", 600),
    ("home", "Home and Kitchen", "pretrain", "Mug Blanket Lamp Cookware Pillow Candle Teapot Rug", 600),
    ("sports", "Sports and Outdoors", "pretrain", "Backpack Bottle Tent Jersey Bicycle Skates Racket Helmet", 600),
    ("beauty", "Beauty and Personal Care", "pretrain", "Perfume Lotion Shampoo Lipstick Soap Serum Balm Cologne", 600),
    ("games", "Video Games", "downstream", "Quest Tactics Racer Legends Online Arena Simulator Odyssey", 1000),
    ("toys", "Toys and Games", "downstream", "Puzzle Plush Blocks Figure Playset Kite Doll Marbles", 600),
    ("office", "Office Products", "downstream", "Notebook Planner Pen Stapler Binder Calendar Folder Organizer", 500),
]


@dataclass
class WorldConfig:
    seed: int = 0
    users: int = 6000
    items_per_domain: float = 1.0  # scales every catalogue
    p_sequel: float = 0.7  # chance to buy the next part of the series last bought in this domain
    p_follow: float = 0.5  # chance to follow the previous item's franchise into this domain
    p_taste: float = 0.8  # chance an item otherwise comes from a favourite theme
    zipf: float = 1.0  # franchise popularity ~ 1 / rank^zipf
    mean_items: float = 7.0  # a user's mean number of items per active domain


def catalogue(rng: np.random.Generator, cfg: WorldConfig):
    """Items per domain as (franchise, title, part, weight); franchise = (theme, first word, second word)."""
    franchises = [(t, a, b) for t, words in enumerate(THEMES) for a in words for b in words if a != b]
    popularity = 1.0 / (1 + rng.permutation(len(franchises))) ** cfg.zipf
    items = []  # (domain, franchise index, part, title, weight)
    for d, (_, _, _, nouns, size) in enumerate(DOMAINS):
        nouns, target, count = nouns.split(), round(size * cfg.items_per_domain), 0
        for f in rng.permutation(len(franchises)):
            if count >= target:
                break
            _, a, b = franchises[f]
            noun = nouns[rng.integers(len(nouns))]
            parts = min(target - count, 1 + rng.choice(3, p=[0.6, 0.25, 0.15]))
            for part in range(1, parts + 1):
                title = f"{a} {b} {noun}" + (f" {part}" if part > 1 else "")
                items.append((d, int(f), part, title, popularity[f] * (1.0 if part == 1 else 0.3)))
            count += parts
    return franchises, items


def generate(cfg: WorldConfig, progress: bool = False):
    """Returns (items {id: (domain, title)}, interactions [(user, item id, timestamp)])."""
    rng = np.random.default_rng(cfg.seed)
    franchises, items = catalogue(rng, cfg)
    n_domains = len(DOMAINS)
    item_ids = [f"{DOMAINS[d][0]}-{i:05d}" for i, (d, *_) in enumerate(items)]
    by_key = {(d, f, part): i for i, (d, f, part, _, _) in enumerate(items)}
    weight = np.array([w for *_, w in items])
    domain_of = np.array([d for d, *_ in items])
    theme_of = np.array([franchises[f][0] for _, f, *_ in items])
    pools = {}  # (domain, theme or -1) -> (first parts, probabilities): what taste and popularity draw from
    for d in range(n_domains):
        for t in [-1, *range(len(THEMES))]:
            idx = np.flatnonzero((domain_of == d) & (np.array([p for _, _, p, _, _ in items]) == 1)
                                 & ((theme_of == t) if t >= 0 else True))
            pools[d, t] = (idx, weight[idx] / weight[idx].sum()) if len(idx) else None
    theme_popularity = rng.dirichlet(np.full(len(THEMES), 2.0))
    domain_reach = np.array([0.55, 0.5, 0.45, 0.4, 0.4, 0.35, 0.35, 0.5, 0.35, 0.3])
    interactions = []
    for u in counted(range(cfg.users), "generate users", progress):
        user = f"u{u:05d}"
        n_fav = 1 + (rng.random() < 0.4)
        favourites = rng.choice(len(THEMES), n_fav, replace=False, p=theme_popularity)
        active = np.flatnonzero(rng.random(n_domains) < domain_reach)
        if len(active) < 2:
            active = rng.choice(n_domains, 2, replace=False, p=domain_reach / domain_reach.sum())
        timeline = np.concatenate([[d] * (1 + rng.poisson(cfg.mean_items - 1)) for d in active])
        rng.shuffle(timeline)
        time = int(1.6e9 + rng.integers(0, 3e7))
        owned, last_in, previous = set(), {}, None
        for d in timeline:
            choice = None
            last = last_in.get(d)
            if last is not None and rng.random() < cfg.p_sequel:
                _, f, part, _, _ = items[last]
                choice = by_key.get((d, f, part + 1))
            if choice is None and previous is not None and items[previous][0] != d and rng.random() < cfg.p_follow:
                choice = by_key.get((d, items[previous][1], 1))
            for _ in range(5):  # a fresh draw when the candidate is owned already
                if choice is not None and choice not in owned:
                    break
                theme = rng.choice(favourites) if rng.random() < cfg.p_taste else -1
                pool = pools[d, theme] or pools[d, -1]
                choice = int(rng.choice(pool[0], p=pool[1]))
            if choice in owned:
                continue
            time += int(rng.exponential(3 * 86400)) + 1
            owned.add(choice)
            last_in[d], previous = choice, choice
            interactions.append((user, item_ids[choice], time))
    return {item_ids[i]: (DOMAINS[d][0], title) for i, (d, _, _, title, _) in enumerate(items)}, interactions


def write_world(out_dir: str | Path, cfg: WorldConfig = WorldConfig(), progress: bool = False) -> dict:
    """`cprec prepare synthetic`: generate the world and write it as a canonical dataset."""
    items, interactions = generate(cfg, progress)
    domains = [Domain(key, name, role) for key, name, role, _, _ in DOMAINS]
    return write_dataset(out_dir, source=f"synthetic world, {cfg}", domains=domains, items=items,
                         interactions=interactions, report={"generator": vars(cfg)})


def open_dataset(path: str | Path, rank: int = 0):
    """Load a dataset; the default one (the built-in world, DEFAULT_DATA) is generated on first use."""
    path = Path(path)
    if path == DEFAULT_DATA and not (path / "manifest.json").exists():
        if rank == 0:
            say(f"creating the built-in world in {path} (once)")
            write_world(path)
        barrier()
    return load_dataset(path)
