"""The mining maths on hand-built arrays, and the guide-embedding cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gist_core.data.mining import guided_positives, other_label_partner, row_similarity, same_label_partner
from tests.support.fakes import BagOfWords, fake_guide


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_same_and_other_label_partners() -> None:
    labels = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 7 + ["d"])
    rng = np.random.default_rng(0)
    same = same_label_partner(labels, rng)
    other = other_label_partner(labels, rng)
    for i in range(len(labels) - 1):
        assert same[i] != i and labels[same[i]] == labels[i]
    assert same[-1] == -1  # "d" has one row
    assert all(labels[other[i]] != labels[i] for i in range(len(labels)))
    with pytest.raises(ValueError, match="two labels"):
        other_label_partner(np.array(["a", "a"]), rng)


def test_guided_positive_is_the_most_similar_same_label_text_at_low_temperature() -> None:
    # a0 is close to a1, far from a2; b0 is close to a0 but has another label
    emb = _unit([[1, 0, 0], [0.95, 0.3, 0], [0, 0, 1], [0.99, 0.1, 0], [0.9, 0, 0.4]])
    labels = np.array(["a", "a", "a", "b", "b"])
    keys = np.arange(5)
    pos = guided_positives(emb, labels, keys, top_k=100, temperature=1e-4, rng=np.random.default_rng(1))
    assert pos[0] == 1 and pos[1] == 0 and pos[3] == 4 and pos[4] == 3
    assert labels[pos[2]] == "a" and pos[2] != 2


def test_top_k_limits_and_softmax_weights_the_candidates() -> None:
    # anchor 0 with three same-label candidates of similarity 0.9, 0.8 and 0.1
    emb = _unit([[1, 0], [0.9, np.sqrt(1 - 0.81)], [0.8, 0.6], [0.1, np.sqrt(0.99)], [-1, 0], [-1, 0.1]])
    labels = np.array(["a", "a", "a", "a", "b", "b"])
    keys = np.arange(6)
    picks = {1: 0, 2: 0, 3: 0}
    for seed in range(400):
        pos = guided_positives(emb, labels, keys, top_k=2, temperature=0.05, rng=np.random.default_rng(seed))
        picks[int(pos[0])] += 1
    assert picks[3] == 0  # outside the top-2
    # softmax(0.9/0.05, 0.8/0.05): p(first) = 1 / (1 + e^-2) = 0.88
    assert 0.82 < picks[1] / 400 < 0.94


def test_identical_texts_are_never_positives_and_sampling_is_seeded() -> None:
    emb = _unit([[1, 0], [1, 0], [0.5, 0.5], [0, 1], [0.1, 1]])
    labels = np.array(["a", "a", "a", "b", "b"])
    keys = np.array([0, 0, 1, 2, 3])  # rows 0 and 1 are the same text
    for seed in range(20):
        pos = guided_positives(emb, labels, keys, top_k=100, temperature=0.05, rng=np.random.default_rng(seed))
        assert pos[0] == 2 and pos[1] == 2
    again = [guided_positives(emb, labels, keys, 100, 0.05, np.random.default_rng(7)) for _ in range(2)]
    assert (again[0] == again[1]).all()
    only_copies = guided_positives(emb[:2], labels[:2], keys[:2], 100, 0.05, np.random.default_rng(0))
    assert (only_copies == -1).all()


def test_row_similarity() -> None:
    emb = _unit([[1, 0], [0, 1], [1, 1]])
    sims = row_similarity(emb, np.array([0, 0, 1]), np.array([1, 2, -1]))
    assert sims[0] == pytest.approx(0.0) and sims[1] == pytest.approx(np.sqrt(0.5)) and np.isnan(sims[2])


def test_guide_cache_makes_a_rerun_encode_nothing(tmp_path: Path) -> None:
    texts = ["lost card", "card lost yesterday", "transfer failed", "lost card"]
    first_model = BagOfWords()
    first = fake_guide(tmp_path, first_model).embed(texts)
    assert first_model.texts == 3  # each distinct text once
    second_model = BagOfWords()
    second_guide = fake_guide(tmp_path, second_model)
    second = second_guide.embed(texts + ["new text"])
    assert second_model.texts == 1 and second_guide.from_cache == 3
    np.testing.assert_array_equal(first, second[:4])
    # another guide (fingerprint) never reads this guide's vectors
    from gist_core.data.guide_encoder import GuideEncoder

    other_model = BagOfWords()
    GuideEncoder("other", "other-fingerprint", lambda: other_model, max_seq_length=64, cache_root=tmp_path).embed(texts)
    assert other_model.texts == 3 and len(list(tmp_path.iterdir())) == 2


def test_guide_is_not_loaded_when_everything_is_cached(tmp_path: Path) -> None:
    fake_guide(tmp_path).embed(["a b", "c d"])
    from gist_core.data.guide_encoder import GuideEncoder

    def boom() -> None:
        raise AssertionError("the model should not be loaded")

    cached = GuideEncoder("bag-of-words", "fake-fingerprint", boom, max_seq_length=64, cache_root=tmp_path)
    assert cached.embed(["c d"]).shape == (1, 64)
