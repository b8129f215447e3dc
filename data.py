"""The data path, top to bottom: chronological leave-one-out splits, the one prompt template, CPT sequences
(domain-specific and all-domain mixed), token blocks for CPT and batches for SFT.

The dataset on disk (manifest.json, items.jsonl, interactions.tsv) is infra/datasets.py's; the converters
(extras/prepare.py) and the built-in world (extras/world.py) write it, load_dataset() reads it and adds the split.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.cache import cached_array
from infra.console import counted
from infra.console import progress as progress_bar
from infra.datasets import Dataset, Domain, read_dataset
from infra.files import UserError
from infra.tokenizer import Tokenizer

TRAIN, VALID, TEST = 0, 1, 2


# --------------------------------------------------------------------------------------------------- the split
def load_dataset(path: str | Path) -> Dataset:
    """A dataset (infra/datasets.py reads and checks the files) with its leave-one-out split."""
    ds = read_dataset(path)
    ds.split = leave_one_out(ds.user, ds.item_domain[ds.item])
    return ds


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


def sample(cases: list, n: int, seed: int) -> list:
    """A seeded subset of n cases in their original order (all when n is 0 or at least their number): the one rule
    for validation users, test users and SFT's users fraction, so the same seed picks the same users everywhere."""
    if n and n < len(cases):
        return [cases[i] for i in sorted(np.random.default_rng(seed).choice(len(cases), n, replace=False))]
    return cases


def limited_users(sequences: list, fraction: float, seed: int) -> list:
    """The limited-SFT setting: a seeded `fraction` of the users' training sequences (at least one). finetune and
    align both draw it here, so post-training after SFT on 10% of the users sees the same users, not more data."""
    if not 0 < fraction <= 1:
        raise UserError(f"--users-fraction {fraction}: expected a value in (0, 1]")
    return sample(sequences, max(1, round(fraction * len(sequences))), seed)


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

    def warm(self, texts: list[str]) -> None:
        """Tokenize the texts not seen yet in one batch (the tokenizer's own threads): the same ids, faster."""
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self._cache.update(zip(new, self.tokenizer.encode_batch(new)))

    def sequence(self, ds: Dataset, items, domain: Domain | None) -> tuple[list[int], list[int]]:
        """Token ids of render(ds, items, domain), BOS first when the tokenizer has one, and the index where each
        item's text starts (after its tag): the item's tokens are ids[starts[k]:starts[k + 1]] for a domain."""
        ids, starts = self.bos + self(header(domain)), []
        for prefix, text in lines(ds, items, domain):
            ids.extend(self(prefix) if prefix else ())
            starts.append(len(ids))
            ids.extend(self(text))
        return ids, starts


class Segments:
    """Every text a CPT sequence is made of (each item's text, each domain's tag and header, the mixed header, BOS and
    EOS) tokenized once, in one batch, into a flat table. A sequence is then a list of segment numbers and its tokens
    a gather from the table: Encoder.sequence's tokens, without a Python list per sequence (millions at scale)."""

    def __init__(self, ds: Dataset, encoder: Encoder):
        self.ds, self.domains = ds, list(ds.domains.values())
        texts = [item_text(t) for t in ds.titles] + [TAG.format(name=d.name) for d in self.domains]
        texts += [header(d) for d in self.domains] + [header(None)]
        encoder.warm(texts)
        ids = [encoder(t) for t in texts] + [encoder.bos, [encoder.tokenizer.eos_id]]
        self.lengths = np.array([len(x) for x in ids], np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.table = np.fromiter((t for x in ids for t in x), np.uint32, int(self.lengths.sum()))
        # segment numbers: item i is i, then the tags, then the headers (the mixed one last), BOS, EOS
        self.tag, self.head, self.bos, self.eos = len(ds.titles), len(ds.titles) + len(self.domains), -2, -1

    def numbers(self, items: np.ndarray, domain: Domain | None) -> np.ndarray:
        """One sequence's segments, in Encoder.sequence's order, closed by EOS."""
        if domain is None:  # the mixed header, then each item after its domain's tag
            tags = self.tag + self.ds.item_domain[items].astype(np.int64)
            head, middle = self.head + len(self.domains), np.stack([tags, items], 1).ravel()
        else:
            head, middle = self.head + self.domains.index(domain), items
        return np.r_[self.bos, head, middle, self.eos]

    def stream(self, sequences: list, progress: bool = False, chunk: int = 4096):
        """The sequences' tokens one after another, a gather per `chunk` sequences, each yielded as it is made."""
        with progress_bar(len(sequences), "tokenize CPT sequences", progress) as advance:
            for i in range(0, len(sequences), chunk):
                segments = np.concatenate([self.numbers(*s) for s in sequences[i:i + chunk]])
                starts, lengths = self.starts[segments], self.lengths[segments]
                # position p copies table[start of its segment + p - (where its segment begins in this chunk)]
                yield self.table[np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())]
                advance(len(sequences[i:i + chunk]))


