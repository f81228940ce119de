"""Mutually exclusive tag groups, found in the training labels: most faces have one hair colour, one eye colour.

A group is a set of tags that rarely appear together on one image, less often than if they were independent
(hair colours, eye colours, ``long_hair`` / ``short_hair``). They are found by average-linkage clustering of
the tags on their co-occurrence *lift*, ``observed / expected`` pairs with ``expected = n_a n_b / N``: two
clusters merge while their tags meet clearly and significantly less often than independent tags would, and no
pair of them is attracted (blue hair goes with blue eyes, so hair and eye colours stay apart).

The training loss uses them (``--group-loss``): a softmax cross-entropy over each group's logits on the images
that carry a tag of the group, beside the per-tag binary cross-entropy, so the net learns which colour of the
group it is, not only whether each colour is there. Decoding stays per tag: the labels are too noisy for
"exactly one per group" (on the 14.5k real faces 13% of them carry two hair colours or more).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def label_matrix(labels: Sequence[Sequence[int]], num_tags: int) -> np.ndarray:
    """``(N, T)`` bool matrix of label index lists (the store's index)."""
    y = np.zeros((len(labels), num_tags), dtype=bool)
    for i, row in enumerate(labels):
        if len(row):
            y[i, np.asarray(row, dtype=np.int64)] = True
    return y


def exclusive_groups(y: np.ndarray, *, min_positives: int = 20, max_tags: int = 256, max_lift: float = 0.9,
                     min_z: float = 5.0, max_pair_lift: float = 1.5, prior: float = 20.0) -> list[list[int]]:
    """Groups (tag index lists, two tags or more, most frequent first) of mutually exclusive tags in ``y``.

    Two clusters merge (the lowest lift first) while, over all pairs of their tags, the observed co-occurrences
    are under ``max_lift`` times the expected ones *and* that shortfall is significant (``min_z`` Poisson
    standard deviations: independent tags never merge by chance), and no pair is attracted (shrunk lift over
    ``max_pair_lift``). Only the ``max_tags`` most frequent tags with ``min_positives`` positives or more are
    candidates (a group needs evidence; the clustering is quadratic in them). ``[]`` when nothing qualifies.
    """
    y = np.asarray(y, dtype=bool)
    n = len(y)
    counts = y.sum(0)
    cand = [int(j) for j in np.argsort(-counts, kind="stable")[:max_tags] if counts[j] >= min_positives]
    if n == 0 or len(cand) < 2:
        return []
    sub = y[:, cand].astype(np.float32)
    c = counts[cand].astype(np.float64)
    obs = (sub.T @ sub).astype(np.float64)  # co-occurrences between clusters (summed over their tag pairs)
    exp = np.outer(c, c) / n  # the same if the tags were independent
    peak = (obs + prior) / (exp + prior)  # the most attracted pair between clusters
    k = len(cand)
    alive = np.ones(k, dtype=bool)
    members = [[i] for i in range(k)]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        while True:
            lift = obs / exp
            z = (obs - exp) / np.sqrt(exp)
            ok = upper & alive[:, None] & alive[None, :] & (lift < max_lift) & (z < -min_z) & (peak < max_pair_lift)
            if not ok.any():
                break
            a, b = np.unravel_index(np.argmin(np.where(ok, lift, np.inf)), lift.shape)
            for m in (obs, exp):
                m[a, :] += m[b, :]
                m[:, a] = m[a, :]
            peak[a, :] = np.maximum(peak[a, :], peak[b, :])
            peak[:, a] = peak[a, :]
            alive[b] = False
            members[a] += members[b]
    groups = [sorted((cand[i] for i in members[g]), key=lambda j: -counts[j])
              for g in range(k) if alive[g] and len(members[g]) > 1]
    return sorted(groups, key=lambda g: -counts[g[0]])


__all__ = ["label_matrix", "exclusive_groups"]
