"""The data path, top to bottom: the canonical dataset on disk, chronological leave-one-out splits, the one prompt
template, CPT sequences (domain-specific and all-domain mixed), token blocks for CPT and batches for SFT.

A dataset directory holds manifest.json, items.jsonl ({"item", "domain", "title", "attrs"}) and interactions.tsv
(user, item, integer timestamp). prepare.py (real data) and world.py (the built-in world) write it; everything
else reads it through load_dataset().
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import UserError, atomic_dir, progress, read_json, write_json
from tokenizer import Tokenizer

FORMAT_VERSION = 1
TRAIN, VALID, TEST = 0, 1, 2
DATASET_FILES = ("manifest.json", "items.jsonl", "interactions.tsv", "cache")  # everything a dataset dir may hold
# Titles longer than this are cut (at a word boundary where one is near). 200 characters is Amazon's own limit for
# product titles, so real titles pass untouched, while a runaway field (a description pasted into the title) cannot
# turn one item into thousands of tokens: a 20-item history stays within a small model's context.
MAX_TITLE_CHARS = 200


# --------------------------------------------------------------------------------------------------- on disk
@dataclass
class Domain:
    key: str  # what users type: --domain games
    name: str  # what the template shows: "Video Games"
    role: str  # "pretrain" (seen by CPT) or "downstream" (unseen until SFT)


def clean_text(text) -> str:
    """Titles as the template shows them: HTML entities decoded, all whitespace (tabs, CR/LF) collapsed."""
    return re.sub(r"\s+", " ", html.unescape(str(text))).strip() if text is not None else ""


def own_output(out: str | Path, marker: str, *, overwrite: bool, what: str, keys: Collection[str] = (),
               names: Collection[str] | None = None, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, with one line, to write the directory `out` where replacing it could lose what this project did not
    write. Allowed: `out` is absent or an empty directory, or it is this project's own output and `overwrite` is set.
    Own output: `out/marker` is a JSON object holding `keys`, and (when `names` is given) every entry of `out` is one of
    `names`, so files a person put beside ours are never swept away with them. `inputs` (what the command reads) may
    be neither `out` nor inside it. Reusable for any command that replaces a directory (datasets, models, runs)."""
    out = Path(out)
    for source in map(Path, inputs):
        if source.resolve() == out.resolve() or out.resolve() in source.resolve().parents:
            raise UserError(f"--out {out}: would replace the input {source}; choose an output directory outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; choose a new or empty directory")
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return
    try:
        mark = json.loads((out / marker).read_text(encoding="utf-8"))
        ours = isinstance(mark, dict) and all(k in mark for k in keys)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise UserError(f"--out {out}: not empty and not a {what} written by this project (no valid {marker}); "
                        "nothing was changed; choose a new or empty directory")
    if names is not None and (foreign := [e for e in entries if e not in names]):
        raise UserError(f"--out {out}: holds {foreign[0]!r}, which this project did not write there; move it away "
                        "or choose another directory")
    if not overwrite:
        raise UserError(f"{out}: a {what} already exists there; pass --overwrite to replace it")


