"""The guide's embeddings for mining and the audit: ``GuideEncoder``, through an on-disk cache.

``GuideEncoder`` embeds texts with the guide (L2-normalised float32) through a cache keyed by
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
from typing import Any

import numpy as np

from gist_core.config import Settings
from gist_core.errors import DataError, ModelError
from gist_core.hashing import text_digest
from gist_core.models import ensure_available, load_sentence_transformer, model_fingerprint, resolve_model

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


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
        keys = [text_digest(t) for t in texts]
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