def cpt_stream(ds: Dataset, encoder: Encoder, kinds=SEQUENCE_KINDS, seed: int = 0, progress: bool = False,
               verify: bool = True) -> np.ndarray:
    """The text CPT trains on: the CPT sequences shuffled by `seed`, each rendered with the template, tokenized and
    closed by EOS, joined into one stream of token ids that Blocks packs. Exactly the concatenation of
    encoder.sequence(ds, *s)[0] + [EOS] over the shuffled sequences s (tests/test_data.py checks it).

    Built once into DATASET/cache/cpt-KEY.npy (the user cache if the dataset is read-only), KEY a hash of everything
    it depends on, and returned memory-mapped (infra/cache.py), so the processes of a multi-GPU run share one copy in
    the page cache. `verify`: check its checksum first, rebuilding it if it differs (one process of a run does)."""
    def build():
        sequences = cpt_sequences(ds, kinds)
        if not sequences:
            raise UserError(f"{ds.path}: no CPT sequences (each needs 2 or more training items); check the dataset")
        shuffled = [sequences[k] for k in np.random.default_rng(seed).permutation(len(sequences))]
        return Segments(ds, encoder).stream(shuffled, progress)  # render, tokenize, close by EOS, join
    inputs = [ds.fingerprint, encoder.tokenizer.fingerprint(), sorted(kinds), seed, TEMPLATE_FINGERPRINT]
    return cached_array(ds.path / "cache", "cpt", inputs, build, np.uint32, verify)


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
def pad(rows, fill: int, left: bool = False) -> np.ndarray:
    """Sequences of different lengths as one (rows, longest) int64 array, filled with `fill` after each (or before
    it, `left`: prompts, whose last tokens then line up). The one padding rule of every batch in the project."""
    out = np.full((len(rows), max(map(len, rows), default=0)), fill, np.int64)
    for row, seq in enumerate(rows):
        start = out.shape[1] - len(seq) if left else 0
        out[row, start:start + len(seq)] = seq
    return out


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


def length_buckets(lengths: np.ndarray, seed: int, epoch: int, *, tokens: int = 0, rows: int = 0,
                   window: int = 4) -> list[list[int]]:
    """An epoch's micro-batches of rows of these lengths, the one rule of every batch source: ordered by length so
    that similar lengths share a batch (little padding), cut, and the batches shuffled; a function of seed and epoch
    alone, so a resumed run repeats it. Either
    - `tokens`: all rows sorted (random among equal lengths), cut before a row would take the padded batch (rows x
      the longest) past `tokens` (SFT examples), or
    - `rows`: shuffled, sorted within runs of `window` batches and cut every `rows` rows (users, preference cases),
      so which rows meet in a batch still changes every epoch."""
    rng = np.random.default_rng([seed, epoch])
    if tokens:
        batches = [[]]
        for i in np.lexsort((rng.random(len(lengths)), lengths)):
            if batches[-1] and lengths[i] * (len(batches[-1]) + 1) > tokens:  # sorted: row i is the longest
                batches.append([])
            batches[-1].append(int(i))
    else:
        order, span = rng.permutation(len(lengths)), rows * window
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(span, len(order), span))])
        batches = [order[i:i + rows].tolist() for i in range(0, len(order), rows)]
    return [batches[k] for k in rng.permutation(len(batches))]


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
        return length_buckets(np.array([len(e) for e in self.examples]), self.seed, epoch, tokens=self.tokens)

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
        examples = [self.examples[i] for i in batch]
        return (pad([e.ids[:-1] for e in examples], self.pad_id),
                pad([np.where(e.supervised[1:], e.ids[1:], IGNORE) for e in examples], IGNORE))
