"""`cprec prepare`: real data into the canonical dataset (infra/datasets.py): Amazon Reviews 2023 and 2018, RecBole
atomic files; `prepare synthetic` writes the built-in world (extras/world.py).

Reviews are streamed first, then only the titles of reviewed items are kept from the meta files, so memory grows with
the kept interactions, not with the files. Every record that is not kept or kept changed is counted in the report
(manifest["report"]):
files: {path: {lines, malformed, malformed_lines (the first 5), expected, ended_early (a truncated .gz: the lines before
the cut were used), unused (meta rows of items nobody interacted with), duplicate_ids (a RecBole .item row of an id
already read: the first is kept), repaired_titles (bytes that are not UTF-8 replaced by U+FFFD, control characters
by spaces)}},
dropped: {no_title_items, no_title_interactions, duplicates, no_domain_items, no_domain_interactions (--domain-field),
k_core_/min_len_ interactions, users, items}, renamed_ids (one id in two categories gets "@domain"), titles:
{with_year (repeated titles told apart by their year), numbered (" (2)"), truncated (infra.datasets.MAX_TITLE_CHARS)},
merged_into_other (--min-domain-items: domain -> items) and timestamps (only when fractional ones were scaled).
"""
from __future__ import annotations

import gzip
import io
import json
import json.scanner
import math
import re
import zlib
from array import array
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from infra.cli import PROGRESS, console, split_list
from infra.config import DEFAULT_DATA
from infra.console import progress as progress_bar
from infra.console import say
from infra.datasets import Domain, clean_text, dataset_out, write_dataset
from infra.files import UserError, quote

# The C scanner that json.loads ends in, called directly: it skips loads()'s two whitespace regexes per line (~10% of
# the parse time); _json() keeps loads()'s verdict on leading whitespace and trailing garbage.
_scan = json.scanner.make_scanner(json.JSONDecoder())
AMAZON = {  # version -> review file names (first found wins), meta file names, review (user, item, time) fields
    2023: (("{}.jsonl", "{}.jsonl.gz"), ("meta_{}.jsonl", "meta_{}.jsonl.gz"), ("user_id", "parent_asin", "timestamp")),
    2018: (("{}_5.json", "{}_5.json.gz", "{}.json", "{}.json.gz"), ("meta_{}.json", "meta_{}.json.gz"),
           ("reviewerID", "asin", "unixReviewTime")),
}
TITLE_FIELDS = ("title", "movie_title", "name", "item_name")
YEAR_FIELDS = ("release_year", "year")
SHOWN_LINES = 5  # malformed line numbers kept per file
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # not whitespace, not printable
LATEST = 10**15  # timestamps beyond +-1e15 (milliseconds: the year 33,658) cannot be times; int64 holds them exactly


def _json(s: str):
    try:
        r, end = _scan(s, 0)
    except StopIteration:  # leading whitespace or not JSON at all: json.loads decides
        return json.loads(s)
    if end != len(s) and not s[end:].isspace():
        raise ValueError("data after the JSON object")
    return r


def _open(raw, gz: bool):
    # Lines end at "\n" only (a stray CR inside a title is no line break). Bytes that are not UTF-8 become lone
    # surrogates instead of ending the whole read: ids holding one fail isprintable(), _text() repairs titles.
    return io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if gz else raw, encoding="utf-8", errors="surrogateescape",
                            newline="\n")


def _lines(path: Path, stats: dict, strict: bool, progress: bool = False):
    """(line number, line) of a plain or gzip text file. A .gz that stops before its end marker (an interrupted
    download) keeps the lines before the cut and says so in `stats` (--strict: an error); any other unreadable
    file is one error line naming it. `progress`: a bar over the file's (compressed) megabytes."""
    n = 0
    try:
        total = max(1, path.stat().st_size >> 20)
        with open(path, "rb") as raw, _open(raw, path.suffix == ".gz") as text, \
                progress_bar(total, f"read {path.name} (MB)", progress) as advance:
            shown = 0
            for n, line in enumerate(text, 1):
                if n % 65536 == 0:  # raw.tell(): how far into the file, compressed or not
                    read = raw.tell() >> 20
                    advance(read - shown)
                    shown = read
                yield n, line
            advance(total - shown)
    except EOFError:  # click would turn it into a bare "Aborted."
        if strict:
            raise UserError(f"{path}: truncated: the compressed data ends after line {n:,}; download it again (or "
                            "drop --strict to use the lines before the cut)") from None
        stats["ended_early"] = f"truncated: the compressed data ends after line {n:,}; the lines before were used"
    except (OSError, zlib.error) as e:
        raise UserError(f"{path}: unreadable after line {n:,} ({e}); expected a complete "
                        f"{'gzip' if path.suffix == '.gz' else 'text'} file") from None
    stats["lines"] = n


