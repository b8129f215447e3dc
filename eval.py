"""Full-ranking evaluation: every item of the target domain is a candidate; the model recommends by generating the
next item's text after the user's history.

Two rankers share one scoring rule, the sum of the model's log-probabilities (log-softmax over the whole vocabulary,
not renormalised) over the item's tokens, terminator included:
  - beam search constrained by a trie of all item texts: the top-B items. `plain_beam_search` is the algorithm, one
    prompt at a time; `beam_search`, batched over users and beams with a KV cache, is the engine evaluation runs, an
    optimisation the tests prove equal to it;
  - exact scoring of every item for every user: the full ranking, which the beam search is also tested against.
What the trie buys is measured by `free_search` (`evaluate --unconstrained`): the same beams and scores with every
token allowed, its titles matched to the catalogue. Every result reports the share of top-K entries that are
catalogue items (`valid`); the trie makes it 100%.
Metrics, as RecBole and the peers define them: for 0-based rank r, Recall@K = [r < K], NDCG@K = [r < K] / log2(r + 2),
MRR = 1/(r+1); ties count against the target.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from data import Case, Dataset, Encoder, eval_cases, item_text, pad, sample, train_sequences
from infra.beyond import beyond_accuracy
from infra.console import progress as progress_bar
from infra.console import warn
from infra.device import auto_batch_users
from infra.distributed import deal, gather_rows, least, process
from infra.files import UserError, quote
from infra.tokenizer import Tokenizer
from model import Decoder, KVCache

KS = (5, 10, 20)


# --------------------------------------------------------------------------------------------------- trie
@dataclass
class Trie:
    """A prefix tree of item token sequences in CSR form: node n's edges are offsets[n]:offsets[n+1].

    The last node is a sink with no children and no item: padding and dead beams point there, never at the root,
    whose fan-out (about the vocabulary) would otherwise widen every step."""
    offsets: torch.Tensor  # (nodes + 1,)
    tokens: torch.Tensor  # (edges,) the token on each edge, sorted within a node
    child: torch.Tensor  # (edges,) the node each edge leads to
    item: torch.Tensor  # (nodes,) the item ending at a node (a leaf), else -1
    depth: int

    @property
    def sink(self) -> int:
        return len(self.item) - 1

    def children(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, child nodes) of each node, padded to the widest with token -1 and the sink."""
        start, count = self.offsets[nodes], self.offsets[nodes + 1] - self.offsets[nodes]
        width = max(int(count.max()), 1)
        edge = start[..., None] + torch.arange(width, device=nodes.device)
        valid = torch.arange(width, device=nodes.device) < count[..., None]
        edge = torch.where(valid, edge, 0).clamp(max=len(self.tokens) - 1)
        return torch.where(valid, self.tokens[edge], -1), torch.where(valid, self.child[edge], self.sink)


def build_trie(sequences: list[list[int]], device: torch.device | str = "cpu") -> Trie:
    """Item k's tokens lead from the root to a leaf holding k; items may share prefixes but none may be another's
    prefix (the template's terminator after every item guarantees it for distinct texts).

    Built depth by depth over the items in lexicographic order, with numpy: the items sharing a prefix are then
    consecutive, so a node is where a prefix first appears and its children are consecutive and sorted by token
    (nodes numbered breadth-first). A million items of 40 tokens take a few hundred MB, not tens of GB of dicts."""
    lengths = np.array([len(x) for x in sequences], np.int64)
    order = np.lexsort(pad(sequences, -1).T[::-1])  # -1 after an item's end: a prefix sorts before its extensions
    grid, lengths = pad(sequences, -1)[order], lengths[order]
    node, leaf = np.zeros(len(order), np.int64), np.full(len(order), -1)
    fresh = np.zeros(len(order), bool)  # the prefix so far differs from the previous row's
    parents, tokens, children, nodes = [], [], [], 1
    for d in range(int(lengths.max())):
        alive = lengths > d
        fresh |= np.r_[True, grid[1:, d] != grid[:-1, d]]
        first = alive & fresh  # where a node of depth d + 1 begins
        ids = nodes - 1 + np.cumsum(first)
        parents.append(node[first]), tokens.append(grid[first, d]), children.append(ids[first])
        node = np.where(alive, ids, node)
        leaf = np.where(lengths == d + 1, ids, leaf)
        nodes += int(first.sum())
    parents, tokens, children = (np.concatenate(x) for x in (parents, tokens, children))
    inner = np.zeros(nodes + 1, bool)
    inner[parents] = True
    clash = inner[leaf] | np.r_[leaf[1:] == leaf[:-1], False]  # a prefix of the next item, or equal to it
    if clash.any():
        k = int(np.flatnonzero(clash)[0])
        raise UserError(f"item {order[k]}'s tokens are a prefix of (or equal to) item {order[k + 1]}'s; item texts "
                        "must be unique after tokenization")
    item = np.full(nodes + 1, -1)  # the last node is the sink
    item[leaf] = order
    offsets = np.searchsorted(parents, np.arange(nodes + 2))
    as_tensor = lambda values: torch.as_tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Trie(as_tensor(offsets), as_tensor(tokens), as_tensor(children), as_tensor(item), int(lengths.max()))


