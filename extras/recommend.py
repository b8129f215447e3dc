"""`cprec recommend`: the trained recommender's top-K items of a domain's catalogue after a user's history, from the
same prompt and trie-constrained beam search as evaluation (eval.py), for one history or a JSONL file of many.

    rec = Recommender.load("runs/finetune-games/best", "data/world")
    for r in rec.recommend([["Title A", "Title B"]], "games", k=10)[0]:
        print(r.item_id, r.title, r.logprob, r.share)

A history of items of the target domain gets evaluation's own prompt; a history with items of other domains gets the
template's all-domain mixed prompt (each item tagged with its domain), closed by the target domain's tag, so that
what the model writes next is a target-domain title. A pre-trained (CPT) checkpoint recommends zero-shot the same way.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from rich.table import Table

import eval as evaluation
from data import TAG, Dataset, Encoder, load_dataset
from infra.cli import PRECISION, PROGRESS, console
from infra.config import DEFAULT_DATA
from infra.console import progress as progress_bar
from infra.console import say
from infra.device import DTYPES, autocast, resolve_precision
from infra.distributed import setup_distributed
from infra.files import UserError, own_output, quote, temporary_file
from infra.tokenizer import Tokenizer
from model import Decoder

BEAMS = 20  # evaluation's default width: for K <= 20 the top-K are exactly evaluation's
SHOWN_ERRORS = 5  # malformed input lines quoted in the report; the rest are only counted


@dataclass
class Recommendation:
    item_id: str
    title: str
    logprob: float  # log-likelihood of the item's text after the prompt (log-softmax summed, terminator included)
    share: float  # its probability as a fraction of the top-K's total


class Recommender:
    """A checkpoint, its tokenizer and the dataset whose catalogues it recommends from; tries are built per domain
    on first use and kept."""

    def __init__(self, model: Decoder, encoder: Encoder, ds: Dataset, *, window: int = 20, beams: int = BEAMS,
                 precision: str = "fp32"):
        self.model, self.encoder, self.ds = model.eval(), encoder, ds
        self.window, self.beams = window, beams
        self.precision = resolve_precision(precision, model.embed_tokens.weight.device)
        self._domains: dict[str, tuple[np.ndarray, dict[int, int], evaluation.Trie]] = {}
        self._titles: tuple[dict[str, list[int]], dict[str, list[int]]] | None = None
        self._items: dict[str, int] | None = None
        self._users: dict[str, int] | None = None

    @classmethod
    def load(cls, model_dir: str | Path, data_dir: str | Path, *, device: str | torch.device = "cpu",
             window: int = 20, beams: int = BEAMS, precision: str = "fp32") -> Recommender:
        device = torch.device(device)
        model = Decoder.from_pretrained(model_dir, DTYPES[resolve_precision(precision, device)], device)
        return cls(model, Encoder(Tokenizer.from_pretrained(model_dir)), load_dataset(data_dir), window=window,
                   beams=beams, precision=precision)

    # ------------------------------------------------------------------ histories
    def find(self, title: str, key: str) -> int:
        """The dataset item called `title`: the exact title, else the same title ignoring case. An item of domain
        `key` wins over other domains' items of that title, then the dataset's order (domains, then ids) decides."""
        if self._titles is None:
            exact: dict[str, list[int]] = {}
            folded: dict[str, list[int]] = {}
            for i, t in enumerate(self.ds.titles):
                exact.setdefault(t, []).append(i)
                folded.setdefault(t.casefold(), []).append(i)
            self._titles = (exact, folded)
        target = self.ds.domain_index(key)
        for index, text in zip(self._titles, (title, title.casefold())):
            if index.get(text):
                return min(index[text], key=lambda i: (self.ds.item_domain[i] != target, i))
        close = difflib.get_close_matches(title.casefold(), list(self._titles[1]), n=3, cutoff=0.5)
        shown = ", ".join(quote(self.ds.titles[self._titles[1][c][0]]) for c in close) or "none near it"
        raise UserError(f"title {quote(title)} is not in {self.ds.path}; closest: {shown}")

    def item(self, item_id: str) -> int:
        if self._items is None:
            self._items = {item: i for i, item in enumerate(self.ds.item_ids)}
        if item_id not in self._items:
            raise UserError(f"item id {quote(item_id)} is not in {self.ds.path}")
        return self._items[item_id]

    def user_history(self, user_id: str, key: str) -> np.ndarray:
        """All of a dataset user's items in domain `key` (every split), oldest first; a user with none there gets
        all of their items (a mixed prompt). The window is applied when the prompt is made."""
        if self._users is None:
            self._users = {u: k for k, u in enumerate(self.ds.user_ids)}
        if user_id not in self._users:
            raise UserError(f"user {quote(user_id)} is not in {self.ds.path}")
        u = self._users[user_id]
        items = self.ds.item[self.ds.user_start[u]:self.ds.user_start[u + 1]]
        in_domain = items[self.ds.item_domain[items] == self.ds.domain_index(key)]
        return in_domain if len(in_domain) else items

    def prompt(self, history, key: str) -> tuple[list[int], str]:
        """The prompt's token ids for the last `window` items of `history` (dataset item indices), and its kind."""
        history = np.asarray(history, np.int64)
        history = history[-self.window:] if self.window else history[:0]  # window 0 = no history, as in eval_cases
        if (self.ds.item_domain[history] == self.ds.domain_index(key)).all():
            return evaluation.user_prompts(self.encoder, self.ds, [history], key)[0], "domain"
        tag = self.encoder(TAG.format(name=self.ds.domain(key).name))
        return self.encoder.sequence(self.ds, history, None)[0] + tag, "mixed"

    # ------------------------------------------------------------------ ranking
    def catalogue(self, key: str) -> tuple[np.ndarray, dict[int, int], evaluation.Trie]:
        """Domain `key`'s items, each item's catalogue position, and the trie of their texts, as evaluation has them."""
        if key not in self._domains:
            catalogue = self.ds.catalogue(key)
            trie = evaluation.build_trie(evaluation.catalogue_tokens(self.encoder, self.ds, key),
                                         self.model.embed_tokens.weight.device)
            self._domains[key] = (catalogue, {int(item): p for p, item in enumerate(catalogue)}, trie)
        return self._domains[key]

    def recommend(self, histories: list[list[str]], domain: str, k: int = 10,
                  exclude_history: bool = False) -> list[list[Recommendation]]:
        """The top-`k` items of `domain` after each history of titles (oldest first; any domain's titles)."""
        return self.recommend_items([[self.find(t, domain) for t in h] for h in histories], domain, k,
                                    exclude_history)

    @torch.no_grad()
    def recommend_items(self, histories: list, domain: str, k: int = 10,
                        exclude_history: bool = False) -> list[list[Recommendation]]:
        """The top-`k` items of `domain` after each history of dataset item indices, best first. Beam search keeps
        max(k, beams) beams; `exclude_history` drops the domain's items that appear anywhere in the history."""
        if k < 1:
            raise UserError(f"k = {k}: expected at least 1")
        catalogue, position, trie = self.catalogue(domain)
        beams = min(max(k, self.beams), len(catalogue))  # at the catalogue's size the search is exhaustive
        prompts = [self.prompt(h, domain)[0] for h in histories]
        exclude = [[position[int(i)] for i in h if int(i) in position] if exclude_history else [] for h in histories]
        out: list[list[Recommendation]] = [[] for _ in histories]
        if not histories:
            return out
        order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a batch: less padding
        device = self.model.embed_tokens.weight.device
        step = evaluation.auto_batch_users(self.model, beams, max(map(len, prompts)), trie.depth)
        with autocast(self.precision, device):
            for start in range(0, len(order), step):
                rows = order[start:start + step]
                items, scores = evaluation.beam_search(self.model, [prompts[r] for r in rows], trie, beams,
                                                       self.encoder.tokenizer.pad_id, [exclude[r] for r in rows])
                for r, it, sc in zip(rows, items.cpu().numpy(), scores.cpu().numpy()):
                    found = (it >= 0) & np.isfinite(sc)  # beam_search may pad with an excluded item at -inf
                    out[r] = self.ranked(catalogue, it[found][:k], sc[found][:k])
        return out

    def ranked(self, catalogue: np.ndarray, positions: np.ndarray, logprobs: np.ndarray) -> list[Recommendation]:
        """Catalogue positions as recommendations, each with its share of the list's probability (a softmax)."""
        if not len(positions):
            return []
        logprobs = logprobs.astype(np.float64)
        share = np.exp(logprobs - logprobs.max())  # shifted first: scores of -60 would underflow to 0/0
        share /= share.sum()
        return [Recommendation(self.ds.item_ids[catalogue[p]], self.ds.titles[catalogue[p]], float(lp), float(s))
                for p, lp, s in zip(positions, logprobs, share)]


