"""Real data into the canonical dataset (data.write_dataset): Amazon Reviews 2023 and 2018, RecBole atomic files.

Reviews are streamed first, then only the titles of reviewed items are kept from the meta files, so memory grows with
the kept interactions, not with the files. Every record that is not kept is counted in the report (manifest["report"]):
files: {path: {lines, malformed, first_malformed_line, expected, unused (meta rows of items nobody interacted with)}},
dropped: {no_title_items, no_title_interactions, duplicates, k_core_/min_len_ interactions, users, items}, renamed_items
(ids in two categories), and timestamps (only when fractional ones were scaled).
"""
from __future__ import annotations

import gzip
import json
import json.scanner
import math
import re
from array import array
from pathlib import Path

import numpy as np

from common import UserError
from data import Domain, clean_text, write_dataset

# The C scanner that json.loads ends in, called directly: it skips loads()'s two whitespace regexes per line (~10% of
# the parse time); _json() keeps loads()'s verdict on leading whitespace and trailing garbage.
_scan = json.scanner.make_scanner(json.JSONDecoder())
AMAZON = {  # version -> review file names (first found wins), meta file names, review (user, item, time) fields
    2023: (("{}.jsonl", "{}.jsonl.gz"), ("meta_{}.jsonl", "meta_{}.jsonl.gz"), ("user_id", "parent_asin", "timestamp")),
    2018: (("{}_5.json", "{}_5.json.gz", "{}.json", "{}.json.gz"), ("meta_{}.json", "meta_{}.json.gz"),
           ("reviewerID", "asin", "unixReviewTime")),
}
TITLE_FIELDS = ("title", "movie_title", "name", "item_name")


def _json(s: str):
    try:
        r, end = _scan(s, 0)
    except StopIteration:  # leading whitespace or not JSON at all: json.loads decides
        return json.loads(s)
    if end != len(s) and not s[end:].isspace():
        raise ValueError("data after the JSON object")
    return r


def _open(path: Path):
    # Lines end at "\n" only (a stray CR inside a title is no line break). Bytes that are not UTF-8 become lone
    # surrogates instead of ending the whole read: ids holding one fail isprintable(), titles fail _text().
    args = dict(encoding="utf-8", errors="surrogateescape", newline="\n")
    return gzip.open(path, "rt", **args) if path.suffix == ".gz" else open(path, **args)


def _text(s) -> str | None:
    """A title as stored (cleaned), or None if it is not a string or not valid UTF-8."""
    try:
        return clean_text(s) if isinstance(s, str) and s.encode() else None
    except UnicodeEncodeError:
        return None


def _file_stats(report: dict, path: Path) -> dict:
    return report["files"].setdefault(str(path), {"lines": 0, "malformed": 0})


def _malformed(stats: dict, path: Path, n: int, expected: str, strict: bool) -> None:
    if strict:
        raise UserError(f"{path}:{n}: malformed line; expected {expected} (drop --strict to skip and count such lines)")
    stats["malformed"] += 1
    if stats["malformed"] == 1:
        stats["first_malformed_line"], stats["expected"] = n, expected


def _valid_id(s) -> bool:
    # Ids go into a TSV: tabs, newlines and other control characters would corrupt it.
    return type(s) is str and s != "" and s.isprintable()


def _collect(records, users: dict) -> tuple[dict, array, array, array]:
    """One domain's (user, item, time) records as item id -> index and parallel (user index, item index, time)
    arrays: ~24 bytes an interaction instead of a tuple's ~150. `users` (id -> index) is shared by all domains."""
    index, us, its, ts = {}, array("q"), array("q"), array("d")
    for user, item, t in records:
        u = users.get(user)
        if u is None:
            u = users[user] = len(users)
        i = index.get(item)
        if i is None:
            i = index[item] = len(index)
        us.append(u), its.append(i), ts.append(t)
    return index, us, its, ts


def _read_reviews(path: Path, fields: tuple[str, str, str], report: dict, strict: bool):
    """(user, item, time) of every well-formed review line."""
    user_f, item_f, time_f = fields
    expected = f"a JSON object with non-empty string {user_f!r}, {item_f!r} and an integer {time_f!r}"
    stats, n = _file_stats(report, path), 0
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                r = _json(line)
                user, item, t = r[user_f], r[item_f], r[time_f]
                ok = type(t) is int and type(user) is type(item) is str and user.isprintable() and item.isprintable() \
                    and user != "" != item  # _valid_id() inlined: this is the hottest loop
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                yield user, item, t
            elif line.strip():
                _malformed(stats, path, n, expected, strict)
        stats["lines"] = n