def _text(s, stats: dict) -> str:
    """A title as stored (cleaned), "" if it is not a string. Bytes that were not UTF-8 (lone surrogates after
    _open's surrogateescape, or escaped ones in JSON) become U+FFFD and control characters (a NUL, a terminal
    escape) a space: either counted in stats["repaired_titles"]."""
    if not isinstance(s, str):
        return ""
    try:
        s.encode()
        repaired = CONTROL.search(s) is not None
    except UnicodeEncodeError:
        s, repaired = re.sub("[\ud800-\udfff]", "\ufffd", s), True
    if repaired:
        stats["repaired_titles"] = stats.get("repaired_titles", 0) + 1
    return clean_text(s)


def _file_stats(report: dict, path: Path) -> dict:
    return report["files"].setdefault(str(path), {"lines": 0, "malformed": 0})


def _malformed(stats: dict, path: Path, n: int, expected: str, strict: bool) -> None:
    if strict:
        raise UserError(f"{path}:{n}: malformed line; expected {expected} (drop --strict to skip and count such lines)")
    stats["malformed"] += 1
    if stats["malformed"] == 1:
        stats["malformed_lines"], stats["expected"] = [], expected
    if len(stats["malformed_lines"]) < SHOWN_LINES:
        stats["malformed_lines"].append(n)


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


def _read_reviews(path: Path, fields: tuple[str, str, str], report: dict, strict: bool, progress: bool = False):
    """(user, item, time) of every well-formed review line."""
    user_f, item_f, time_f = fields
    expected = f"a JSON object with non-empty string {user_f!r}, {item_f!r} and an integer {time_f!r} within +-1e15"
    stats = _file_stats(report, path)
    for n, line in _lines(path, stats, strict, progress):
        try:
            r = _json(line)
            user, item, t = r[user_f], r[item_f], r[time_f]
            ok = type(t) is int and type(user) is type(item) is str and user.isprintable() and item.isprintable() \
                and user != "" != item and -LATEST < t < LATEST  # _valid_id() inlined: this is the hottest loop
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            yield user, item, t
        elif line.strip():
            _malformed(stats, path, n, expected, strict)


def _read_meta(path: Path, item_f: str, index: dict, report: dict, strict: bool, field: str | None = None,
               progress: bool = False) -> tuple[list[str], list[str]]:
    """The cleaned title of every item in `index` that has one, "" for the rest; and likewise its `field` value."""
    titles, values, stats = [""] * len(index), [""] * len(index), _file_stats(report, path)
    stats["unused"] = 0
    key = f'"{item_f}"'
    ids = re.compile(rf'"{re.escape(item_f)}"\s*:\s*"([^"\\]*)"')
    expected = f"a JSON object with a non-empty string {item_f!r}"
    for n, line in _lines(path, stats, strict, progress):
        # Meta lines are long and most name items nobody reviewed: skip one unparsed when every occurrence of the
        # id key has a plain (escape-free) value that is not needed. Anything less certain is parsed.
        found = ids.findall(line)
        if found and len(found) == line.count(key) and not any(x in index for x in found):
            stats["unused"] += 1
            continue
        try:
            r = _json(line)
            item, title, value = r[item_f], r.get("title"), r.get(field) if field else None
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
        elif not titles[i]:
            titles[i], values[i] = _text(title, stats), _first_value(value)
    return titles, values


def _first_value(v) -> str:
    """An item's domain value in Amazon meta: a string, or the first of a list (a category path). Amazon 2018's
    main_cat is sometimes an <img> tag; its alt text names the category."""
    if isinstance(v, list):
        v = next((x for x in v if isinstance(x, str) and x.strip()), "")
    if not isinstance(v, str):
        return ""
    if v.lstrip().startswith("<"):
        v = m[1] if (m := re.search(r'alt="([^"]*)"', v)) else ""
    return clean_text(v)


