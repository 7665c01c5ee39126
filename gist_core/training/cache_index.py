"""The guide-embedding cache's key index: 64-bit hashes of the student's token ids, sorted, with check hashes.

At a million texts a cache key cannot be a Python tuple per text. ``sequence_hashes`` turns each id
sequence (padding removed) into two independent 64-bit hashes with numpy, a batch at a time: the
key, and a check. ``KeyIndex`` holds the keys sorted (a binary search per lookup) with the checks
beside them; two sequences with one key but different checks are a collision, refused when the
index is built and when it is asked, never answered with another text's row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

import numpy as np

from gist_core.errors import DataError

Key = tuple[int, ...]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_SEED1 = np.uint64(0x243F6A8885A308D3)
_SEED2 = np.uint64(0x13198A2E03707344)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def sequence_hashes(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(key, check): two independent 64-bit hashes of each row's token ids where ``mask`` is set, in order."""
    ids = np.asarray(ids).astype(np.uint64) + np.uint64(1)
    mask = np.asarray(mask, dtype=bool)
    key = np.full(len(ids), _SEED1, dtype=np.uint64)
    check = np.full(len(ids), _SEED2, dtype=np.uint64)
    for column in range(ids.shape[1] if ids.ndim == 2 else 0):
        keep = mask[:, column]
        value = ids[:, column]
        key = np.where(keep, _mix(key * _P1 + value), key)
        check = np.where(keep, _mix((check ^ value) * _P2 + np.uint64(column + 1)), check)
    lengths = mask.sum(axis=1).astype(np.uint64) if ids.ndim == 2 else np.zeros(len(ids), np.uint64)
    return _mix(key ^ lengths), _mix(check + lengths * _P1)


def padded_ids(features: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) as padded numpy arrays, also for a flattened (unpadded) batch."""
    input_ids = features["input_ids"]
    if "cu_seq_lens_q" in features:  # one row holding every sequence, split by the offsets
        flat = input_ids[0].cpu().numpy()
        bounds = features["cu_seq_lens_q"].cpu().numpy()
        lengths = np.diff(bounds)
        ids = np.zeros((len(lengths), int(lengths.max(initial=0))), dtype=np.int64)
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        ids[mask] = flat[: int(lengths.sum())]
        return ids, mask
    ids = input_ids.cpu().numpy() if hasattr(input_ids, "cpu") else np.asarray(input_ids)
    attention = features.get("attention_mask")
    if attention is None:
        return ids, np.ones(ids.shape, dtype=bool)
    mask = attention.cpu().numpy() if hasattr(attention, "cpu") else np.asarray(attention)
    return ids, mask.astype(bool)


def token_key_hashes(features: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (key, check) hashes of the student's token ids, padding removed: the cache's lookup key."""
    return sequence_hashes(*padded_ids(features))


def feature_keys(features: dict[str, Any]) -> list[Key]:
    """Each row's token ids with the padding removed, as tuples (for tests and small tables)."""
    ids, mask = padded_ids(features)
    return [tuple(int(i) for i in compress(row, keep)) for row, keep in zip(ids.tolist(), mask.tolist(), strict=True)]


@dataclass(frozen=True)
class KeyIndex:
    """A sorted array of 64-bit keys with a check hash per key: row ``i`` of a table belongs to ``keys[i]``."""

    keys: np.ndarray  # uint64, strictly increasing
    checks: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.keys)

    def validate(self, where: str) -> None:
        """Refuse an index whose arrays disagree or whose keys repeat (a collision) or are out of order."""
        if self.keys.dtype != np.uint64 or self.checks.dtype != np.uint64 or len(self.keys) != len(self.checks):
            raise DataError(f"{where}: the key index is malformed (dtypes {self.keys.dtype}/{self.checks.dtype})")
        if len(self.keys) > 1 and not bool(np.all(self.keys[1:] > self.keys[:-1])):
            raise DataError(f"{where}: the key index is not strictly increasing (a repeated key: a hash collision)")

    def rows(self, key: np.ndarray, check: np.ndarray) -> np.ndarray:
        """The row of each (key, check); -1 where the key is absent. A key whose check differs is a collision."""
        if not len(self.keys):
            return np.full(len(key), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        hit = self.keys[pos] == key
        clash = hit & (self.checks[pos] != check)
        if clash.any():
            raise DataError(
                f"{int(clash.sum())} texts hash to a key of the guide-embedding cache whose check hash differs: "
                "a hash collision; the cache refuses to answer (rebuild it with `gist guide-cache`)"
            )
        return np.where(hit, pos, -1).astype(np.int64)

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> tuple[KeyIndex, np.ndarray]:
        """An index of token-id sequences and, per sequence, its row (equal sequences share one)."""
        width = max((len(s) for s in sequences), default=0)
        ids = np.zeros((len(sequences), width), dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=bool)
        for i, seq in enumerate(sequences):
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = True
        key, check = sequence_hashes(ids, mask)
        index, first, row_of = dedup(key, check, "token-id sequences")
        return index, row_of


def dedup(key: np.ndarray, check: np.ndarray, where: str) -> tuple[KeyIndex, np.ndarray, np.ndarray]:
    """(index, first item of each entry, entry row of each item); a key with two check hashes is refused."""
    order = np.argsort(key, kind="stable")
    sorted_keys, sorted_checks = key[order], check[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    entry = np.cumsum(starts) - 1
    if np.any(sorted_checks != sorted_checks[starts][entry]):
        raise DataError(
            f"{where}: two different token sequences share a 64-bit cache key (a hash collision); "
            "the guide-embedding cache cannot index them exactly and refuses to build"
        )
    row_of = np.empty(len(order), dtype=np.int64)
    row_of[order] = entry
    return KeyIndex(sorted_keys[starts], sorted_checks[starts]), order[starts], row_of


# Parts of a tokenizer's serialised state that calls change (truncation and padding are set by the
# first call that truncates or pads) and that do not decide its ids or decoded text for a given call.
_CALL_STATE = ("truncation", "padding")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides a tokenizer's ids and decoded text; using the tokenizer never changes it."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for key in _CALL_STATE:
            state.pop(key, None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr(getattr(tokenizer, "clean_up_tokenization_spaces", None)).encode())
    return digest.hexdigest()[:16]