def _read_meta(path: Path, item_f: str, index: dict, report: dict, strict: bool) -> list[str]:
    """The cleaned title of every item in `index` that has one, "" for the rest."""
    titles, stats, n = [""] * len(index), _file_stats(report, path), 0
    stats["unused"] = 0
    key = f'"{item_f}"'
    ids = re.compile(rf'"{re.escape(item_f)}"\s*:\s*"([^"\\]*)"')
    expected = f"a JSON object with a non-empty string {item_f!r}"
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            # Meta lines are long and most name items nobody reviewed: skip one unparsed when every occurrence of the
            # id key has a plain (escape-free) value that is not needed. Anything less certain is parsed.
            found = ids.findall(line)
            if found and len(found) == line.count(key) and not any(x in index for x in found):
                stats["unused"] += 1
                continue
            try:
                r = _json(line)
                item, title = r[item_f], _text(r.get("title"))
                ok = _valid_id(item)
            except (ValueError, KeyError, TypeError, AttributeError):
                ok = False  # Python-dict-literal lines (some 2018 mirrors) land here: never eval'd
            if not ok:
                if line.strip():
                    _malformed(stats, path, n, expected, strict)
                continue
            i = index.get(item)
            if i is None:
                stats["unused"] += 1
            elif not titles[i] and title:
                titles[i] = title
        stats["lines"] = n
    return titles


def _find(source: Path, patterns: tuple[str, ...], category: str) -> Path | None:
    return next((source / p.format(category) for p in patterns if (source / p.format(category)).is_file()), None)


def _present(source: Path, patterns: tuple[str, ...]) -> list[str]:
    """Categories whose review file is in `source` (for error messages). Non-greedy, so X_5.json is X, not X_5."""
    suffixes = "|".join(re.escape(p.replace("{}", "")) for p in patterns)
    name = re.compile(rf"(?!meta_)(.+?)(?:{suffixes})")
    return sorted({m[1] for f in source.iterdir() if (m := name.fullmatch(f.name))})


def convert_amazon(version: int, source: Path, categories: list[str], out_dir: Path, *, downstream: list[str] = (),
                   k_core: int = 0, min_len: int = 0, strict: bool = False) -> dict:
    """Amazon Reviews `version` (2023 or 2018) categories in `source` -> one domain per category, keyed by the
    category as given. Users are shared across categories by id. Timestamps are kept in the files' unit (2023: ms,
    2018: s). Returns the manifest."""
    if version not in AMAZON:
        raise UserError(f"Amazon Reviews version {version}: expected one of {', '.join(map(str, AMAZON))}")
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"{source}: not a directory; expected the folder holding the Amazon Reviews {version} files")
    if not categories or len(set(categories)) != len(categories):
        raise UserError(f"--categories {','.join(categories)}: expected one or more distinct Amazon category names")
    if extra := [c for c in downstream if c not in categories]:
        raise UserError(f"--downstream {', '.join(extra)}: not among the categories {', '.join(categories)}")
    review_names, meta_names, fields = AMAZON[version]
    paths = []
    for c in categories:
        reviews, meta = _find(source, review_names, c), _find(source, meta_names, c)
        if reviews is None:
            raise UserError(f"{source}: no reviews for category {c!r}: expected "
                            f"{' or '.join(p.format(c) for p in review_names)}; categories present: "
                            f"{', '.join(_present(source, review_names)) or 'none'}")
        if meta is None:
            raise UserError(f"{source}: no item titles for category {c!r}: expected "
                            f"{' or '.join(p.format(c) for p in meta_names)}")
        paths.append((reviews, meta))
    report, users, logs, titles = {"files": {}}, {}, [], []
    for reviews, meta in paths:
        logs.append(_collect(_read_reviews(reviews, fields, report, strict), users))
        titles.append(_read_meta(meta, fields[1], logs[-1][0], report, strict))
    domains = [Domain(c, c.replace("_", " "), "downstream" if c in downstream else "pretrain") for c in categories]
    return _finish(out_dir, f"amazon{version}:{source}", domains, users, logs, titles, paths, report, k_core, min_len)


