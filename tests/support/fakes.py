"""A deterministic stand-in for the guide: bag-of-words vectors, so texts sharing words are similar."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gist_core.data.guide_encoder import GuideEncoder

DIM = 64


class BagOfWords:
    """Has sentence-transformers' ``encode``; counts the texts it was asked to encode."""

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    def encode(self, texts: Sequence[str], **kwargs: object) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little") % DIM] += 1.0
            out[i, DIM - 1] += 0.01  # no zero vectors
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def fake_guide(cache_root: Path | None = None, model: BagOfWords | None = None) -> GuideEncoder:
    model = model or BagOfWords()
    return GuideEncoder("bag-of-words", "fake-fingerprint", lambda: model, max_seq_length=64, cache_root=cache_root)