def _find(source: Path, patterns: tuple[str, ...], category: str) -> Path | None:
    return next((source / p.format(category) for p in patterns if (source / p.format(category)).is_file()), None)


def _present(source: Path, patterns: tuple[str, ...]) -> list[str]:
    """Categories whose review file is in `source` (for error messages). Non-greedy, so X_5.json is X, not X_5."""
    suffixes = "|".join(re.escape(p.replace("{}", "")) for p in patterns)
    name = re.compile(rf"(?!meta_)(.+?)(?:{suffixes})")
    return sorted({m[1] for f in source.iterdir() if (m := name.fullmatch(f.name))})


def convert_amazon(version: int, source: Path, categories: list[str], out_dir: Path, *, downstream: list[str] = (),
                   domain_field: str | None = None, min_domain_items: int = 0, k_core: int = 0, min_len: int = 0,
                   strict: bool = False, progress: bool = False) -> dict:
    """Amazon Reviews `version` (2023 or 2018) categories in `source` -> one domain per category, keyed by the
    category as given, or with `domain_field` one domain per first value of that meta field (2018: main_cat, 2023:
    main_category) over all the categories' items. Users are shared across categories by id. Timestamps are kept in
    the files' unit (2023: ms, 2018: s). `progress`: a bar per file read. Returns the manifest."""
    if version not in AMAZON:
        raise UserError(f"Amazon Reviews version {version}: expected one of {', '.join(map(str, AMAZON))}")
    _counts(min_domain_items=min_domain_items, k_core=k_core, min_len=min_len)
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"{source}: not a directory; expected the folder holding the Amazon Reviews {version} files")
    if not categories or len(set(categories)) != len(categories):
        raise UserError(f"--categories {','.join(categories)}: expected one or more distinct Amazon category names")
    if not domain_field and (extra := [c for c in downstream if c not in categories]):
        raise UserError(f"--downstream {', '.join(extra)}: not among the categories {', '.join(categories)}")
    review_names, meta_names, fields = AMAZON[version]
    paths = []
    for c in categories:
        reviews, meta = _find(source, review_names, c), _find(source, meta_names, c)
        if reviews is None:
            raise UserError(f"{source}: no reviews for category {quote(c)}: expected "
                            f"{' or '.join(p.format(c) for p in review_names)}; categories present: "
                            f"{', '.join(_present(source, review_names)) or 'none'}")
        if meta is None:
            raise UserError(f"{source}: no item titles for category {quote(c)}: expected "
                            f"{' or '.join(p.format(c) for p in meta_names)}")
        paths.append((reviews, meta))
    report, users, logs, titles = {"files": {}}, {}, [], []
    if domain_field:  # all categories' items as one log, then split by the field
        log = _collect(chain.from_iterable(_read_reviews(r, fields, report, strict, progress) for r, _ in paths), users)
        titles, values = [""] * len(log[0]), [""] * len(log[0])
        for _, meta in paths:  # an item listed in several meta files: the first title and value found
            more = _read_meta(meta, fields[1], log[0], report, strict, domain_field, progress)
            titles, values = [a or b for a, b in zip(titles, more[0])], [a or b for a, b in zip(values, more[1])]
        domains, logs, titles, _ = _split_domains(log, values, titles, [""] * len(titles), domain_field, downstream,
                                                  min_domain_items, report)
        return _finish(out_dir, f"amazon{version}:{source}, domains from {domain_field}", domains, users, logs,
                       titles, [(source, source)] * len(domains), report, k_core, min_len)
    for reviews, meta in paths:
        logs.append(_collect(_read_reviews(reviews, fields, report, strict, progress), users))
        titles.append(_read_meta(meta, fields[1], logs[-1][0], report, strict, progress=progress)[0])
    domains = [Domain(c, c.replace("_", " "), "downstream" if c in downstream else "pretrain") for c in categories]
    return _finish(out_dir, f"amazon{version}:{source}", domains, users, logs, titles, paths, report, k_core, min_len)


def _display_name(key: str) -> str:
    """ml-100k -> "Ml 100k", amazon_books -> "Amazon Books": words already holding capitals are left alone."""
    words = [w for w in re.split(r"[_\-\s]+", key) if w]
    small = {"and", "of", "the", "in", "for", "on", "a", "an", "to", "or"}
    return " ".join(w if not w.islower() or (k and w in small) else w[0].upper() + w[1:]
                    for k, w in enumerate(words)) or key