def _display_name(key: str) -> str:
    """ml-100k -> "Ml 100k", amazon_books -> "Amazon Books": words already holding capitals are left alone."""
    words = [w for w in re.split(r"[_\-\s]+", key) if w]
    small = {"and", "of", "the", "in", "for", "on", "a", "an", "to", "or"}
    return " ".join(w if not w.islower() or (k and w in small) else w[0].upper() + w[1:]
                    for k, w in enumerate(words)) or key


def _tsv(path: Path, report: dict, strict: bool, pick):
    """RecBole atomic file rows as the values of the columns `pick(names)` chose (names without ":type"), tagged with
    their line number; rows with the wrong column count are counted as malformed."""
    stats = _file_stats(report, path)
    with _open(path) as f:
        header = f.readline().lstrip("\ufeff").rstrip("\r\n").split("\t")
        columns = pick([c.split(":")[0] for c in header])
        expected = f"{len(header)} tab-separated columns ({' '.join(header)})"
        n = 1
        for n, line in enumerate(f, 2):
            row = line.rstrip("\r\n").split("\t")
            if len(row) == len(header):
                yield n, [row[j] for j in columns]
            elif line.strip():
                _malformed(stats, path, n, expected, strict)
        stats["lines"] = n


def _columns(path: Path, wanted: list[str]):
    def pick(names: list[str]) -> list[int]:
        if missing := [w for w in wanted if w not in names]:
            raise UserError(f"{path}: no column {', '.join(missing)}; columns: {', '.join(names)}")
        return [names.index(w) for w in wanted]
    return pick


def _read_inter(path: Path, report: dict, strict: bool):
    """(user, item, time) of every well-formed row of a RecBole .inter file."""
    stats = _file_stats(report, path)
    for n, (user, item, ts) in _tsv(path, report, strict, _columns(path, ["user_id", "item_id", "timestamp"])):
        try:
            t = float(ts)
        except ValueError:
            t = math.nan
        if math.isfinite(t) and _valid_id(user) and _valid_id(item):
            yield user, item, t
        else:
            _malformed(stats, path, n, "non-empty user_id and item_id and a numeric timestamp", strict)


def convert_recbole(source: Path, out_dir: Path, *, name: str | None = None, domain: str | None = None,
                    title_field: str | None = None, k_core: int = 0, min_len: int = 0, strict: bool = False) -> dict:
    """A RecBole atomic dataset directory (NAME.inter with user_id, item_id, timestamp; NAME.item with item_id and a
    title column) -> one domain. Fractional timestamps become integers that keep their order. Returns the manifest."""
    source = Path(source)
    name = name or source.name
    inter, item = source / f"{name}.inter", source / f"{name}.item"
    for p in (inter, item):
        if not p.is_file():
            raise UserError(f"{p}: not found; expected a RecBole dataset folder holding {name}.inter and {name}.item")
    report, users = {"files": {}}, {}
    log = _collect(_read_inter(inter, report, strict), users)

    def pick_title(names: list[str]) -> list[int]:
        field = title_field.split(":")[0] if title_field else next((f for f in TITLE_FIELDS if f in names), None)
        if field is None:
            raise UserError(f"{item}: no title column ({', '.join(TITLE_FIELDS)}); columns: {', '.join(names)}; "
                            "name one with --title-field")
        return _columns(item, ["item_id", field])(names)
    index, titles = log[0], [""] * len(log[0])
    stats = _file_stats(report, item)
    stats["unused"] = 0
    for _, (item_id, title) in _tsv(item, report, strict, pick_title):
        i = index.get(item_id)
        if i is None:
            stats["unused"] += 1
        elif not titles[i]:
            titles[i] = _text(title) or ""
    key = domain or name
    return _finish(out_dir, f"recbole:{source}", [Domain(key, _display_name(key), "pretrain")], users, [log],
                   [titles], [(inter, item)], report, k_core, min_len)


def _integer_times(t: np.ndarray) -> tuple[np.ndarray, int]:
    """Timestamps as integers: as they are when whole, else scaled by the smallest power of 10 (up to 1e6) that keeps
    every distinct time distinct, so time order (all the splits use) survives; beyond that, their rank."""
    if np.array_equal(t, np.rint(t)):
        return t.astype(np.int64), 1
    distinct = len(np.unique(t))
    for scale in (10, 100, 1000, 10 ** 4, 10 ** 5, 10 ** 6):
        if len(np.unique(np.rint(t * scale))) == distinct:
            return np.rint(t * scale).astype(np.int64), scale
    return np.unique(t, return_inverse=True)[1].astype(np.int64), 0


