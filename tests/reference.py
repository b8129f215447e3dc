"""The oracle of eval.beam_search: the simplest beam search that is obviously right. One prompt at a time, a full
forward pass over prompt + prefix for every open prefix at every depth (no cache), no pruning, no early stop."""
from __future__ import annotations

import torch


@torch.no_grad()
def naive_beam_search(model, prompt: list[int], items: list[list[int]], beams: int,
                      exclude=()) -> tuple[list[int], list[float]]:
    """The top-`beams` items after `prompt` and their log-likelihoods, best first: keep the `beams` best open
    prefixes at each depth; an item completed on the way joins the pool of finished items unless excluded."""
    index = {tuple(t): k for k, t in enumerate(items)}
    open_, pool = [((), 0.0)], []
    for _ in range(max(map(len, items))):
        candidates = []
        for prefix, score in open_:
            logp = torch.log_softmax(model(torch.tensor([prompt + list(prefix)]))[0, -1].float(), -1)
            for token in sorted({t[len(prefix)] for t in items if len(t) > len(prefix) and
                                 tuple(t[:len(prefix)]) == prefix}):
                candidates.append((prefix + (token,), score + float(logp[token])))
        pool += [(index[p], s) for p, s in candidates if p in index and index[p] not in exclude]
        open_ = sorted([(p, s) for p, s in candidates if p not in index], key=lambda c: -c[1])[:beams]
    pool = sorted(pool, key=lambda c: -c[1])[:beams]
    return [k for k, _ in pool], [s for _, s in pool]