# --------------------------------------------------------------------------------------------------- beam search
@torch.no_grad()
def plain_beam_search(model: Decoder, prompt: list[int], trie: Trie, beams: int,
                      exclude=()) -> tuple[list[int], list[float]]:
    """The top-`beams` items after one prompt and their scores, best first: trie-constrained beam search as plainly as
    it goes. The batched engine below (`beam_search`) is an optimisation of it; the tests prove them equal.

    A beam is an open prefix of item texts: its tokens, its trie node and its score, the sum of its tokens' log-
    probabilities. Each step runs the model on prompt + prefix for every beam, extends the beam by every token the trie
    allows next, and keeps the `beams` best extensions. An extension that reaches a leaf has written a whole item (its
    terminator included): it leaves the beams for the pool of finished items, unless excluded (history masking)."""
    device = model.embed_tokens.weight.device
    live, pool = [([], 0, 0.0)], []  # one beam at the root (node 0): the empty prefix
    while live:
        extensions = []
        for tokens, node, score in live:
            logits = model(torch.tensor([prompt + tokens], device=device))[0, -1]  # no cache: the whole text again
            logp = torch.log_softmax(logits.float(), -1)  # over the whole vocabulary, as exact scoring
            for edge in range(int(trie.offsets[node]), int(trie.offsets[node + 1])):  # the node's children
                token = int(trie.tokens[edge])
                extensions.append((tokens + [token], int(trie.child[edge]), score + float(logp[token])))
        finished = [(int(trie.item[node]), score) for _, node, score in extensions if trie.item[node] >= 0]
        pool += [(item, score) for item, score in finished if item not in exclude]
        live = sorted([e for e in extensions if trie.item[e[1]] < 0], key=lambda e: -e[2])[:beams]
    pool = sorted(pool, key=lambda p: -p[1])[:beams]
    return [item for item, _ in pool], [score for _, score in pool]