# --------------------------------------------------------------------------------------------------- files
def parse_request(rec: Recommender, line: str, key: str) -> tuple[object, list[int]]:
    """One input line, {"id": ..., "titles": [...]} or {"id": ..., "items": [...]}, as (id, history); a ValueError
    or UserError says what is wrong with it."""
    record = json.loads(line)
    if not isinstance(record, dict) or "id" not in record:
        raise ValueError('expected a JSON object with an "id"')
    if not (isinstance(record["id"], str) or type(record["id"]) is int):  # written back as it came: valid JSON
        raise ValueError('"id" must be a string or an integer')
    fields = [f for f in ("titles", "items") if f in record]
    if len(fields) != 1:
        raise ValueError('expected exactly one of "titles" (item titles) or "items" (item ids)')
    values = record[fields[0]]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f'"{fields[0]}" must be a list of strings')
    if fields[0] == "titles":
        return record["id"], [rec.find(t, key) for t in values]
    return record["id"], [rec.item(i) for i in values]


def recommendation_file(path: Path) -> str | None:
    """None for an earlier output of recommend_file (which --overwrite may replace), else why it is not one: its
    first line must be {"id", "recommendations"}, so an input, a dataset's items.jsonl or a stranger's file is safe."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return "not JSONL"
    ours = isinstance(first, dict) and set(first) == {"id", "recommendations"}
    return None if ours else 'its first line is not {"id", "recommendations"}'


def recommend_file(rec: Recommender, source: Path, target: Path, key: str, k: int = 10,
                   exclude_history: bool = False, batch: int = 256, progress: bool = False) -> dict:
    """Recommendations for every line of `source` (JSONL), written to `target` in input order, one object per line:
    {"id", "recommendations": [{"item_id", "title", "logprob", "share"}, ...]}. Histories are ranked `batch` at a
    time; malformed lines are counted and the first few quoted. `target` appears complete or not at all."""
    try:
        with open(source, encoding="utf-8-sig") as f:
            total = sum(1 for line in f if line.strip())
    except FileNotFoundError:
        raise UserError(f"{source}: file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not UTF-8 text ({e})") from None
    stats = {"lines": total, "users": 0, "malformed": 0, "first_malformed": []}
    tmp = temporary_file(target)
    pending: list[tuple[object, list[int]]] = []

    def flush(out, advance):
        ranked = rec.recommend_items([h for _, h in pending], key, k, exclude_history)
        for (user, _), recs in zip(pending, ranked):
            out.write(json.dumps({"id": user, "recommendations": [asdict(r) for r in recs]}, ensure_ascii=False,
                                 allow_nan=False)
                      + "\n")
        advance(len(pending))
        stats["users"] += len(pending)
        pending.clear()

    try:
        with progress_bar(total, "recommend users", progress) as advance, open(source, encoding="utf-8-sig") as f, \
                open(tmp, "w", encoding="utf-8") as out:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    pending.append(parse_request(rec, line, key))
                except (ValueError, UserError) as e:  # json.JSONDecodeError is a ValueError
                    stats["malformed"] += 1
                    advance(1)
                    if len(stats["first_malformed"]) < SHOWN_ERRORS:
                        stats["first_malformed"].append(f"{source}:{n}: {e}")
                if len(pending) == batch:
                    flush(out, advance)
            if pending:
                flush(out, advance)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


# --------------------------------------------------------------------------------------------------- the command
def command(model: Path = typer.Option(..., help="Checkpoint: fine-tuned, or CPT for zero-shot."),
            domain: str = typer.Option(..., help="Domain whose catalogue is recommended from."),
            data: Path = typer.Option(DEFAULT_DATA, help="Dataset (its titles, users and catalogues)."),
            history: Optional[list[str]] = typer.Option(None, help="A title in the user's history, oldest first; "
                                                        "repeat the option. Any domain's titles."),
            user: Optional[str] = typer.Option(None, help="Use this dataset user's history instead."),
            k: int = typer.Option(10, "--k", "-k", help="Items to recommend."),
            exclude_history: bool = typer.Option(False, help="Never recommend an item of the history."),
            window: int = typer.Option(20, help="History items in a prompt (the last ones)."),
            beams: int = typer.Option(20, help="Beam width; max(k, beams) is used."),
            input_file: Optional[Path] = typer.Option(None, "--input", help='JSONL of histories: {"id": ..., "titles" '
                                                      'or "items" (ids): [...]} a line.'),
            output_file: Optional[Path] = typer.Option(None, "--output", help="JSONL of recommendations (with "
                                                       "--input)."),
            batch_size: int = typer.Option(256, help="Histories read and ranked at a time (--input)."),
            overwrite: bool = typer.Option(False, help="Replace an existing --output."),
            json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
            precision: str = PRECISION, progress: bool = PROGRESS):
    """Recommend the top-K items of a domain after a history of titles, a dataset user's history, or each history
    of a JSONL file, by the same prompt and trie-constrained beam search as evaluation."""
    if (input_file is None) != (output_file is None):
        raise UserError("--input and --output go together: histories in, recommendations out")
    if input_file is not None and (history or user):
        raise UserError("--input replaces --history and --user; give one of them")
    if history and user is not None:
        raise UserError("--history and --user: give one (a history of titles, or a dataset user's)")
    if input_file is None and not history and user is None:
        raise UserError("give the history: --history TITLE (repeatable), --user ID, or --input FILE --output FILE")
    if output_file is not None:
        output_file = own_output(output_file, what="recommendation file", overwrite=overwrite, file=True,
                                 check=recommendation_file, inputs=[input_file, data, model],
                                 option="--output")
        if not input_file.is_file():
            raise UserError(f"--input {input_file}: {'is a directory' if input_file.is_dir() else 'file not found'}; "
                            "expected a JSONL file of histories")
    for option, value in (("--k", k), ("--batch-size", batch_size), ("--beams", beams)):
        if value < 1:
            raise UserError(f"{option} {value}: expected at least 1")
    if window < 0:
        raise UserError(f"--window {window}: expected 0 (no history) or a positive number of history items")
    _, _, device = setup_distributed()
    ds = load_dataset(data)
    ds.domain(domain)
    net = Decoder.from_pretrained(model, DTYPES[resolve_precision(precision, device)], device)  # the compute dtype
    rec = Recommender(net, Encoder(Tokenizer.from_pretrained(model)), ds, window=window, beams=beams,
                      precision=precision)
    if input_file is not None:
        output_file.parent.mkdir(parents=True, exist_ok=True)
        stats = recommend_file(rec, input_file, output_file, domain, k, exclude_history, batch_size, progress)
        say(f"wrote {stats['users']:,} users' top {k} to {output_file}")
        if stats["malformed"]:
            more = stats["malformed"] - len(stats["first_malformed"])
            say(f"[yellow]skipped {stats['malformed']:,} malformed line(s) of {stats['lines']:,}: "
                + "; ".join(stats["first_malformed"]) + (f"; and {more:,} more" if more else ""))
        return
    items = rec.user_history(user, domain) if user is not None else [rec.find(t, domain) for t in history]
    kind = rec.prompt(items, domain)[1]
    top = rec.recommend_items([items], domain, k, exclude_history)[0]
    shown = items[-window:] if window else items[:0]
    if json_output:
        print(json.dumps({"domain": domain, "model": str(model), "prompt": kind, "beams": max(k, beams),
                          "history": [{"item_id": ds.item_ids[i], "title": ds.titles[i],
                                       "domain": list(ds.domains)[ds.item_domain[i]]} for i in shown],
                          "recommendations": [{"rank": r + 1, **asdict(x)} for r, x in enumerate(top)]},
                         ensure_ascii=False, indent=2))
        return
    if len(top) < k:
        size = len(rec.catalogue(domain)[0])
        say(f"[yellow]only {len(top)} of the {k} asked: " + (f"{domain}'s catalogue has {size:,} items" if size <= k
                                                             else f"the rest of {domain}'s catalogue is in the "
                                                             "history"))
    table = Table("#", "item", "title", "log-prob", "share", title=f"top {len(top)} of {ds.domain(domain).name}")
    for r, x in enumerate(top, 1):
        table.add_row(str(r), x.item_id, x.title, f"{x.logprob:.3f}", f"{x.share:.1%}")
    console.print(table)
    console.print(f"after {len(shown)} history items ({kind} prompt: "
                  + ("the domain's, as in evaluation" if kind == "domain" else "items of other domains, tagged")
                  + f"); trie-constrained beam search, {max(k, beams)} beams over all {len(rec.catalogue(domain)[0]):,}"
                  f" items; history {'excluded' if exclude_history else 'not excluded'}", highlight=False,
                  soft_wrap=True)