def _tsv(path: Path, report: dict, strict: bool, pick, progress: bool = False):
    """RecBole atomic file rows as the values of the columns `pick(header)` chose (-1: absent, value ""), tagged with
    their line number; rows with the wrong column count are counted as malformed."""
    stats = _file_stats(report, path)
    lines = _lines(path, stats, strict, progress)
    header = next(lines, (1, ""))[1].lstrip("\ufeff").rstrip("\r\n").split("\t")
    columns = pick(header)
    expected = f"{len(header)} tab-separated columns ({' '.join(header)})"
    for n, line in lines:
        row = line.rstrip("\r\n").split("\t")
        if len(row) == len(header):
            yield n, [row[j] if j >= 0 else "" for j in columns]
        elif line.strip():
            _malformed(stats, path, n, expected, strict)


def _columns(path: Path, wanted: list[str | None]):
    """A pick() for _tsv: the index of each wanted column (names without ":type"), -1 for None."""
    def pick(header: list[str]) -> list[int]:
        names = [c.split(":")[0] for c in header]
        if missing := [w for w in wanted if w is not None and w not in names]:
            raise UserError(f"{path}: no column {', '.join(missing)}; columns: {', '.join(names)}")
        return [names.index(w) if w is not None else -1 for w in wanted]
    return pick


def _read_inter(path: Path, report: dict, strict: bool, progress: bool = False):
    """(user, item, time) of every well-formed row of a RecBole .inter file."""
    stats = _file_stats(report, path)
    columns = _columns(path, ["user_id", "item_id", "timestamp"])
    for n, (user, item, ts) in _tsv(path, report, strict, columns, progress):
        try:
            t = float(ts)
        except ValueError:
            t = math.nan
        if -LATEST < t < LATEST and _valid_id(user) and _valid_id(item):  # NaN fails too
            yield user, item, t
        else:
            _malformed(stats, path, n, "non-empty, printable UTF-8 user_id and item_id and a numeric timestamp "
                       "within +-1e15", strict)


def _slug(value: str) -> str:
    """A domain key users can type: "Children's" -> childrens, "Sci-Fi" -> sci-fi, "Film Noir" -> film-noir."""
    return re.sub(r"[\W_]+", "-", re.sub(r"['’]", "", value.lower())).strip("-")


def _split_domains(log: tuple, values: list[str], titles: list[str], years: list[str], field: str,
                   downstream: list[str], min_items: int, report: dict):
    """One log -> one per domain, the domain of an item being the slug of its `values` entry (items without one are
    dropped and counted); domains of fewer than `min_items` items are merged into "other". Domains are ordered by
    item count (ties by key), "other" last. Returns domains, logs, titles and years, each per domain."""
    index, us, its, ts = log
    slugs = [_slug(v) for v in values]
    count = Counter(s for s in slugs if s)
    small = sorted(s for s, c in count.items() if c < min_items)
    if small:
        report["merged_into_other"] = {s: count[s] for s in small}
    names = {}
    for v, s in zip(values, slugs):
        names.setdefault(s, v[:1].upper() + v[1:])
    slugs = ["other" if s in small else s for s in slugs]
    names["other"] = "Other"
    final = Counter(s for s in slugs if s)
    keys = sorted(final, key=lambda s: (s == "other", -final[s], s))
    if extra := [k for k in downstream if k not in final]:
        merged = f" ({', '.join(k for k in extra if k in small)} merged into 'other')" * any(k in small for k in extra)
        raise UserError(f"--downstream {', '.join(extra)}: not a domain of --domain-field {field}{merged}; domains: "
                        f"{', '.join(keys)}")
    position = {k: d for d, k in enumerate(keys)}
    domain = np.array([position.get(s, -1) for s in slugs], np.int64)
    u, i, t = np.frombuffer(us, np.int64), np.frombuffer(its, np.int64), np.frombuffer(ts, np.float64)
    of = domain[i]
    report["dropped"] = {"no_domain_items": int((domain < 0).sum()), "no_domain_interactions": int((of < 0).sum())}
    ids, logs, parts = list(index), [], []
    for d in range(len(keys)):
        members = np.flatnonzero(domain == d)
        remap = np.full(len(ids), -1, np.int64)
        remap[members] = np.arange(len(members))
        mask = of == d
        logs.append(({ids[j]: r for r, j in enumerate(members.tolist())}, u[mask], remap[i[mask]], t[mask]))
        parts.append(([titles[j] for j in members.tolist()], [years[j] for j in members.tolist()]))
    domains = [Domain(k, names[k], "downstream" if k in downstream else "pretrain") for k in keys]
    return domains, logs, [p[0] for p in parts], [p[1] for p in parts]


