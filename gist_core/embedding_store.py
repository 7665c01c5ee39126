"""The guide's embeddings of exact input strings, stored once and shared by every pass that needs them.

Mining, the audit's verdicts and the training guide cache all run the same frozen guide over texts.
An ``EmbeddingStore`` keeps what any of them computed, keyed by (guide fingerprint, max length, how
the input reaches the guide) and the exact input string, so a string is embedded at most once per
guide and max length across passes and runs. Where the passes' inputs coincide (the same guide and
max length, the raw text as the guide's input) they share entries; where they differ (the training
cache of a student with another vocabulary embeds the student's re-tokenized, decoded text) the
keys differ and nothing is shared, by construction.

Layout: ``<root>/<identity hash>/identity.json`` plus shards ``shard-<name>.keys.npy`` (each string's
128-bit BLAKE2b digest as two uint64, sorted) and ``shard-<name>.vectors.npy`` (float32, the guide's
raw sentence embedding, not normalised). Shards are only ever added, atomically (written under a
temporary name, then renamed), so concurrent runs can share a store; vectors are memory-mapped, so a
lookup reads only the rows it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gist_core.hashing import json_digest

log = logging.getLogger(__name__)

STORE_FORMAT = 2
KEY_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8")])
INPUT_TEXT = "text"  # the guide tokenizes the string itself


def string_keys(texts: Sequence[str]) -> np.ndarray:
    """Each string's 128-bit BLAKE2b digest of its UTF-8 bytes, as a ``KEY_DTYPE`` array."""
    raw = b"".join(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts)
    return np.frombuffer(raw, dtype=KEY_DTYPE).copy() if texts else np.empty(0, dtype=KEY_DTYPE)


@dataclass
class _Shard:
    keys: np.ndarray  # KEY_DTYPE, sorted
    vectors: np.ndarray  # (len(keys), dim) float32, memory-mapped


class EmbeddingStore:
    """The guide's embeddings of exact strings for one identity (guide fingerprint, max length, input form).

    Args:
        root: the store's folder (``data.mining.cache_dir``); one sub-folder per identity.
        guide_fingerprint: a content hash of the guide's weights.
        max_seq_length: the guide's token limit for these inputs.
        input_form: ``"text"`` when the guide tokenizes the string itself, else how the input is
            turned into the guide's tokens (e.g. ``"student-tokens:<tokenizer fingerprint>"``).
    """

    def __init__(self, root: Path, guide_fingerprint: str, max_seq_length: int, input_form: str = INPUT_TEXT) -> None:
        self.identity = {
            "format": STORE_FORMAT,
            "guide_fingerprint": guide_fingerprint,
            "max_seq_length": int(max_seq_length),
            "input": input_form,
        }
        self.folder = Path(root) / json_digest(self.identity)[:24]
        self._shards: list[_Shard] | None = None
        self._seen: set[str] = set()

    def _load(self) -> list[_Shard]:
        """The shards on disk, read once (shards this store adds are appended as they are written)."""
        if self._shards is not None:
            return self._shards
        self._shards = []
        for path in sorted(self.folder.glob("shard-*.keys.npy")):
            if path.name in self._seen:
                continue
            vectors_path = path.with_name(path.name.replace(".keys.npy", ".vectors.npy"))
            try:
                keys = np.load(path)
                vectors = np.load(vectors_path, mmap_mode="r")
            except (OSError, ValueError) as err:
                log.warning("embedding store: ignoring unreadable shard %s (%s)", path, err)
                continue
            if keys.dtype != KEY_DTYPE or vectors.ndim != 2 or len(keys) != len(vectors):
                log.warning("embedding store: ignoring shard %s whose keys and vectors disagree", path)
                continue
            self._seen.add(path.name)
            self._shards.append(_Shard(keys, vectors))
        return self._shards

    def __len__(self) -> int:
        return sum(len(s.keys) for s in self._load())

    def lookup(self, keys: np.ndarray, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, vectors): the stored vector of each key (zeros where it is not stored)."""
        found = np.zeros(len(keys), dtype=bool)
        out: np.ndarray | None = None
        for shard in self._load():
            if not len(shard.keys):
                continue
            if out is None:
                out = np.zeros((len(keys), shard.vectors.shape[1]), dtype=np.float32)
            todo = np.flatnonzero(~found)
            if not len(todo):
                break
            pos = np.minimum(np.searchsorted(shard.keys, keys[todo]), len(shard.keys) - 1)
            hit = shard.keys[pos] == keys[todo]
            if hit.any():
                rows = pos[hit]
                order = np.argsort(rows, kind="stable")  # read the memory map in file order
                out[todo[hit][order]] = shard.vectors[rows[order]]
                found[todo[hit]] = True
        if out is None:
            out = np.zeros((len(keys), dim or 0), dtype=np.float32)
        return found, out

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Store new vectors (one shard, written atomically); keys already stored are skipped."""
        if not len(keys):
            return
        known, _ = self.lookup(keys, vectors.shape[1])
        unique, first = np.unique(keys, return_index=True)
        keep = first[~known[first]]
        if not len(keep):
            return
        order = keep[np.argsort(keys[keep], kind="stable")]
        sorted_keys, sorted_vectors = keys[order], np.asarray(vectors[order], dtype=np.float32)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "identity.json"
        if not meta.is_file():
            meta.write_text(json.dumps(self.identity, indent=2, sort_keys=True) + "\n")
        name = hashlib.sha256(sorted_keys.tobytes()).hexdigest()[:16]
        final_vectors = self.folder / f"shard-{name}.vectors.npy"
        final_keys = self.folder / f"shard-{name}.keys.npy"
        for final, payload in ((final_vectors, sorted_vectors), (final_keys, sorted_keys)):  # keys last: complete
            tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            with tmp.open("wb") as handle:
                np.save(handle, payload)
            tmp.replace(final)
        if final_keys.name not in self._seen:
            self._seen.add(final_keys.name)
            self._load().append(_Shard(sorted_keys, np.load(final_vectors, mmap_mode="r")))

    def describe(self) -> dict[str, Any]:
        return {**self.identity, "folder": str(self.folder), "entries": len(self)}
