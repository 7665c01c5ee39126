"""Guide-based classification triplet mining, as the GISTEmbed authors built their MTEB triplets.

For each text of a classification train split, the guide embeds every text of the (capped) split;
the positive is sampled from the ``top_k`` texts of the same label the guide finds most similar,
with probabilities ``softmax(similarity / temperature)`` (k=100, temperature 0.05 by default; the
text itself and identical copies of it are never candidates); the negative is a uniformly random
text of another label. ``positive_strategy: random`` samples the positive uniformly from the same
label instead, which is the ablation without the guide.

The sampling functions take arrays and a numpy ``Generator``, so they are tested on hand-built
embeddings. ``GuideEncoder`` embeds texts with the guide through an on-disk cache keyed by
(guide fingerprint, max_seq_length, sha256 of the text): a rerun, or a second mining run with
other settings, encodes only texts it has never seen.

The cache is deliberately not a DVC output: it is a pure function of the guide's weights and the
text, so it can never be stale, and tracking it would push hundreds of MB of floats that any
machine can recompute. Caveat: an embedding depends on the batch it was computed in at the level
of float rounding (~1e-7). A text's vector never changes once cached, so reruns on a machine are
byte-identical; on a machine whose cache was filled by a different history of runs, a handful of
sampled positives can differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gist_core.errors import DataError

if TYPE_CHECKING:
    from gist_core.config import Settings

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


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


# ---------------------------------------------------------------- the guide and its cache


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class EmbeddingCache:
    """Guide embeddings on disk: ``<root>/<identity hash>/shard-*.npz`` with ``keys`` and ``vectors``.

    Shards are only ever added (atomically: written to a temporary name, then renamed), so
    concurrent runs can share a cache folder.
    """

    def __init__(self, root: Path, identity: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps({**identity, "format": CACHE_FORMAT}, sort_keys=True).encode())
        self.folder = root / digest.hexdigest()[:24]
        self.identity = identity

    def load(self) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard) as data:
                    keys, vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError) as err:
                log.warning("guide-embedding cache: ignoring unreadable shard %s (%s)", shard, err)
                continue
            for key, vector in zip(keys, vectors, strict=True):
                found.setdefault(key.tobytes(), vector)
        return found

    def save(self, keys: Sequence[bytes], vectors: np.ndarray) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "guide.json"
        if not meta.is_file():
            meta.write_text(json.dumps(self.identity, indent=2, sort_keys=True) + "\n")
        name = hashlib.sha256(b"".join(keys)).hexdigest()[:16]
        final = self.folder / f"shard-{name}.npz"
        tmp = self.folder / f".shard-{name}.{os.getpid()}.tmp"
        with tmp.open("wb") as fh:
            # keys as raw uint8 rows: a fixed-width bytes dtype would drop a digest's trailing NUL bytes
            raw_keys = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
            np.savez(fh, keys=raw_keys, vectors=np.asarray(vectors, dtype=np.float32))
        tmp.replace(final)
        return final


class GuideEncoder:
    """Embeds texts with the guide (L2-normalised, float32), through an ``EmbeddingCache``.

    The model is loaded on first need: when every text is cached, it is never loaded.

    Args:
        name: the guide's reference (``base.guide``), for the report.
        fingerprint: a content hash of its weights (or ``hub:<id>``): the cache's identity.
        load_model: returns an object with sentence-transformers' ``encode``.
        max_seq_length: the guide's token limit for mining (part of the cache identity).
        batch_size: encode batch size.
        cache_root: the cache folder; None disables the on-disk cache.
    """

    def __init__(
        self,
        name: str,
        fingerprint: str,
        load_model: Callable[[], Any],
        max_seq_length: int,
        batch_size: int = 64,
        cache_root: Path | None = None,
    ) -> None:
        self.name = name
        self.fingerprint = fingerprint
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self._load_model = load_model
        self._model: Any = None
        identity = {"guide_fingerprint": fingerprint, "max_seq_length": max_seq_length, "normalized": True}
        self.cache = EmbeddingCache(cache_root, identity) if cache_root is not None else None
        self._known: dict[bytes, np.ndarray] | None = None
        self.encoded = 0
        self.from_cache = 0
        self.seconds = 0.0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._known is None:
            self._known = self.cache.load() if self.cache is not None else {}
        keys = [text_key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._known}
        self.from_cache += len(set(keys)) - len(missing)
        if missing:
            if self._model is None:
                self._model = self._load_model()
            started = time.perf_counter()
            vectors = self._model.encode(
                list(missing.values()),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
            self.seconds += time.perf_counter() - started
            self.encoded += len(missing)
            log.info("guide %s: encoded %d texts in %.1f s", self.name, len(missing), time.perf_counter() - started)
            self._known.update(zip(missing, vectors, strict=True))
            if self.cache is not None:
                self.cache.save(list(missing), vectors)
        if not keys:
            return np.empty((0, 0), dtype=np.float32)
        return np.stack([self._known[k] for k in keys])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "max_seq_length": self.max_seq_length,
            "encoded": self.encoded,
            "from_cache": self.from_cache,
            "encode_seconds": round(self.seconds, 1),
        }


def load_guide(settings: Settings) -> GuideEncoder:
    """The configured guide (``base.guide``) for mining and audits; packaged models must be provisioned."""
    from gist_core.errors import ModelError
    from gist_core.models import ensure_available, fingerprint, load_sentence_transformer, resolve_model

    mining = settings.data.mining
    ref = resolve_model(settings.base.guide, settings.path(settings.base.models_dir), settings.root)
    try:
        ref = ensure_available(ref, provision_missing=False)
    except ModelError as err:
        raise DataError(f"the data stage needs the guide: {err}") from None
    weights_hash = fingerprint(Path(ref.location)) if ref.is_local else f"hub:{ref.location}"
    return GuideEncoder(
        name=settings.base.guide,
        fingerprint=weights_hash,
        load_model=lambda: load_sentence_transformer(ref, mining.max_seq_length),
        max_seq_length=mining.max_seq_length,
        batch_size=mining.batch_size,
        cache_root=settings.path(mining.cache_dir) if mining.cache_dir else None,
    )