def convert_recbole(source: Path, out_dir: Path, *, name: str | None = None, domain: str | None = None,
                    title_field: str | None = None, year_field: str | None = None, title_year: bool = False,
                    domain_field: str | None = None, downstream: list[str] = (), min_domain_items: int = 0,
                    k_core: int = 0, min_len: int = 0, strict: bool = False, progress: bool = False,
                    domain_values: str | None = None) -> dict:
    """A RecBole atomic dataset directory (NAME.inter with user_id, item_id, timestamp; NAME.item with item_id and a
    title column) -> one domain, or with `domain_field` one domain per first value of that item column (e.g.
    MovieLens's `class`: its first genre). Repeated titles within a domain are told apart by the year column
    (`year_field`, default release_year or year when present) before " (2)"; `title_year` appends the year to every
    title. Fractional timestamps become integers that keep their order. `domain_values`: the first word of a
    `domain_field` value or the whole value (default: first for :token_seq columns, whole for :token ones, which
    are refused when they hold several words). `progress`: a bar per file read. Returns the manifest."""
    _counts(min_domain_items=min_domain_items, k_core=k_core, min_len=min_len)
    source = Path(source)
    name = name or source.name
    inter, item = source / f"{name}.inter", source / f"{name}.item"
    for p in (inter, item):
        if not p.is_file():
            raise UserError(f"{p}: not found; expected a RecBole dataset folder holding {name}.inter and {name}.item")
    if domain and domain_field:
        raise UserError("--domain and --domain-field: give one (the key of the single domain, or the item column "
                        "whose values are the domains)")
    if downstream and not domain_field:
        raise UserError("--downstream needs --domain-field: a single-domain dataset has nothing left for CPT")
    report, users = {"files": {}}, {}
    log = _collect(_read_inter(inter, report, strict, progress), users)

    def pick(header: list[str]) -> list[int]:
        names = [c.split(":")[0] for c in header]
        title = title_field.split(":")[0] if title_field else next((f for f in TITLE_FIELDS if f in names), None)
        if title is None:
            raise UserError(f"{item}: no title column ({', '.join(TITLE_FIELDS)}); columns: {', '.join(names)}; "
                            "name one with --title-field")
        year = year_field.split(":")[0] if year_field else next((f for f in YEAR_FIELDS if f in names), None)
        if title_year and year is None:
            raise UserError(f"--title-year: {item} has no year column ({', '.join(YEAR_FIELDS)}); columns: "
                            f"{', '.join(names)}; name one with --year-field")
        field = domain_field.split(":")[0] if domain_field else None
        columns = _columns(item, ["item_id", title, year, field])(header)
        sequence[0] = field is not None and header[columns[3]].endswith(":token_seq")
        return columns
    if domain_values not in (None, "first", "whole"):
        raise UserError(f"--domain-values {quote(domain_values)}: expected first or whole")
    index, n_items, sequence = log[0], len(log[0]), [False]
    titles, years, values, seen = [""] * n_items, [""] * n_items, [""] * n_items, np.zeros(n_items, bool)
    stats = _file_stats(report, item)
    stats["unused"] = 0
    spaced, example = 0, ""  # --domain-field values holding spaces in a :token column (one token, several words)
    for _, (item_id, title, year, value) in _tsv(item, report, strict, pick, progress):
        i = index.get(item_id)
        if i is None:
            stats["unused"] += 1
        elif seen[i]:
            stats["duplicate_ids"] = stats.get("duplicate_ids", 0) + 1  # the first row of an id is kept
        else:
            seen[i] = True
            titles[i], years[i] = _text(title, stats), clean_text(year)
            first = domain_values == "first" or domain_values is None and sequence[0]
            values[i] = (value.split() or [""])[0] if first else clean_text(value)
            if not sequence[0] and domain_values is None and " " in value.strip():
                spaced, example = spaced + 1, example or value.strip()
    if spaced:
        raise UserError(f"{item}: --domain-field {domain_field} is typed :token, but {spaced:,} rows hold several "
                        f"words (e.g. {quote(example)}), so every combination would become its own domain; pass "
                        "--domain-values first (the first word, as for :token_seq) or --domain-values whole (each "
                        "combination a domain)")
    origin = f"recbole:{source}" + f", domains from {domain_field}" * bool(domain_field)
    if not domain_field:
        key = domain or name
        return _finish(out_dir, origin, [Domain(key, _display_name(key), "pretrain")], users, [log], [titles],
                       [(inter, item)], report, k_core, min_len, [years], title_year)
    domains, logs, titles, years = _split_domains(log, values, titles, years, domain_field, downstream,
                                                  min_domain_items, report)
    return _finish(out_dir, origin, domains, users, logs, titles, [(inter, item)] * len(domains), report, k_core,
                   min_len, years, title_year)


