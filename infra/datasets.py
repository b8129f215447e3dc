"""The canonical dataset on disk, written by the converters (extras/prepare.py) and the built-in world, read by
data.load_dataset.

A dataset directory holds manifest.json, items.jsonl ({"item", "domain", "title"}) and interactions.tsv (user, item,
integer timestamp), and may hold cache/ (CPT token streams). A content fingerprint in manifest.json catches files cut
short or edited after they were written.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.files import UserError, atomic_dir, marked, own_output, quote, read_json, write_json

FORMAT_VERSION = 1
DATASET_FILES = ("manifest.json", "items.jsonl", "interactions.tsv", "cache")  # everything a dataset dir may hold
# Titles longer than this are cut (at a word boundary where one is near). 200 characters is Amazon's own limit for
# product titles, so real titles pass untouched, while a runaway field (a description pasted into the title) cannot
# turn one item into thousands of tokens: a 20-item history stays within a small model's context.
MAX_TITLE_CHARS = 200


@dataclass
class Domain:
    key: str  # what users type: --domain games
    name: str  # what the template shows: "Video Games"
    role: str  # "pretrain" (seen by CPT) or "downstream" (unseen until SFT)


def clean_text(text) -> str:
    """Titles as the template shows them: HTML entities decoded, control characters (NUL, terminal escapes) and
    all whitespace (tabs, CR/LF) collapsed into single spaces."""
    return re.sub(r"[\s\x00-\x1f\x7f-\x9f]+", " ", html.unescape(str(text))).strip() if text is not None else ""


def dataset_out(out: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> Path:
    """infra.files.own_output for a dataset directory: ours when its manifest has a format and a fingerprint and it
    holds nothing but a dataset's files. Returns the directory to write."""
    return own_output(out, what="dataset", overwrite=overwrite, inputs=inputs,
                      check=lambda p: marked(p, "manifest.json", ("format", "fingerprint"), DATASET_FILES))


