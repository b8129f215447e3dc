"""What a ranking costs beyond its accuracy (coverage and popularity bias), for eval.evaluation_result."""
from __future__ import annotations

import numpy as np


def beyond_accuracy(counts: np.ndarray, tops) -> dict:
    """What a ranking costs beyond its accuracy, over every user's top-10 (catalogue positions): the share of the
    catalogue it ever recommends (coverage), and the mean popularity percentile of what it recommends (0: the least
    bought item of the domain's training interactions, `counts`, 1: the most; popularity's own top-10 is near 1)."""
    ordered = np.sort(counts)  # mid-rank percentile: equally popular items share one
    middle = (np.searchsorted(ordered, counts, "left") + np.searchsorted(ordered, counts, "right") - 1) / 2
    percentile = middle / max(len(counts) - 1, 1)
    shown = [np.asarray(top[:10], np.int64) for top in tops]
    every = np.concatenate(shown) if shown else np.zeros(0, np.int64)
    return {"coverage": len(np.unique(every)) / len(counts),
            "popularity_percentile": float(percentile[every].mean()) if len(every) else float("nan")}