def _counts(**options) -> None:
    """Refuse a negative filter setting, naming the option (0 is always "off")."""
    for name, value in options.items():
        if value < 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected 0 (off) or a positive count")


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
            paths: list[tuple[Path, Path]], report: dict, k_core: int, min_len: int,
            years: list[list[str]] | None = None, all_years: bool = False) -> dict:
    """Drop untitled items and repeated (user, item) pairs, filter each domain, tell repeated titles of a domain apart
    by their `years` where given (`all_years`: append it to every title), and write the dataset."""
    dropped = report["dropped"] = {**report.get("dropped", {}),
                                   **{k: 0 for k in ("no_title_items", "no_title_interactions", "duplicates")}}
    for what in ["k_core"] * bool(k_core) + ["min_len"] * bool(min_len):
        dropped.update({f"{what}_interactions": 0, f"{what}_users": 0, f"{what}_items": 0})
    times, scale = _integer_times(np.concatenate([np.frombuffer(log[3], np.float64) for log in logs]))
    if scale != 1:
        report["timestamps"] = f"fractional: scaled by {scale} to integers" if scale else "fractional: replaced by rank"
    report["renamed_ids"] = 0
    user_ids, items, year_of, interactions, start = list(users), {}, {}, [], 0
    for di, (d, (index, us, its, _), title, (reviews, meta)) in enumerate(zip(domains, logs, titles, paths)):
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
                report["renamed_ids"] += 1
            items[ids[k]] = (d.key, title[k])
            if years and years[di][k]:
                year_of[ids[k]] = years[di][k]
        interactions += zip(map(user_ids.__getitem__, u[keep].tolist()), map(ids.__getitem__, i[keep].tolist()),
                            t[keep].tolist())
    # "Hamlet" three times in one domain: "Hamlet (1948)", "Hamlet (1990)", ... say more than "Hamlet (2)".
    repeated = Counter(items.values())
    report["titles"] = {"with_year": 0}
    for item, (key, title) in list(items.items()):
        if item in year_of and (all_years or repeated[key, title] > 1):
            items[item] = (key, f"{title} ({year_of[item]})")
            report["titles"]["with_year"] += 1
    return write_dataset(out_dir, source=source, domains=domains, items=items, interactions=interactions,
                         report=report)


# --------------------------------------------------------------------------------------------------- the command
app = typer.Typer(no_args_is_help=True, help="Write a dataset in the canonical format (data/<name>/).")


@app.command("synthetic")
def prepare_synthetic(out: Path = typer.Option(DEFAULT_DATA, help="Output dataset directory."),
                      seed: int = typer.Option(0, help="World seed: same seed, same dataset and fingerprint."),
                      users: int = typer.Option(6000, help="Number of users."),
                      overwrite: bool = typer.Option(False, help="Replace an existing dataset."),
                      progress: bool = PROGRESS):
    """Generate the built-in multi-domain world (seven pre-training domains, three downstream incl. games)."""
    from extras.world import WorldConfig, write_world
    if users < 1:
        raise UserError(f"--users {users}: expected a positive number of users")
    out = dataset_out(out, overwrite)
    report(write_world(out, WorldConfig(seed=seed, users=users), progress), out)