def _filter(keep: np.ndarray, u: np.ndarray, i: np.ndarray, key: str, k_core: int, min_len: int,
            dropped: dict) -> None:
    """One domain's filters, in place on `keep`, counting what each removes (users and items counted per domain):
    k-core to its fixed point, then min_len, again while min_len removes interactions a k-core counted on."""
    nu, ni, total = u.max() + 1, i.max() + 1, int(keep.sum())

    def apply(bad: np.ndarray, what: str, flag: str) -> None:
        new = keep & ~bad
        if not new.any():
            raise UserError(f"domain {key!r}: {flag} removed its last {int(keep.sum()):,} interactions "
                            f"({total:,} before filtering); lower it")
        dropped[f"{what}_interactions"] += int(keep.sum() - new.sum())
        dropped[f"{what}_users"] += len(np.unique(u[keep])) - len(np.unique(u[new]))
        dropped[f"{what}_items"] += len(np.unique(i[keep])) - len(np.unique(i[new]))
        keep[:] = new

    while True:
        while k_core:
            bad = keep & ((np.bincount(u[keep], minlength=nu)[u] < k_core) |
                          (np.bincount(i[keep], minlength=ni)[i] < k_core))
            if not bad.any():
                break
            apply(bad, "k_core", f"--k-core {k_core}")
        short = keep & (np.bincount(u[keep], minlength=nu)[u] < min_len)
        if not short.any():
            return
        apply(short, "min_len", f"--min-len {min_len}")
        if not k_core:
            return


def _finish(out_dir: Path, source: str, domains: list[Domain], users: dict, logs: list, titles: list[list[str]],
            paths: list[tuple[Path, Path]], report: dict, k_core: int, min_len: int) -> dict:
    """Drop untitled items and repeated (user, item) pairs, filter each domain, and write the dataset."""
    dropped = report["dropped"] = {k: 0 for k in ("no_title_items", "no_title_interactions", "duplicates")}
    for what in ["k_core"] * bool(k_core) + ["min_len"] * bool(min_len):
        dropped.update({f"{what}_interactions": 0, f"{what}_users": 0, f"{what}_items": 0})
    times, scale = _integer_times(np.concatenate([np.frombuffer(log[3], np.float64) for log in logs]))
    if scale != 1:
        report["timestamps"] = f"fractional: scaled by {scale} to integers" if scale else "fractional: replaced by rank"
    report["renamed_items"] = 0
    user_ids, items, interactions, start = list(users), {}, [], 0
    for d, (index, us, its, _), title, (reviews, meta) in zip(domains, logs, titles, paths):
        u, i, t = np.frombuffer(us, np.int64), np.frombuffer(its, np.int64), times[start:start + len(us)]
        start += len(us)
        if not len(u):
            raise UserError(f"{reviews}: no well-formed interaction; domain {d.key!r} would be empty")
        titled = np.array([bool(x) for x in title], bool)
        dropped["no_title_items"] += int((~titled).sum())
        keep = titled[i]
        dropped["no_title_interactions"] += int((~keep).sum())
        pair = u * len(index) + i
        order = np.lexsort((t, pair))  # earliest first within each (user, item) pair
        first = np.empty(len(pair), bool)
        first[order] = np.r_[True, pair[order][1:] != pair[order][:-1]]
        dropped["duplicates"] += int((keep & ~first).sum())
        keep &= first
        if not keep.any():
            raise UserError(f"domain {d.key!r}: none of its {len(u):,} interactions has an item with a title in {meta}")
        _filter(keep, u, i, d.key, k_core, min_len, dropped)
        ids = list(index)
        for k in np.unique(i[keep]).tolist():
            if ids[k] in items:  # one product in two categories: one id must name one item of one domain
                ids[k] = f"{ids[k]}@{d.key}"
                report["renamed_items"] += 1
            items[ids[k]] = (d.key, title[k])
        interactions += zip(map(user_ids.__getitem__, u[keep].tolist()), map(ids.__getitem__, i[keep].tolist()),
                            t[keep].tolist())
    return write_dataset(out_dir, source=source, domains=domains, items=items, interactions=interactions,
                         report=report)