def dataset_out(out: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """own_output() for a dataset directory."""
    own_output(out, "manifest.json", overwrite=overwrite, what="dataset", keys=("format", "fingerprint"),
               names=DATASET_FILES, inputs=inputs)


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
    dataset_out(out_dir, overwrite=True)
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
    split: np.ndarray  # (n,) int8: TRAIN, VALID or TEST
    user_start: np.ndarray  # user u's interactions are [user_start[u], user_start[u + 1])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def domain(self, key: str) -> Domain:
        if key not in self.domains:
            raise UserError(f"unknown domain {key!r} in {self.path}; known: {', '.join(self.domains)}")
        return self.domains[key]

    def domain_index(self, key: str) -> int:
        self.domain(key)
        return list(self.domains).index(key)

    def catalogue(self, key: str) -> np.ndarray:
        """Every item of the domain (full ranking: these are all candidates), in items.jsonl order."""
        return np.flatnonzero(self.item_domain == self.domain_index(key))


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset; a malformed record is refused by file and line, and files that parse but are not the ones
    prepare wrote (cut short, edited) by the content fingerprint in manifest.json."""
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
                   leave_one_out(user, item_domain[item]), np.searchsorted(user, np.arange(len(user_index) + 1)))


def leave_one_out(user: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """Per user and domain, in time order: last = TEST, second-last = VALID, the rest TRAIN.

    Users with fewer than 3 interactions in a domain get no evaluation case there: all of theirs stay TRAIN.
    """
    order = np.lexsort((np.arange(len(user)), domain, user))  # stable: keeps time order within (user, domain)
    key = user[order].astype(np.int64) * 65536 + domain[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    size = np.diff(np.r_[starts, len(key)])
    from_end = np.repeat(starts + size, size) - np.arange(len(key)) - 1
    eligible = np.repeat(size >= 3, size)
    split = np.full(len(user), TRAIN, np.int8)
    split[order] = np.where(eligible & (from_end == 0), TEST, np.where(eligible & (from_end == 1), VALID, TRAIN))
    return split


# --------------------------------------------------------------------------------------------------- template
# The one template, shared by CPT, SFT and evaluation so that what CPT teaches is what evaluation asks.
# An item always renders as its title plus a newline; the newline is the terminator the evaluation trie ends with.
HEADER = "User history in {name}, oldest first:\n"
MIXED_HEADER = "User history across all domains, oldest first:\n"
TAG = "[{name}] "
TEMPLATE_FINGERPRINT = hashlib.sha256((HEADER + MIXED_HEADER + TAG).encode()).hexdigest()[:8]


def item_text(title: str) -> str:
    return title + "\n"


def header(domain: Domain | None) -> str:
    return MIXED_HEADER if domain is None else HEADER.format(name=domain.name)


def lines(ds: Dataset, items, domain: Domain | None) -> list[tuple[str, str]]:
    """(prefix, item text) per item. domain=None is an all-domain mixed sequence: each item carries its domain tag."""
    if domain is not None:
        return [("", item_text(ds.titles[i])) for i in items]
    names = [d.name for d in ds.domains.values()]
    return [(TAG.format(name=names[ds.item_domain[i]]), item_text(ds.titles[i])) for i in items]


def render(ds: Dataset, items, domain: Domain | None) -> str:
    return header(domain) + "".join(prefix + text for prefix, text in lines(ds, items, domain))


# --------------------------------------------------------------------------------------------------- sequences
SEQUENCE_KINDS = ("domain", "mixed")


def cpt_sequences(ds: Dataset, kinds=SEQUENCE_KINDS) -> list[tuple[np.ndarray, Domain | None]]:
    """CPRec's two kinds of behaviour sequence over the pre-training domains, from TRAIN interactions only (so CPT
    never sees a validation or test target):

    - "domain": one user's items in one domain, in time order (at least 2 items);
    - "mixed": one user's items across all pre-training domains merged by time, for users active in 2 or more.
    """
    unknown = set(kinds) - set(SEQUENCE_KINDS)
    if unknown or not kinds:
        raise UserError(f"--kinds: {sorted(unknown) or 'nothing'} given; expected some of {', '.join(SEQUENCE_KINDS)}")
    domains = list(ds.domains.values())
    pretrain = np.array([d.role == "pretrain" for d in domains])
    if not pretrain.any():
        raise UserError(f"{ds.path}: every domain is downstream, so CPT has no text; prepare it with fewer "
                        "--downstream domains")
    item_domain = ds.item_domain[ds.item]
    keep = (ds.split == TRAIN) & pretrain[item_domain]
    out = []
    for u in range(len(ds.user_ids)):
        span = slice(ds.user_start[u], ds.user_start[u + 1])
        items, dom = ds.item[span][keep[span]], item_domain[span][keep[span]]
        if "domain" in kinds:
            for d in np.unique(dom):
                if (dom == d).sum() >= 2:
                    out.append((items[dom == d], domains[d]))
        if "mixed" in kinds and len(np.unique(dom)) >= 2:
            out.append((items, None))
    return out


@dataclass
class Case:
    """One evaluation case: a user's history in a domain (oldest first) and the held-out next item."""
    user: int
    history: np.ndarray
    target: int
    prompt: str


def eval_cases(ds: Dataset, key: str, split: int, window: int = 20) -> list[Case]:
    """For each user with a `split` (VALID or TEST) item in the domain: the items before it, at most the last
    `window`. A test history includes the validation item, as in leave-one-out."""
    domain, d = ds.domain(key), ds.domain_index(key)
    rows = np.flatnonzero((ds.split == split) & (ds.item_domain[ds.item] == d))
    cases = []
    for row in rows:
        u = ds.user[row]
        span = np.arange(ds.user_start[u], row)
        history = ds.item[span[ds.item_domain[ds.item[span]] == d]][-window:] if window else np.array([], np.int32)
        cases.append(Case(int(u), history, int(ds.item[row]), render(ds, history, domain)))
    return cases