def amazon_command(version: int):
    def command(source: Path = typer.Argument(..., help="Directory with the downloaded review and meta files."),
                categories: str = typer.Option(..., help="Comma-separated categories, e.g. Books,Video_Games."),
                out: Path = typer.Option(..., help="Output dataset directory, e.g. data/amazon."),
                downstream: str = typer.Option("", help="Categories (or with --domain-field, domains) kept out of CPT "
                                               "(comma-separated)."),
                domain_field: Optional[str] = typer.Option(None, help="Meta field whose first value is the item's "
                                                           "domain, over all categories (2018: main_cat)."),
                min_domain_items: int = typer.Option(0, help="With --domain-field: merge domains with fewer items "
                                                     "into 'other' (0 = off)."),
                k_core: int = typer.Option(0, help="Iterative k-core filter per domain (0 = off)."),
                min_len: int = typer.Option(0, help="Drop a user's domain history shorter than this (0 = off)."),
                strict: bool = typer.Option(False, help="Stop at the first malformed line instead of counting it."),
                overwrite: bool = typer.Option(False, help="Replace an existing dataset."), progress: bool = PROGRESS):
        out = dataset_out(out, overwrite, [source])
        report(convert_amazon(version, source, split_list(categories), out, downstream=split_list(downstream),
                              domain_field=domain_field, min_domain_items=min_domain_items, k_core=k_core,
                              min_len=min_len, strict=strict, progress=progress), out)
    command.__doc__ = f"Convert Amazon Reviews {version} categories (several categories = several domains)."
    return command


app.command("amazon2023")(amazon_command(2023))
app.command("amazon2018")(amazon_command(2018))


@app.command("recbole")
def prepare_recbole(source: Path = typer.Argument(..., help="RecBole dataset folder with NAME.inter and NAME.item."),
                    out: Path = typer.Option(..., help="Output dataset directory."),
                    domain: Optional[str] = typer.Option(None, help="Domain key (default: the dataset name)."),
                    domain_field: Optional[str] = typer.Option(None, help="Item column whose first value is the "
                                                               "item's domain (e.g. class: genres as domains)."),
                    downstream: str = typer.Option("", help="Domains kept out of CPT (comma-separated; with "
                                                   "--domain-field)."),
                    min_domain_items: int = typer.Option(0, help="Merge domains with fewer items into 'other' "
                                                         "(0 = off)."),
                    domain_values: Optional[str] = typer.Option(None, help="first (the first word of the field) or "
                                                                "whole (default: first for :token_seq, whole for "
                                                                ":token columns)."),
                    title_field: Optional[str] = typer.Option(None, help="Item title column (default: auto)."),
                    year_field: Optional[str] = typer.Option(None, help="Year column telling repeated titles apart "
                                                             "(default: release_year or year if present)."),
                    title_year: bool = typer.Option(False, help="Append the year to every title: Heat (1995)."),
                    k_core: int = typer.Option(0, help="Iterative k-core filter (0 = off)."),
                    min_len: int = typer.Option(0, help="Drop users with fewer interactions (0 = off)."),
                    strict: bool = typer.Option(False, help="Stop at the first malformed line."),
                    overwrite: bool = typer.Option(False, help="Replace an existing dataset."),
                    progress: bool = PROGRESS):
    """Convert RecBole atomic files (MovieLens and RecBole's whole collection) into one domain, or one per value of
    an item column (--domain-field class: MovieLens genres)."""
    out = dataset_out(out, overwrite, [source])
    report(convert_recbole(source, out, domain=domain, domain_field=domain_field, downstream=split_list(downstream),
                           min_domain_items=min_domain_items, title_field=title_field, year_field=year_field,
                           title_year=title_year, k_core=k_core, min_len=min_len, strict=strict, progress=progress,
                           domain_values=domain_values), out)


def report(manifest: dict, out: Path) -> None:
    """The written dataset's domains as a table, its report as JSON, and the warnings a reader must not miss."""
    title = f"{out} ({manifest['fingerprint']})"
    table = Table("domain", "name", "role", "users", "items", "interactions", title=title)
    for d in manifest["domains"]:
        table.add_row(d["key"], d["name"], d["role"], f"{d['users']:,}", f"{d['items']:,}", f"{d['interactions']:,}")
    console.print(table)
    if manifest.get("report"):
        console.print_json(data=manifest["report"])
    for path, stats in manifest.get("report", {}).get("files", {}).items():
        if stats.get("malformed"):
            say(f"warning: {path}: {stats['malformed']:,} malformed lines skipped (first: "
                f"{', '.join(map(str, stats['malformed_lines']))}); expected {stats['expected']}")
        if stats.get("ended_early"):
            say(f"warning: {path}: {stats['ended_early']}")
