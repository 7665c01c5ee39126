"""The guide's embeddings for mining and the audit: ``GuideEncoder``, through the shared embedding store.

``GuideEncoder`` embeds texts with the guide (L2-normalised float32) through an ``EmbeddingStore``
(``gist_core.embedding_store``) keyed by (guide fingerprint, max_seq_length, the exact text): a
rerun, a second mining run with other settings, or the training cache of the same guide and length
encodes only texts the store has never seen. It counts, per pass, the texts asked for, found and
encoded, and the seconds spent encoding.

The store is not what versions the data: the embeddings mining used are the DVC output of the
``embed`` stage (``gist_core.data.embed``), which mining reads; the store only saves recomputing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gist_core.config import Settings
from gist_core.embedding_store import EmbeddingStore, string_keys
from gist_core.errors import DataError, ModelError
from gist_core.models import ensure_available, load_sentence_transformer, model_fingerprint, resolve_model

log = logging.getLogger(__name__)

STORE_CHUNK = 65_536  # new embeddings gathered before they are stored as one shard
ENCODE_CHUNK = 1024  # texts encoded per call
PROGRESS_SECONDS = 30.0  # at most one progress line this often


class TextEmbedder(Protocol):
    """What mining and the audit need of the guide: unit-length embeddings of texts, and its identity."""

    name: str
    fingerprint: str

    def embed(self, texts: Sequence[str], pass_name: str = "embed") -> np.ndarray: ...


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0).astype(np.float32)


class GuideEncoder:
    """Embeds texts with the guide (L2-normalised, float32), through an ``EmbeddingStore``.

    The model is loaded on first need: when every text is stored, it is never loaded.

    Args:
        name: the guide's reference (``base.guide``), for the report.
        fingerprint: a content hash of its weights (or ``hub:<id>``): the store's identity.
        load_model: returns an object with sentence-transformers' ``encode``.
        max_seq_length: the guide's token limit for mining (part of the store's identity).
        batch_size: encode batch size.
        cache_root: the store's folder; None keeps embeddings in memory for this run only.
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
        self.store = EmbeddingStore(cache_root, fingerprint, max_seq_length) if cache_root is not None else None
        self._memory: dict[bytes, np.ndarray] = {}
        self.encoded = 0
        self.from_cache = 0
        self.seconds = 0.0
        self.passes: dict[str, dict[str, float]] = {}

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            self._model = self._load_model()
        started = time.perf_counter()
        vectors = np.asarray(
            self._model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=False,
                convert_to_numpy=True,
                show_progress_bar=False,
            ),
            dtype=np.float32,
        )
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        self.encoded += len(texts)
        log.debug("guide %s: encoded %d texts in %.1f s", self.name, len(texts), elapsed)
        return vectors

    def embed(self, texts: Sequence[str], pass_name: str = "embed") -> np.ndarray:
        """The guide's unit-length embedding of each text; only texts never stored are encoded."""
        if not len(texts):
            return np.empty((0, 0), dtype=np.float32)
        started = time.perf_counter()
        encoded_before = self.encoded
        keys = string_keys(texts)
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        if self.store is not None:
            found, vectors = self.store.lookup(unique)
        else:
            found = np.array([k.tobytes() in self._memory for k in unique], dtype=bool)
            vectors = np.stack([self._memory[k.tobytes()] for k in unique[found]]) if found.any() else None
            if vectors is not None:
                full = np.zeros((len(unique), vectors.shape[1]), dtype=np.float32)
                full[found] = vectors
                vectors = full
        self.from_cache += int(found.sum())
        missing = np.flatnonzero(~found)
        if len(missing):
            log.info(
                "guide %s, %s: %d texts, %d distinct, %d stored; encoding %d",
                self.name,
                pass_name,
                len(texts),
                len(unique),
                int(found.sum()),
                len(missing),
            )
        last_line = started
        pending: list[np.ndarray] = []
        for begin in range(0, len(missing), ENCODE_CHUNK):
            rows = missing[begin : begin + ENCODE_CHUNK]
            new = self._encode([texts[i] for i in first[rows]])
            if vectors is None or vectors.shape[1] != new.shape[1]:
                vectors = np.zeros((len(unique), new.shape[1]), dtype=np.float32)
            vectors[rows] = new
            pending.append(rows)
            done = begin + len(rows)
            if sum(len(r) for r in pending) >= STORE_CHUNK or done == len(missing):
                self._keep(unique, vectors, np.concatenate(pending))
                pending.clear()
            now = time.perf_counter()
            if now - last_line >= PROGRESS_SECONDS or (done == len(missing) and now - started >= PROGRESS_SECONDS):
                elapsed = now - started
                log.info("guide %s, %s: %d of %d encoded (%.0f s)", self.name, pass_name, done, len(missing), elapsed)
                last_line = now
        assert vectors is not None
        record = self.passes.setdefault(pass_name, {"texts": 0, "distinct": 0, "encoded": 0, "seconds": 0.0})
        record["texts"] += len(texts)
        record["distinct"] += len(unique)
        record["encoded"] += self.encoded - encoded_before
        record["seconds"] = round(record["seconds"] + time.perf_counter() - started, 3)
        return normalized(vectors)[inverse.reshape(-1)]

    def _keep(self, keys: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> None:
        if self.store is not None:
            self.store.add(keys[rows], vectors[rows])
        else:
            self._memory.update((k.tobytes(), v) for k, v in zip(keys[rows], vectors[rows], strict=True))

    def stored(self, keys: np.ndarray) -> np.ndarray:
        """The unit-length embeddings of already embedded texts, by ``string_keys``, as ``embed`` returns them."""
        if self.store is not None:
            found, vectors = self.store.lookup(keys)
        else:
            found = np.array([k.tobytes() in self._memory for k in keys], dtype=bool)
            vectors = np.stack([self._memory[k.tobytes()] for k in keys]) if found.all() and len(keys) else None
        if not found.all() or vectors is None:
            raise DataError(f"guide {self.name}: {int((~found).sum())} texts were never embedded")
        return normalized(vectors)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "max_seq_length": self.max_seq_length,
            "encoded": self.encoded,
            "from_cache": self.from_cache,
            "encode_seconds": round(self.seconds, 1),
            "passes": self.passes,
        }


def load_guide(settings: Settings) -> GuideEncoder:
    """The configured guide (``base.guide``) for mining and audits; packaged models must be provisioned."""
    mining = settings.data.mining
    ref = resolve_model(settings.base.guide, settings.path(settings.base.models_dir), settings.root)
    try:
        ref = ensure_available(ref, provision_missing=False)
    except ModelError as err:
        raise DataError(f"the data stage needs the guide: {err}") from None
    return GuideEncoder(
        name=settings.base.guide,
        fingerprint=model_fingerprint(ref),
        load_model=lambda: load_sentence_transformer(ref, mining.max_seq_length),
        max_seq_length=mining.max_seq_length,
        batch_size=mining.batch_size,
        cache_root=settings.path(mining.cache_dir) if mining.cache_dir else None,
    )