def train_sequences(ds: Dataset, key: str) -> list[np.ndarray]:
    """Each user's TRAIN items in the domain, oldest first: what SFT and the popularity baseline learn from."""
    d = ds.domain_index(key)
    keep = (ds.split == TRAIN) & (ds.item_domain[ds.item] == d)
    out = []
    for u in range(len(ds.user_ids)):
        span = slice(ds.user_start[u], ds.user_start[u + 1])
        items = ds.item[span][keep[span]]
        if len(items):
            out.append(items)
    return out


def tokenizer_corpus(ds: Dataset, seed: int = 0, sample: int = 20000) -> list[str]:
    """Text a new tokenizer should cover: every header, tag and title, plus a sample of rendered sequences."""
    texts = [header(None)] + [header(d) + TAG.format(name=d.name) for d in ds.domains.values()]
    texts += [item_text(t) for t in ds.titles]
    sequences = cpt_sequences(ds) if any(d.role == "pretrain" for d in ds.domains.values()) else []
    for k in np.random.default_rng(seed).permutation(len(sequences))[:sample]:
        texts.append(render(ds, *sequences[k]))
    return texts


# --------------------------------------------------------------------------------------------------- tokens
IGNORE = -100  # target id of positions without a loss


class Encoder:
    """Tokenizes the template segment by segment, each distinct segment once.

    So an item has the same tokens wherever it appears (CPT text, SFT prompts, the evaluation trie), whatever the
    tokenizer does at segment boundaries, and tokenizing millions of lines costs one call per distinct title.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self._cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.tokenizer.encode(text)
        return ids

    def sequence(self, ds: Dataset, items, domain: Domain | None) -> tuple[list[int], list[int]]:
        """Token ids of render(ds, items, domain), BOS first when the tokenizer has one, and the index where each
        item's text starts (after its tag): the item's tokens are ids[starts[k]:starts[k + 1]] for a domain."""
        ids, starts = self.bos + self(header(domain)), []
        for prefix, text in lines(ds, items, domain):
            ids.extend(self(prefix) if prefix else ())
            starts.append(len(ids))
            ids.extend(self(text))
        return ids, starts


def counted(sequence: list, label: str, enabled: bool, every: int = 1000):
    """Iterate over `sequence` with a progress bar (common.progress), moved every `every` items to stay cheap."""
    with progress(len(sequence), label, enabled) as advance:
        for k, x in enumerate(sequence):
            if k and k % every == 0:
                advance(every)
            yield x


def cpt_stream(ds: Dataset, encoder: Encoder, kinds=SEQUENCE_KINDS, seed: int = 0,
               progress: bool = False) -> np.ndarray:
    """All CPT sequences tokenized, shuffled by `seed` and concatenated, each closed by EOS: the text CPT packs.

    Tokenized once and cached under the dataset by a key of everything it depends on.
    """
    key = hashlib.sha256(json.dumps([ds.fingerprint, encoder.tokenizer.fingerprint(), sorted(kinds), seed,
                                     TEMPLATE_FINGERPRINT]).encode()).hexdigest()[:16]
    cache = ds.path / "cache" / f"cpt-{key}.npy"
    if cache.exists():
        try:
            return np.load(cache, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            pass  # damaged outside our atomic write (disk, a copy cut short): it is ours to rebuild
    sequences = cpt_sequences(ds, kinds)
    if not sequences:
        raise UserError(f"{ds.path}: no CPT sequences (each needs 2 or more training items); check the dataset")
    eos = [encoder.tokenizer.eos_id]
    parts = [np.array(encoder.sequence(ds, items, domain)[0] + eos, np.uint32)
             for items, domain in counted(sequences, "tokenize CPT sequences", progress)]
    order = np.random.default_rng(seed).permutation(len(parts))
    stream = np.concatenate([parts[i] for i in order])
    cache.parent.mkdir(exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, stream)
    tmp.replace(cache)
    return stream


@dataclass
class Example:
    """One SFT example: token ids and which of them are supervised (the target items' tokens)."""
    ids: np.ndarray
    supervised: np.ndarray

    def __len__(self) -> int:
        return len(self.ids) - 1  # the model sees ids[:-1] and predicts ids[1:]


def windows(n: int, window: int) -> list[tuple[int, int, int]]:
    """(start, first target, end) item ranges covering targets 1..n-1 exactly once with at most `window` history
    items each. Windows overlap by half, so every target after the first window still sees >= window/2 items."""
    out, first = [], 1
    while first < n:
        end = min(n, first + (window + 1) // 2 if out else window + 1)
        out.append((max(0, end - window - 1), first, end))
        first = end
    return out


def sft_examples(ds: Dataset, encoder: Encoder, sequences: list[np.ndarray], key: str,
                 window: int = 20, progress: bool = False) -> list[Example]:
    """Next-item prediction at every position of a user's sequence in one forward pass: the whole (windowed)
    sequence is one example and the loss covers every target item's tokens, not one example per prefix."""
    domain = ds.domain(key)
    out = []
    for items in counted(sequences, "tokenize SFT sequences", progress):
        for start, first, end in windows(len(items), window):
            ids, starts = encoder.sequence(ds, items[start:end], domain)
            supervised = np.zeros(len(ids), bool)
            supervised[starts[first - start]:] = True
            out.append(Example(np.array(ids, np.int64), supervised))
    return out


def target_example(ds: Dataset, encoder: Encoder, case: Case, key: str) -> Example:
    """A case as an example whose only supervised tokens are the held-out item's (for validation losses)."""
    ids, starts = encoder.sequence(ds, np.r_[case.history, case.target], ds.domain(key))
    supervised = np.zeros(len(ids), bool)
    supervised[starts[-1]:] = True
    return Example(np.array(ids, np.int64), supervised)


# --------------------------------------------------------------------------------------------------- batches
class Blocks:
    """CPT: the token stream cut into fixed blocks of `length` + 1 tokens (consecutive blocks share one token), so
    every position is a real token with a loss and nothing is padding."""

    def __init__(self, stream: np.ndarray, length: int, rows: int, seed: int):
        self.stream, self.length, self.rows, self.seed = stream, length, rows, seed
        self.n = (len(stream) - 1) // length
        if self.n < rows:
            raise UserError(f"the CPT text has {len(stream):,} tokens, fewer than one micro-batch of {rows} blocks "
                            f"of {length}; lower --block-len or --micro-batch")

    def micro_batches(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return [order[i:i + self.rows].tolist() for i in range(0, self.n - self.rows + 1, self.rows)]

    def n_targets(self, batch: list[int]) -> int:
        return len(batch) * self.length

    n_tokens = n_targets  # every input token has a target

    def collate(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([self.stream[i * self.length:(i + 1) * self.length + 1] for i in batch]).astype(np.int64)
        return x[:, :-1], x[:, 1:]


class Examples:
    """SFT: variable-length examples in length-bucketed micro-batches of at most `tokens` (padded) tokens each.

    Sorting by length (random among equal lengths) keeps padding low; the batch order is then shuffled."""

    def __init__(self, examples: list[Example], tokens: int, pad_id: int, seed: int):
        self.examples, self.tokens, self.pad_id, self.seed = examples, tokens, pad_id, seed
        if not examples:
            raise UserError("no training examples (no user has 2 or more training items in this domain)")
        self.longest = max(map(len, examples))
        if self.longest > tokens:
            raise UserError(f"--micro-tokens {tokens} is shorter than the longest example ({self.longest} tokens)")

    def micro_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        lengths = np.array([len(e) for e in self.examples])
        order = np.lexsort((rng.random(len(lengths)), lengths))
        batches, current, longest = [], [], 0
        for i in order:
            longest_if_added = max(longest, lengths[i])
            if current and longest_if_added * (len(current) + 1) > self.tokens:
                batches.append(current)
                current, longest_if_added = [], lengths[i]
            current.append(int(i))
            longest = longest_if_added
        batches.append(current)
        return [batches[i] for i in rng.permutation(len(batches))]

    def n_targets(self, batch: list[int]) -> int:
        return int(sum(self.examples[i].supervised[1:].sum() for i in batch))

    def padding(self, epoch: int = 0) -> float:
        """Share of an epoch's collated positions that are padding (length bucketing keeps it under 10%)."""
        batches = self.micro_batches(epoch)
        real = sum(self.n_tokens(b) for b in batches)
        return 1 - real / sum(len(b) * max(len(self.examples[i]) for i in b) for b in batches)

    def n_tokens(self, batch: list[int]) -> int:
        return sum(len(self.examples[i]) for i in batch)

    def collate(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded (inputs, targets); targets are IGNORE wherever there is no loss, padding included."""
        width = max(len(self.examples[i]) for i in batch)
        inputs = np.full((len(batch), width), self.pad_id, np.int64)
        targets = np.full((len(batch), width), IGNORE, np.int64)
        for row, i in enumerate(batch):
            e = self.examples[i]
            inputs[row, :len(e)] = e.ids[:-1]
            targets[row, :len(e)] = np.where(e.supervised[1:], e.ids[1:], IGNORE)
        return inputs, targets