def short_title(title: str) -> str:
    """The title cut to MAX_TITLE_CHARS, at the last space of its second half if there is one."""
    if len(title) <= MAX_TITLE_CHARS:
        return title
    cut = title[:MAX_TITLE_CHARS + 1]
    space = cut.rfind(" ", MAX_TITLE_CHARS // 2)
    return (cut[:space] if space > 0 else cut[:MAX_TITLE_CHARS]).rstrip()


def write_dataset(out_dir: str | Path, *, source: str, domains: list[Domain], items: dict[str, tuple[str, str]],
                  interactions: list[tuple[str, str, int]], report: dict | None = None) -> dict:
    """Write the canonical dataset atomically and return its manifest.

    items: item id -> (domain key, title); interactions: (user, item id, timestamp). Titles are cleaned, cut to
    MAX_TITLE_CHARS and made unique within each domain (later ids get " (2)", " (3)", ...), so a generated title names
    exactly one item; report["titles"] counts the cut ("truncated") and the numbered ("numbered") ones. `out_dir` is
    replaced only if it is empty or a dataset (dataset_out(); the commands ask for --overwrite before this).
    """
    out_dir = dataset_out(out_dir, overwrite=True)
    keys = [d.key for d in domains]
    order = {k: i for i, k in enumerate(keys)}
    ordered = sorted(items, key=lambda i: (order[items[i][0]], i))
    titles, seen = {}, set()
    report = dict(report or {})
    tally = report["titles"] = {**report.get("titles", {}), "truncated": 0, "numbered": 0}
    for item in ordered:
        domain, full = items[item][0], clean_text(items[item][1])
        title = short_title(full)
        tally["truncated"] += title != full
        candidate, n = title, 1
        while (domain, candidate) in seen:
            n += 1
            candidate = f"{title} ({n})"
        tally["numbered"] += n > 1
        seen.add((domain, candidate))
        titles[item] = candidate
    interactions = sorted(interactions)
    counts = {k: {"items": 0, "users": set(), "interactions": 0} for k in keys}
    for item in ordered:
        counts[items[item][0]]["items"] += 1
    for user, item, _ in interactions:
        c = counts[items[item][0]]
        c["users"].add(user)
        c["interactions"] += 1
    digest = hashlib.sha256()
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for item in ordered:
                line = json.dumps({"item": item, "domain": items[item][0], "title": titles[item]}, ensure_ascii=False)
                f.write(line + "\n")
                digest.update(line.encode() + b"\n")
        with open(tmp / "interactions.tsv", "w", encoding="utf-8") as f:
            for user, item, ts in interactions:
                line = f"{user}\t{item}\t{int(ts)}\n"
                f.write(line)
                digest.update(line.encode())
        manifest = {
            "format": FORMAT_VERSION, "name": Path(out_dir).name, "source": source,
            "domains": [{"key": d.key, "name": d.name, "role": d.role, "items": counts[d.key]["items"],
                         "users": len(counts[d.key]["users"]), "interactions": counts[d.key]["interactions"]}
                        for d in domains],
            "users": len({u for u, _, _ in interactions}), "items": len(items), "interactions": len(interactions),
            "fingerprint": digest.hexdigest()[:16], "report": report}
        write_json(tmp / "manifest.json", manifest)
    return manifest


@dataclass
class Dataset:
    """A loaded dataset. Interactions are sorted by (user, timestamp, item): the order every sequence is read in.

    Same-timestamp ties are broken by item order in items.jsonl (domain, then id), so splits are stable.
    """
    path: Path
    manifest: dict
    domains: dict[str, Domain]
    item_ids: list[str]
    titles: list[str]
    item_domain: np.ndarray  # (n_items,) index into list(domains)
    user_ids: list[str]
    user: np.ndarray  # (n,) int32
    item: np.ndarray  # (n,) int32
    time: np.ndarray  # (n,) int64
    user_start: np.ndarray  # user u's interactions are [user_start[u], user_start[u + 1])
    split: np.ndarray | None = None  # (n,) int8: TRAIN, VALID or TEST (data.leave_one_out, set by data.load_dataset)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def domain(self, key: str) -> Domain:
        if key not in self.domains:
            raise UserError(f"unknown domain {quote(key)} in {self.path}; known: {', '.join(self.domains)}")
        return self.domains[key]

    def domain_index(self, key: str) -> int:
        self.domain(key)
        return list(self.domains).index(key)

    def catalogue(self, key: str) -> np.ndarray:
        """Every item of the domain (full ranking: these are all candidates), in items.jsonl order."""
        return np.flatnonzero(self.item_domain == self.domain_index(key))


def read_dataset(path: str | Path) -> Dataset:
    """Read a dataset's files (without its split: data.load_dataset adds it); a malformed record is refused by file
    and line, and files that parse but are not the ones prepare wrote (cut short, edited) by the content fingerprint
    in manifest.json."""
    path = Path(path)
    manifest = read_json(path / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path / 'manifest.json'}: format {found!r}, expected {FORMAT_VERSION}; run prepare again")
    try:
        domains = {d["key"]: Domain(d["key"], d["name"], d["role"]) for d in manifest["domains"]}
        fingerprint = manifest["fingerprint"]
    except (KeyError, TypeError):
        raise UserError(f"{path / 'manifest.json'}: malformed; expected domains [{{key, name, role}}, ...] and a "
                        "fingerprint; run prepare again") from None
    for name in ("items.jsonl", "interactions.tsv"):
        if not (path / name).is_file():
            raise UserError(f"{path / name}: {'not a file' if (path / name).exists() else 'file not found'}; "
                            "run prepare again")
    domain_index = {k: i for i, k in enumerate(domains)}
    digest = hashlib.sha256()  # of the bytes as read, the way write_dataset computed the fingerprint
    item_ids, titles, item_domain = [], [], []
    with open(path / "items.jsonl", "rb") as f:
        for n, raw in enumerate(f, 1):
            digest.update(raw)
            try:
                record = json.loads(raw.decode("utf-8"))
                if not (isinstance(record["item"], str) and isinstance(record["title"], str)):
                    raise TypeError
                item_domain.append(domain_index[record["domain"]])
                item_ids.append(record["item"])
                titles.append(record["title"])
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                raise UserError(f"{path / 'items.jsonl'}:{n}: malformed item record; expected "
                                '{"item", "domain", "title"} with a known domain; run prepare again') from None
    item_index = {item: i for i, item in enumerate(item_ids)}
    user_index: dict[str, int] = {}
    users, items, times = [], [], []
    with open(path / "interactions.tsv", "rb") as f:
        for n, raw in enumerate(f, 1):
            digest.update(raw)
            try:
                user, item, ts = raw.decode("utf-8").rstrip("\n").split("\t")
                items.append(item_index[item])
                times.append(int(ts))
            except (ValueError, KeyError):
                raise UserError(f"{path / 'interactions.tsv'}:{n}: malformed interaction; expected "
                                "user<TAB>item of items.jsonl<TAB>integer timestamp") from None
            users.append(user_index.setdefault(user, len(user_index)))
    if digest.hexdigest()[:16] != fingerprint:
        raise UserError(f"{path}: items.jsonl and interactions.tsv do not match the fingerprint in manifest.json "
                        "(cut short or edited after prepare); expected the files prepare wrote; run prepare again")
    user, item, time = np.array(users, np.int32), np.array(items, np.int32), np.array(times, np.int64)
    order = np.lexsort((item, time, user))
    user, item, time = user[order], item[order], time[order]
    item_domain = np.array(item_domain, np.int16)
    return Dataset(path, manifest, domains, item_ids, titles, item_domain, list(user_index), user, item, time,
                   np.searchsorted(user, np.arange(len(user_index) + 1)))