# --------------------------------------------------------------------------------------------------- the engine
# beam_search is plain_beam_search for many prompts at once. The prompts run once, together, into a KV cache; every
# live beam of every user is then one row of one batched decoding step, reading its prompt's keys in place (BeamCache).
# Beams that can no longer reach a user's top items are pruned, and users whose beams are all gone leave the batch.
class PromptCache(KVCache):
    """The cache of the prompt pass before decoding. Only the last position's next-token distribution is needed, so
    the last layer hands on that position only: its output projection and MLP skip the others. Attention still runs
    at every position, as in a full pass: the cache needs every key, and the same kernel gives the same numbers."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        y = super().attend(layer, q, k, v, mask)
        return y[:, :, -1:] if layer == len(self.k) - 1 else y


def prompt_cache(model: Decoder, prompts: list[list[int]], pad_id: int) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts through the model; return their cache and next-token log-probabilities (U, V).

    The cost is the tokens run, so none runs twice or for nothing. The template's header, which opens every prompt,
    runs once and its keys are copied to every row. The rest runs in groups of similar length (a group's padding
    under a quarter of its tokens). Each row of the cache reads [shared prefix | left padding | own tokens]: attention
    skips the padding by the cache's `valid` mask, and positions go on from the prefix as in the prompt's own pass."""
    c, device, dtype = model.config, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    shared = 0
    while len(prompts) > 1 and all(len(p) > shared + 1 and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1  # the longest common prefix that leaves every prompt a token of its own
    rest = [p[shared:] for p in prompts]
    width = max(map(len, rest))
    cache = KVCache(c, len(prompts), shared + width, dtype, device)
    cache.valid[:, :shared], cache.length = True, shared + width
    head = PromptCache(c, 1, shared, dtype, device)
    if shared:
        model(torch.tensor([prompts[0][:shared]], device=device), kv_cache=head, hidden=True)
        cache.k[:, :, :, :shared], cache.v[:, :, :, :shared] = head.k, head.v
    groups, hidden = [[]], []
    for row in sorted(range(len(rest)), key=lambda r: len(rest[r])):  # cut before padding passes 1/4 of the tokens
        if len(rest[row]) * (len(groups[-1]) + 1) > 1.25 * sum(len(rest[r]) for r in groups[-1] + [row]):
            groups.append([])
        groups[-1].append(row)
    for rows in groups:
        ids = torch.as_tensor(pad([rest[r] for r in rows], pad_id, left=True), device=device)
        mask = torch.as_tensor(pad([[1] * len(rest[r]) for r in rows], 0, left=True), device=device)
        part = PromptCache(c, len(rows), shared + ids.shape[1], dtype, device)
        part.k[:, :, :, :shared], part.v[:, :, :, :shared] = head.k, head.v
        part.valid[:, :shared], part.length, part.next_pos[:] = True, shared, shared
        hidden.append(model(ids, shared + (mask.cumsum(-1) - 1).clamp(min=0), mask, part, hidden=True)[:, -1])
        at = torch.as_tensor(rows, device=device)
        for whole, own in ((cache.k, part.k), (cache.v, part.v)):
            whole[:, at, :, cache.length - ids.shape[1]:] = own[:, :, :, shared:]
        cache.valid[at, cache.length - ids.shape[1]:], cache.next_pos[at] = part.valid[:, shared:], part.next_pos
    order = torch.as_tensor([r for rows in groups for r in rows], device=device)
    hidden = torch.cat(hidden)[torch.argsort(order)]
    return cache, torch.log_softmax(model.lm_head(hidden).float(), -1)


class BeamCache:
    """Many continuations of a few prompts decoded together: beam search's live beams, or exact scoring's items.

    The prompts' keys stay in their KVCache, once per prompt; only each continuation's own keys (one per token it has
    decoded) live here. Attention takes one softmax over both parts, so following beams copies a few slots per beam
    and never a prompt. Row r continues prompt `owner[r]`; rows may come and go each step (beams pruned, users done).
    A user's rows meet its prompt's keys in one matmul through a (prompts, width) grid, width = most rows of a prompt.
    """

    def __init__(self, prompt: KVCache, owner: torch.Tensor | int, steps: int = 0):
        """`owner`: each row's prompt, or a count of rows per prompt, in prompt order; `steps`: slots reserved."""
        layers, users, heads, _, dim = prompt.k.shape
        if isinstance(owner, int):
            owner = torch.arange(users, device=prompt.k.device).repeat_interleave(owner)
        self.prompt, self.owner, self.length = prompt, owner, 0
        self.k = prompt.k.new_zeros(layers, len(owner), heads, steps, dim)
        self.v = torch.zeros_like(self.k)
        self.next_pos = prompt.next_pos[owner]
        self._place()

    def _place(self):
        """Each row's slot in the (prompts, width) grid; None when the rows already are that grid, in order. And
        whether any prompt is left-padded (else attention need not mask the prompts' keys)."""
        self.padded = not bool(self.prompt.valid[:, :self.prompt.length].all())
        users, rows = self.prompt.k.shape[1], len(self.owner)
        counts = torch.bincount(self.owner, minlength=users)
        self.width = int(counts.max()) if rows else 0
        order = torch.argsort(self.owner, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(rows, device=order.device) - (counts.cumsum(0) - counts)[self.owner[order]]
        self.slot = self.owner * self.width + rank
        if rows == users * self.width and bool((self.slot == torch.arange(rows, device=order.device)).all()):
            self.slot = None

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot is None:
            return x
        grid = x.new_zeros(self.prompt.k.shape[1] * self.width, *x.shape[1:])
        return grid.index_copy_(0, self.slot, x)

    def from_grid(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.slot is None else x.index_select(0, self.slot)

    def extend(self, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Claim T slots in every row; return the (T, length) causal mask over this row's own keys."""
        T = attention_mask.shape[1]
        start, self.length = self.length, self.length + T
        if self.length > self.k.shape[3]:  # more slots than reserved: grow, keeping the filled ones
            grow = (0, 0, 0, self.length - self.k.shape[3])
            self.k, self.v = torch.nn.functional.pad(self.k, grow), torch.nn.functional.pad(self.v, grow)
        self.next_pos = position_ids[:, -1] + 1  # continuations are right-padded at most: positions just go on
        slots = torch.arange(self.length, device=self.k.device)
        return slots <= start + torch.arange(T, device=self.k.device)[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: torch.Tensor):
        rows, n_q, T, dim = q.shape
        users, width, n_kv = self.prompt.k.shape[1], self.width, k.shape[1]
        group, prompt_len = n_q // n_kv, self.prompt.length  # query head h reads key head h // group (GQA)
        self.k[layer, :, :, self.length - T:self.length] = k
        self.v[layer, :, :, self.length - T:self.length] = v
        by_user = lambda x: x.view(users, width, n_kv, -1, x.shape[-1]).transpose(1, 2).reshape(  # noqa: E731
            users, n_kv, -1, x.shape[-1])
        by_row = lambda x: self.from_grid(x.view(users, n_kv, width, -1, x.shape[-1]).transpose(1, 2).reshape(  # noqa: E731
            users * width, n_kv, -1, x.shape[-1]))
        q = q.reshape(rows, n_kv, group * T, dim)
        prompt_k, prompt_v = self.prompt.k[layer, :, :, :prompt_len], self.prompt.v[layer, :, :, :prompt_len]
        # A user's continuations are extra queries against its prompt's keys; each row's own keys are per row.
        to_prompt = (by_user(self.to_grid(q)) @ prompt_k.transpose(-1, -2)).float()
        if self.padded:  # left padding of shorter prompts
            to_prompt.masked_fill_(~self.prompt.valid[:, None, None, :prompt_len], -torch.inf)
        to_own = (q @ self.k[layer, :, :, :self.length].transpose(-1, -2)).float()
        if T > 1:  # one new token sees all its row's keys; several see them causally
            to_own.masked_fill_(~causal.repeat(group, 1), -torch.inf)
        probs = torch.softmax(torch.cat([by_row(to_prompt), to_own], -1) * dim ** -0.5, -1).to(v.dtype)
        from_prompt, from_own = probs.split([prompt_len, self.length], -1)
        y = by_row(by_user(self.to_grid(from_prompt)) @ prompt_v) + from_own @ self.v[layer, :, :, :self.length]
        return y.reshape(rows, n_q, T, dim)

    def select(self, rows: torch.Tensor) -> BeamCache:
        """A cache of the given rows (repeats allowed), each under its own prompt, with room for one more token. Only
        filled slots are copied. Once at most half of the prompts still own a row, the others are dropped."""
        out = copy.copy(self)
        out.owner, out.next_pos = self.owner[rows], self.next_pos[rows]
        layers, _, heads, _, dim = self.k.shape
        out.k, out.v = (x.new_empty(layers, len(rows), heads, self.length + 1, dim) for x in (self.k, self.v))
        for new, old in ((out.k, self.k), (out.v, self.v)):  # gathered straight into place: one pass, no temporary
            torch.index_select(old[:, :, :, :self.length], 1, rows, out=new[:, :, :, :self.length])
        kept = torch.unique(out.owner)
        if 2 * len(kept) <= self.prompt.k.shape[1]:
            out.prompt = copy.copy(self.prompt)
            p = out.prompt
            p.k, p.v, p.valid, p.next_pos = p.k[:, kept], p.v[:, kept], p.valid[kept], p.next_pos[kept]
            out.owner = torch.searchsorted(kept, out.owner)
        out._place()
        return out


@torch.no_grad()
def beam_search(model: Decoder, prompts: list[list[int]], trie: Trie, beams: int, pad_id: int,
                exclude: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """plain_beam_search for every prompt at once: the top-`beams` items (U, B) and their scores, best first (-1 /
    -inf where fewer exist). Pruning changes nothing: log-probabilities only fall, so an open prefix that scores no
    better than the pool's worst item can never enter the pool; a user whose prefixes are all dropped is done.

    One change: a user whose excluded items took the place of others may end with fewer than `beams` items while the
    catalogue holds more. Such users are searched again keeping twice as many prefixes until their list is full (at
    the catalogue's size the search is exhaustive), so a short list means the catalogue has no more allowed items."""
    items, scores = search(model, prompts, trie, beams, pad_id, exclude, beams)
    catalogue = int((trie.item >= 0).sum())
    allowed = [catalogue - len(set(ex)) for ex in exclude or [[]] * len(prompts)]
    keep = beams
    while keep < catalogue and (short := [u for u in range(len(prompts))
                                          if int((items[u] >= 0).sum()) < min(beams, allowed[u])]):
        keep = min(2 * keep, catalogue)
        again = search(model, [prompts[u] for u in short], trie, beams, pad_id,
                       [exclude[u] for u in short] if exclude else None, keep)
        items[short], scores[short] = again
    return items, scores


def search(model: Decoder, prompts: list[list[int]], trie: Trie, beams: int, pad_id: int,
           exclude: list[list[int]] | None, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """beam_search's one pass: the top-`beams` finished items of each prompt, keeping `keep` open prefixes."""
    device, U = model.embed_tokens.weight.device, len(prompts)
    prompt, logp = prompt_cache(model, prompts, pad_id)  # each user's one open prefix, the empty one
    banned = torch.full((U, max(1, max(map(len, exclude or [[]])))), -2, dtype=torch.long, device=device)  # -2: none
    for row, items in enumerate(exclude or []):
        banned[row, :len(items)] = torch.as_tensor(items, dtype=torch.long)
    pool_item = torch.full((U, beams), -1, dtype=torch.long, device=device)  # the finished items, best first
    pool_score = torch.full((U, beams), -torch.inf, device=device)
    # One row per live prefix, grouped by user, best first: its user, trie node and score.
    user = torch.arange(U, device=device)
    node = torch.zeros(U, dtype=torch.long, device=device)
    score = torch.zeros(U, device=device)
    cache = BeamCache(prompt, user, 0)
    for _ in range(trie.depth):
        tokens, child = trie.children(node)  # (R, F): each live row's allowed next tokens, padded with -1
        fan = tokens.shape[1]
        cand = score[:, None] + logp.gather(1, tokens.clamp(min=0)).masked_fill(tokens < 0, -torch.inf)
        # Each user's candidates in a row of a (users, width·fan) grid, in beam then token order.
        active, first, counts = torch.unique_consecutive(user, return_inverse=True, return_counts=True)
        width = int(counts.max())
        rank = torch.arange(len(user), device=device) - (counts.cumsum(0) - counts)[first]
        columns = max(width * fan, keep)  # at least `keep` candidates per user
        at = (first * columns + rank * fan)[:, None] + torch.arange(fan, device=device)
        cand, tokens, child = (torch.full((len(active) * columns,), fill, dtype=x.dtype, device=device).index_copy_(
            0, at.flatten(), x.flatten()).view(len(active), columns)
            for x, fill in ((cand, -torch.inf), (tokens, -1), (child, trie.sink)))
        item = trie.item[child]  # the candidates that complete an item join the pool, unless banned
        finished = (item >= 0) & ~(item[..., None] == banned[active][:, None, :]).any(-1)
        merged = torch.cat([pool_score[active], cand.masked_fill(~finished, -torch.inf)], 1).topk(beams, dim=1)
        pool_score[active] = merged.values
        # An excluded item never enters the pool, not even as a -inf filler when fewer than `beams` items finished.
        pool_item[active] = torch.cat([pool_item[active], item.masked_fill(~finished, -1)], 1).gather(1, merged.indices)
        top, pick = cand.masked_fill(item >= 0, -torch.inf).topk(keep, dim=1)  # the `keep` best open prefixes
        live = top > pool_score[active][:, -1:]  # a prefix of each user's best-first beams
        if not live.any():
            break
        a, j = live.nonzero(as_tuple=True)  # grouped by user, best first
        pick = pick[a, j]  # column in the user's grid row: beam pick // fan, token pick % fan
        parent = torch.full((len(active) * width,), -1, dtype=torch.long, device=device).index_copy_(
            0, first * width + rank, torch.arange(len(user), device=device))[a * width + pick // fan]
        user, node, score = active[a], child[a, pick], top[a, j]
        cache = cache.select(parent)  # each new row's cache is its parent beam's
        hidden = model(tokens[a, pick][:, None], kv_cache=cache, hidden=True)[:, -1]
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
    return pool_item, pool_score


# --------------------------------------------------------------------------------------------------- without the trie
# `evaluate --unconstrained`: the same beams and scores with every token allowed next, to measure what the trie buys.
# A beam ends at a token whose text holds the template's terminator (a tokenizer may merge it with what comes before,
# as byte-level BPE's ".\n") or at EOS; its title, the decoded text before the terminator, is matched to the catalogue
# exactly; a title that is none is INVALID. Beams that write the same title count once, with the best score.
INVALID = -2
MARGIN = 8  # a beam still open this many tokens past the longest item ends there
FREE_RANKER = ("beam search without the trie, {beams} beams, each ending at the terminator or {margin} tokens past the "
               "longest item; titles matched to the catalogue exactly, one that is no item a miss in 'model', dropped "
               "in 'model_valid_only'")


def ending_tokens(tokenizer: Tokenizer, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's group of ending tokens, by its text before the terminator (-1: it ends nothing; -2: past the
    tokenizer's ids, never written), and a token of each group: within one beam a group's tokens write one title."""
    group, heads, stop = torch.full((vocab,), -2), {}, item_text("")
    for v in range(min(vocab, tokenizer.vocab_size)):
        text = tokenizer.decode([v])
        group[v] = heads.setdefault(text.split(stop)[0], v) if stop in text or v == tokenizer.eos_id else -1
    first = torch.tensor(list(heads.values()), dtype=torch.long)  # each group's first token, ascending
    return torch.where(group >= 0, torch.searchsorted(first, group), group), first


@torch.no_grad()
def free_search(model: Decoder, prompts: list[list[int]], beams: int, pad_id: int, tokenizer: Tokenizer,
                items: list[list[int]], longest: int, exclude: list[list[int]] | None = None):
    """beam_search without the trie: each prompt's top-`beams` distinct titles (U, B) as positions in `items` (known by
    their decoded titles; INVALID if none; -1 / -inf where fewer exist) and their scores, best first. A beam open after
    `longest` tokens ends there, its text the title. Items in `exclude` never enter a list."""
    device, U = model.embed_tokens.weight.device, len(prompts)
    titles = {tokenizer.decode(t).split(item_text(""))[0]: k for k, t in reversed(list(enumerate(items)))}
    group, first = (x.to(device) for x in ending_tokens(tokenizer, model.config.vocab_size))
    ends, banned = group >= 0, [set(ex) for ex in exclude or [[]] * U]
    prompt, logp = prompt_cache(model, prompts, pad_id)
    user, score = torch.arange(U, device=device), torch.zeros(U, device=device)
    written, cache = torch.zeros(U, 0, dtype=torch.long, device=device), BeamCache(prompt, user, 0)
    pools, floor = [{} for _ in prompts], [-torch.inf] * U  # each user's titles; its `beams`-th best score

    def offer(owner: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Finished beams join their user's titles, best first, until it took `beams` distinct ones this step."""
        keep = scores > torch.tensor(floor, device=device)[owner]
        order = scores[keep].argsort(descending=True, stable=True)
        taken = [set() for _ in prompts]
        for u, text, s in zip(*(x[keep][order].tolist() for x in (owner, tokens, scores))):
            if len(taken[u]) == beams:
                continue
            title = tokenizer.decode(text).split(item_text(""))[0]
            if titles.get(title, INVALID) not in banned[u]:
                taken[u].add(title)
                pools[u][title] = max(pools[u].get(title, -torch.inf), s)
        for u in {u for u, t in enumerate(taken) if t}:
            pools[u] = dict(sorted(pools[u].items(), key=lambda e: -e[1])[:beams])
            floor[u] = min(pools[u].values()) if len(pools[u]) == beams else -torch.inf
        return torch.tensor(floor, device=device)

    for step in range(longest):
        cand = score[:, None] + logp
        done = torch.full((len(user), len(first)), -torch.inf, device=device).scatter_reduce_(
            1, group[ends].expand(len(user), -1), cand[:, ends], "amax")  # each beam's best token of each group
        top, pick = done.topk(min(beams, len(first)), 1)
        rows = torch.arange(len(user), device=device).repeat_interleave(top.shape[1])
        bar = offer(user[rows], torch.cat([written[rows], first[pick].view(-1, 1)], 1), top.flatten())
        top, token = cand.masked_fill(group != -1, -torch.inf).topk(min(beams, len(group)), 1)  # each row's best
        owner, width = user.repeat_interleave(top.shape[1]), top.shape[1]  # open beams
        if step == longest - 1:  # still open: the text so far is the title
            offer(owner, torch.cat([written.repeat_interleave(width, 0), token.view(-1, 1)], 1), top.flatten())
            break
        order = top.flatten().argsort(descending=True, stable=True)
        order = order[owner[order].argsort(stable=True)]  # grouped by user, best first
        _, counts = torch.unique_consecutive(owner[order], return_counts=True)
        rank = torch.arange(len(order), device=device) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        order = order[(rank < beams) & (top.flatten()[order] > bar[owner[order]])]
        if not len(order):
            break
        user, score, parent = owner[order], top.flatten()[order], order // width
        written = torch.cat([written[parent], token.flatten()[order, None]], 1)
        cache = cache.select(parent)
        logp = torch.log_softmax(model.lm_head(model(written[:, -1:], kv_cache=cache, hidden=True)[:, -1]).float(), -1)
    found, scores = torch.full((U, beams), -1), torch.full((U, beams), -torch.inf)
    for u, pool in enumerate(pools):  # best first already
        found[u, :len(pool)] = torch.tensor([titles.get(t, INVALID) for t in pool], dtype=torch.long)
        scores[u, :len(pool)] = torch.tensor(list(pool.values()))
    return found, scores


@torch.no_grad()
def exact_scores(model: Decoder, prompt: list[int], items: list[list[int]], pad_id: int,
                 chunk: int | None = None) -> torch.Tensor:
    """Log-likelihood (N,) of every item's tokens after one prompt: the prompt runs once, then the items, right-
    padded, as continuations of it, in chunks whose logits, attention scores and caches stay within ~256 MB."""
    c = model.config
    longest = max(map(len, items))
    per_item = 4 * longest * (2 * c.vocab_size + 3 * c.n_heads * (len(prompt) + longest) + 2 * c.n_layers * c.dim)
    chunk = chunk or max(1, 2**28 // per_item)
    prompt_kv, first = prompt_cache(model, [prompt], pad_id)
    order = sorted(range(len(items)), key=lambda i: len(items[i]))  # similar lengths share a chunk: less padding
    scores = torch.cat([continuation_scores(model, prompt_kv, first[0], [items[i] for i in order[s:s + chunk]], pad_id)
                        for s in range(0, len(items), chunk)])
    return scores[torch.argsort(torch.tensor(order, device=scores.device))]


def continuation_scores(model: Decoder, prompt_kv: KVCache, first: torch.Tensor, items: list[list[int]],
                        pad_id: int) -> torch.Tensor:
    """Log-likelihoods of `items` after a one-prompt cache; `first` holds the log-probabilities after the prompt."""
    device, longest = first.device, max(map(len, items))
    ids = torch.as_tensor(pad(items, pad_id), device=device)
    total = first[ids[:, 0]]
    if longest == 1:
        return total
    real = torch.arange(1, longest, device=device) < torch.tensor([len(s) for s in items], device=device)[:, None]
    one_prompt = torch.zeros(len(items), dtype=torch.long, device=device)
    hidden = model(ids[:, :-1], kv_cache=BeamCache(prompt_kv, one_prompt, longest - 1), hidden=True)
    logp = torch.log_softmax(model.lm_head(hidden).float(), -1).gather(2, ids[:, 1:, None])[..., 0]
    return total + (logp * real).sum(1)


# --------------------------------------------------------------------------------------------------- metrics
def rank_in_list(items: np.ndarray, scores: np.ndarray, target: int) -> float:
    """0-based rank of `target` in a ranked top-B list (ties pessimistic); inf when it is not in the list."""
    hit = np.flatnonzero(items == target)
    if not len(hit):
        return np.inf
    return float((scores >= scores[hit[0]]).sum() - 1)


def rank_in_scores(scores: np.ndarray, target, excluded=()):
    """0-based rank of `target` among all candidates (ties pessimistic), ignoring `excluded` candidates. Scores of
    several users at once, (users, items), take a target and an excluded list per row and give an array of ranks."""
    scores = np.asarray(scores)
    if scores.ndim == 1:
        return float(rank_in_scores(scores[None], [target], [excluded])[0])
    rows, target = np.arange(len(scores)), np.asarray(target)
    ahead = scores >= scores[rows, target][:, None]
    for row, ex in enumerate(excluded):
        ahead[row, np.asarray(ex, np.int64)] = False
    ahead[rows, target] = True
    return ahead.sum(1) - 1.0


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each user's NDCG@k: with one relevant item the ideal DCG is 1, so it is 1/log2(rank + 2) inside the top k."""
    hit = ranks < k
    return np.where(hit, 1 / np.log2(np.where(hit, ranks, 0) + 2), 0)


def metrics(ranks, ks=KS) -> dict:
    ranks = np.asarray(ranks, float)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float((ranks < k).mean())
        out[f"ndcg@{k}"] = float(ndcg_gains(ranks, k).mean())
    out["mrr"] = float((1 / (ranks + 1)).mean())
    return out


def popularity(ds: Dataset, key: str) -> np.ndarray:
    """Training-interaction count of each catalogue item: the popularity baseline's scores."""
    position = {item: k for k, item in enumerate(ds.catalogue(key))}
    counts = np.zeros(len(position))
    for items in train_sequences(ds, key):
        np.add.at(counts, [position[i] for i in items], 1)
    return counts


# --------------------------------------------------------------------------------------------------- driver
def catalogue_tokens(encoder: Encoder, ds: Dataset, key: str) -> list[list[int]]:
    """Every item of the domain's catalogue as the template writes it (title and terminator): the trie's paths."""
    texts = [item_text(ds.titles[i]) for i in ds.catalogue(key)]
    encoder.warm(texts)  # one batch: a large catalogue tokenizes on every core
    return [encoder(t) for t in texts]


def user_prompts(encoder: Encoder, ds: Dataset, histories, key: str) -> list[list[int]]:
    """The template's prompt for each history of items of domain `key`: its next item is what the model writes."""
    domain = ds.domain(key)
    return [encoder.sequence(ds, history, domain)[0] for history in histories]


def evaluate(model: Decoder, encoder: Encoder, ds: Dataset, key: str, *, split: str = "test", beams: int = 20,
             exact: bool = False, users: int | None = None, seed: int = 0, mask_history: bool = False,
             window: int = 20, batch_users: int | None = None, ks=None, progress: bool = False,
             unconstrained: bool = False) -> dict:
    """Rank the whole catalogue of domain `key` for each evaluation user; the model and popularity side by side.
    Metrics at K = 5, 10, 20, and 50 when the ranking is deep enough (50 beams or exact). `progress` shows a bar with
    ETA per batch of users (quiet when stderr is no terminal). `unconstrained`: free_search instead of beam_search."""
    ks = ks or (KS + (50,) if exact or beams >= 50 else KS)
    if split not in ("test", "valid"):
        raise UserError(f"--split {quote(split)}: expected test or valid")
    if beams < max(ks) and not exact:
        raise UserError(f"--beams {beams}: must be at least the largest K ({max(ks)})")
    cases = eval_cases(ds, key, {"test": 2, "valid": 1}[split], window)  # an unknown domain is refused here
    cases = sample(cases, users, seed)
    if not cases:
        raise UserError(f"domain {quote(key)} has no {split} cases (users need 3+ interactions there)")
    position = {item: k for k, item in enumerate(ds.catalogue(key))}
    item_tokens = catalogue_tokens(encoder, ds, key)
    targets = [position[c.target] for c in cases]
    excluded = [[position[i] for i in c.history] if mask_history else [] for c in cases]
    prompts = user_prompts(encoder, ds, [c.history for c in cases], key)
    pad = encoder.tokenizer.pad_id
    counts = popularity(ds, key)
    pop_ranks = [rank_in_scores(counts, t, ex) for t, ex in zip(targets, excluded)]
    began = time.perf_counter()
    model.eval()
    ranks, tops, dropped = [0.0] * len(cases), [None] * len(cases), [0.0] * len(cases)
    if exact:
        batches = [[k] for k in range(len(cases))]  # one user at a time
    else:
        trie = build_trie(item_tokens, model.embed_tokens.weight.device)
        search = (partial(free_search, model, beams=beams, pad_id=pad, tokenizer=encoder.tokenizer, items=item_tokens,
                          longest=trie.depth + MARGIN) if unconstrained else
                  partial(beam_search, model, trie=trie, beams=beams, pad_id=pad))
        order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a batch: less padding
        # Every process must cut the same batches: the smallest automatic size of any process's free memory.
        step = batch_users or least(auto_batch_users(model, beams, max(map(len, prompts)),
                                                     trie.depth + MARGIN * unconstrained), trie.item.device)
        batches = [order[start:start + step] for start in range(0, len(order), step)]
    batches, rank, done = my_batches(batches, prompts), process()[0], 0  # under torchrun, this process's share
    with progress_bar(sum(map(len, batches)), f"evaluate {key} {split}", progress and rank == 0) as advance:
        for rows in batches:
            if exact:
                (k,) = rows
                ranks[k], tops[k] = exact_ranking(model, prompts[k], item_tokens, pad, targets[k], excluded[k], beams)
                if done == 0 and (total := (time.perf_counter() - began) * len(cases)) > 600:
                    warn(f"--exact: {total / len(cases):.1f} s per user for {len(item_tokens):,} items, about "
                         f"{total / 3600:.1f} h for {len(cases):,} users; beam search ranks the top-{beams} far "
                         "faster (Ctrl-C to stop)", rank)
            else:
                items, scores = search([prompts[r] for r in rows], exclude=[excluded[r] for r in rows])
                for r, it, sc in zip(rows, items.cpu().numpy(), scores.cpu().numpy()):
                    ranks[r], tops[r] = rank_in_list(it, sc, targets[r]), it[it != -1]  # INVALID entries stay
                    dropped[r] = rank_in_list(it[it >= 0], sc[it >= 0], targets[r])
            done += len(rows)
            advance(len(rows), f"{done / (time.perf_counter() - began):.1f} users/s")
    ranks, tops, dropped = gathered(batches, ranks, tops, dropped)
    ranker = "exact scoring of every item" if exact else f"trie-constrained beam search, {beams} beams"
    ranker = FREE_RANKER.format(beams=beams, margin=MARGIN) if unconstrained else ranker
    return evaluation_result(ds, key, split, cases, ranks, tops, pop_ranks, ranker=ranker, mask_history=mask_history,
                             window=window, seconds=time.perf_counter() - began, beams=None if exact else beams, ks=ks,
                             dropped=dropped if unconstrained else None)


def exact_ranking(model: Decoder, prompt: list[int], items: list[list[int]], pad_id: int, target: int,
                  excluded: list[int], beams: int) -> tuple[float, np.ndarray]:
    """--exact for one user: every item scored exactly; the target's rank and the top `beams` allowed items."""
    scores = exact_scores(model, prompt, items, pad_id).cpu().numpy()
    rank = rank_in_scores(scores, target, excluded)
    scores[excluded] = -np.inf
    return rank, np.argsort(-scores, kind="stable")[:beams]


def my_batches(batches: list, prompts: list[list[int]]) -> list:
    """This process's share of evaluation's batches: all of them on one process; under torchrun whole batches, dealt
    by cost (users x the longest prompt, the padded prompt tokens), so that every process runs exactly the batches one
    process would (which prompts share a batch moves scores in the last digits) and the results equal one process's."""
    rank, world = process()
    costs = [len(rows) * max(len(prompts[r]) for r in rows) for rows in batches]
    return [batches[b] for b in deal(costs, world)[rank]]


def gathered(batches: list, *columns: list) -> list[list]:
    """Every process's per-user results (ranks, top lists, ...), in the users' order, on every process (each held
    its own users' rows of each column)."""
    rows = gather_rows({int(r): tuple(column[r] for column in columns) for rows in batches for r in rows})
    return [[rows[r][c] for r in range(len(column))] for c, column in enumerate(columns)]


def evaluation_result(ds: Dataset, key: str, split: str, cases: list[Case], ranks, tops, pop_ranks, *, ranker: str,
                      mask_history: bool, window: int, seconds: float, beams: int | None = None, ks=KS,
                      dropped=None) -> dict:
    """The one result of a full-ranking evaluation (the LLM's and the ID baseline's): its protocol in words, the
    model's and popularity's metrics, and each user's rank and top-10 (catalogue positions in `tops`, INVALID for a
    generated title that is no item). `valid`: the share of top-K entries that are catalogue items, 1 for a ranking of
    the catalogue (the trie's, exact scoring's, the baseline's); `dropped`: the ranks with INVALID entries removed."""
    catalogue = ds.catalogue(key)
    tops = [np.asarray(top) for top in tops]
    shown = {k: [top[:k] for top in tops] for k in ks}
    valid = {f"@{k}": sum(int((t >= 0).sum()) for t in shown[k]) / max(1, sum(map(len, shown[k]))) for k in ks}
    protocol = (f"full ranking over all {len(catalogue)} items of {ds.domain(key).name} ({key}); {ranker}; history "
                f"masking {'on' if mask_history else 'off'}; {split} split (chronological leave-one-out); {len(cases)} "
                f"users; history window {window}; ties pessimistic; popularity from training interactions"
                + ("" if beams is None else f"; MRR truncated at {beams}"))
    return {
        "protocol": protocol, "domain": key, "split": split, "users": len(cases), "items": len(catalogue),
        "beams": beams, "exact": beams is None, "mask_history": mask_history,
        "model": metrics(ranks, ks), "popularity": metrics(pop_ranks, ks), "valid": valid,
        **({} if dropped is None else {"model_valid_only": metrics(dropped, ks)}),
        "top10": beyond_accuracy(popularity(ds, key), [top[top >= 0] for top in tops]),
        "seconds": seconds, "users_per_s": len(cases) / seconds,
        "per_user": [{"user": ds.user_ids[c.user], "target": ds.item_ids[c.target],
                      "rank": None if np.isinf(r) else int(r), "popularity_rank": int(p),
                      "top10": [ds.item_ids[catalogue[i]] if i >= 0 else None for i in top[:10]]}
                     for c, r, p, top in zip(cases, ranks, pop_ranks, tops)]}
