"""Guide-based classification triplet mining, as the GISTEmbed authors built their MTEB triplets.

For each text of a classification train split, the guide embeds every text of the (capped) split;
the positive is sampled from the ``top_k`` texts of the same label the guide finds most similar,
with probabilities ``softmax(similarity / temperature)`` (k=100, temperature 0.05 by default; the
text itself and identical copies of it are never candidates); the negative is a uniformly random
text of another label. ``positive_strategy: random`` samples the positive uniformly from the same
label instead, which is the ablation without the guide.

The sampling functions take arrays and a numpy ``Generator``, so they are tested on hand-built
embeddings; the guide's embeddings come from ``gist_core.data.guide_encoder``.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------- sampling (pure)


def _label_blocks(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order that sorts rows by label, each sorted row's block start, its block size)."""
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    block = np.repeat(np.arange(len(sizes)), sizes)
    return order, starts[block], sizes[block]


def same_label_partner(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row, a uniformly random other row of the same label (-1 when the label has one row)."""
    n = len(labels)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    order, start, size = _label_blocks(labels)
    offset = rng.integers(0, np.maximum(size - 1, 1))  # skip the row itself below
    within = np.arange(n) - start
    partner_sorted = start + offset + (offset >= within)
    out = np.full(n, -1, dtype=np.int64)
    out[order] = np.where(size > 1, order[np.minimum(partner_sorted, n - 1)], -1)
    return out


def other_label_partner(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row, a uniformly random row of another label (needs at least two labels)."""
    n = len(labels)
    order, start, size = _label_blocks(labels)
    if n and (size == n).any():
        raise ValueError("other_label_partner needs at least two labels")
    k = rng.integers(0, n - size) if n else np.empty(0, dtype=np.int64)
    partner_sorted = np.where(k < start, k, k + size)
    out = np.empty(n, dtype=np.int64)
    out[order] = order[partner_sorted]
    return out


def guided_positives(
    embeddings: np.ndarray,
    labels: np.ndarray,
    text_keys: np.ndarray,
    top_k: int,
    temperature: float,
    rng: np.random.Generator,
    chunk_size: int = 512,
) -> np.ndarray:
    """For each row, a positive sampled from its ``top_k`` most similar rows of the same label.

    ``embeddings`` are L2-normalised (similarity = dot product). Candidates with the same
    ``text_keys`` value as the anchor (the anchor itself and identical copies) are excluded; the
    sampling probabilities are ``softmax(similarity / temperature)`` over the top-k. Ties are
    broken by row order, so the result depends only on the inputs and ``rng``. Returns the positive
    row per row, -1 where no candidate exists.
    """
    if top_k < 1 or temperature <= 0:
        raise ValueError(f"top_k must be >= 1 and temperature > 0 (got {top_k}, {temperature})")
    n = len(labels)
    out = np.full(n, -1, dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        block = embeddings[members]
        k = min(top_k, len(members))
        for begin in range(0, len(members), chunk_size):
            rows = members[begin : begin + chunk_size]
            sims = (embeddings[rows] @ block.T).astype(np.float64)
            sims[text_keys[rows][:, None] == text_keys[members][None, :]] = -np.inf
            if k < len(members):
                cand = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            else:
                cand = np.broadcast_to(np.arange(len(members)), sims.shape).copy()
            top = np.take_along_axis(sims, cand, axis=1)
            by_rank = np.lexsort((cand, -top), axis=-1)  # most similar first, then row order
            cand = np.take_along_axis(cand, by_rank, axis=1)
            top = np.take_along_axis(top, by_rank, axis=1)
            valid = np.isfinite(top)
            with np.errstate(invalid="ignore"):
                weights = np.where(valid, np.exp((top - top[:, :1]) / temperature), 0.0)
            cumulative = np.cumsum(weights, axis=1)
            draw = rng.random(len(rows)) * cumulative[:, -1]
            choice = np.minimum((cumulative <= draw[:, None]).sum(axis=1), np.maximum(valid.sum(axis=1) - 1, 0))
            picked = members[cand[np.arange(len(rows)), choice]]
            out[rows] = np.where(valid.any(axis=1), picked, -1)
    return out


def row_similarity(embeddings: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows ``a[i]`` and ``b[i]`` (NaN where ``b`` is -1), as float32."""
    ok = (a >= 0) & (b >= 0)
    out = np.full(len(a), np.nan, dtype=np.float32)
    out[ok] = np.einsum("ij,ij->i", embeddings[a[ok]], embeddings[b[ok]])
    return out
