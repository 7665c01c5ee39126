"""The guided-loss plumbing on a tiny random model: cache keys and lookup, the masked-candidate stat,
loss construction and validation, run keys and checkpoints, and the multi-process batch samplers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gist_core.config import settings_from_dict
from gist_core.errors import DataError
from gist_core.training.cache_index import tokenizer_fingerprint
from gist_core.training.guide_cache import (
    CHECKS_FILE,
    EMBEDDINGS_FILE,
    KEYS_FILE,
    CacheIdentity,
    GuideEmbeddings,
    KeyIndex,
    feature_keys,
    read_guide_cache,
    write_guide_cache,
)
from gist_core.training.loss import GuideCacheMiss, GuideEmbeddingCache, build_loss, mask_stats


@pytest.fixture(scope="module")
def student(tiny_model_dir: Path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    model.max_seq_length = 32
    model.eval()
    return model


def _settings(repo_root: Path, tmp: Path, **train):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["train"].update(train)
    return settings_from_dict(raw, tmp)


def test_keys_ignore_padding(student) -> None:
    alone = feature_keys(student.preprocess(["a short text"]))
    padded = feature_keys(student.preprocess(["a much, much longer text that pads the other row", "a short text"]))
    assert alone[0] == padded[1]
    assert alone[0][0] == student.tokenizer.cls_token_id and alone[0][-1] == student.tokenizer.sep_token_id


def test_cache_looks_up_by_student_tokens_and_names_a_miss(student) -> None:
    texts = ["first text", "second text", "Second   TEXT"]  # the last two tokenize alike (uncased)
    keys = feature_keys(student.preprocess(texts))
    table = np.arange(len(keys) * 4, dtype=np.float32).reshape(len(keys), 4)
    cache = GuideEmbeddingCache(student, keys[:2], table[:2], max_seq_length=32, description={"guide": "g"})
    out = cache(student.preprocess(["second text", "Second   TEXT", "first text"]))["sentence_embedding"]
    assert torch.equal(out, torch.tensor(table[[1, 1, 0]]))
    assert cache.get_config_dict() == {"guide": "g", "entries": 2, "max_seq_length": 32}
    with pytest.raises(GuideCacheMiss, match=r"1 of 2 texts .* not in the guide-embedding cache .*'unseen'"):
        cache(student.preprocess(["first text", "unseen"]))


def test_cache_round_trips_through_disk(student, tmp_path: Path) -> None:
    keys = feature_keys(student.preprocess(["one", "two"]))
    index, row_of = KeyIndex.from_sequences(keys)
    table = np.zeros((2, 3), dtype=np.float32)
    table[row_of] = np.eye(2, 3, dtype=np.float32)
    cached = GuideEmbeddings(index, table, retokenized=True)
    identity = CacheIdentity("g", "fp", "tok", 32, "md5")
    manifest = write_guide_cache(tmp_path / "cache", cached, identity, {"texts": 2})
    back, read_manifest = read_guide_cache(tmp_path / "cache")
    assert np.array_equal(back.index.keys, index.keys) and np.array_equal(back.embeddings, table)
    assert isinstance(back.embeddings, np.memmap) and not back.embeddings.flags.writeable, "mapped read-only"
    assert back.retokenized and read_manifest == manifest and identity.differences(manifest) == []
    cache = GuideEmbeddingCache(student, back.index, back.embeddings, max_seq_length=32)
    out = cache(student.preprocess(["two", "one"]))["sentence_embedding"]
    assert torch.equal(out, torch.eye(2, 3)[[1, 0]])
    changed = CacheIdentity("other-name", "fp2", "tok", 64, "md5", "float16")
    assert [d.split(":")[0] for d in changed.differences(manifest)] == ["guide_fingerprint", "max_seq_length", "dtype"]
    assert not (tmp_path / "cache.partial").exists()
    # float16 storage halves the table and is widened to float32 per batch
    half = write_guide_cache(tmp_path / "half", cached, CacheIdentity("g", "fp", "tok", 32, "md5", "float16"), {})
    back16, _ = read_guide_cache(tmp_path / "half")
    assert half["dtype"] == "float16" and back16.embeddings.dtype == np.float16
    out16 = GuideEmbeddingCache(student, back16.index, back16.embeddings, 32)(student.preprocess(["one"]))
    assert out16["sentence_embedding"].dtype == torch.float32


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("count", r"disagree on the number of entries"),
        ("dtype", r"embeddings are float64, the manifest says float32"),
        ("collision", r"not strictly increasing \(a repeated key: a hash collision\)"),
    ],
)
def test_an_inconsistent_cache_is_refused(student, tmp_path: Path, damage: str, message: str) -> None:
    keys = feature_keys(student.preprocess(["one", "two", "three"]))
    index, row_of = KeyIndex.from_sequences(keys)
    cached = GuideEmbeddings(index, np.ones((3, 4), dtype=np.float32), retokenized=False)
    folder = tmp_path / "cache"
    write_guide_cache(folder, cached, CacheIdentity("g", "fp", "tok", 32, "md5"), {})
    if damage == "count":
        np.save(folder / EMBEDDINGS_FILE, np.ones((2, 4), dtype=np.float32))
    elif damage == "dtype":
        np.save(folder / EMBEDDINGS_FILE, np.ones((3, 4), dtype=np.float64))
    else:
        keys_now = np.load(folder / KEYS_FILE)
        keys_now[1] = keys_now[0]
        np.save(folder / KEYS_FILE, keys_now)
    with pytest.raises(DataError, match=message):
        read_guide_cache(folder)
    assert (folder / CHECKS_FILE).is_file()


def test_a_lookup_whose_check_hash_differs_is_refused(student) -> None:
    keys = feature_keys(student.preprocess(["one", "two"]))
    index, _ = KeyIndex.from_sequences(keys)
    forged = KeyIndex(index.keys, index.checks ^ np.uint64(1))  # same keys, other sequences: collisions
    cache = GuideEmbeddingCache(student, forged, np.ones((2, 3), dtype=np.float32), max_seq_length=32)
    with pytest.raises(DataError, match="hash collision; the cache refuses to answer"):
        cache(student.preprocess(["one"]))


def test_tokenizer_fingerprint_does_not_change_once_the_tokenizer_is_used(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a text long enough to be cut " * 20], truncation=True, max_length=8, padding="max_length")
    assert tokenizer_fingerprint(tokenizer) == before
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tiny_model_dir))) == before


def _gist_oracle_masked(ga, gp, gn, margin, strategy, contrast_anchors, contrast_positives) -> tuple[int, int]:
    """Masked and total candidates by the GISTEmbed rule, written out independently of sentence-transformers."""

    def cos(x, y):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return x @ y.T

    ap, aa, pp, an = cos(ga, gp), cos(ga, ga), cos(gp, gp), cos(ga, gn)
    masked = total = 0
    for i in range(len(ga)):
        pos = ap[i, i]
        threshold = pos - margin if strategy == "absolute" else pos - abs(pos) * margin
        blocks = [np.delete(ap[i], i), an[i]]
        if contrast_anchors:
            blocks.append(np.delete(aa[i], i))
        if contrast_positives:
            blocks.append(np.delete(pp[i], i))
        candidates = np.concatenate(blocks)
        masked += int((candidates > threshold).sum())
        total += len(candidates)
    return masked, total


@pytest.mark.parametrize(
    ("strategy", "margin", "contrast_anchors", "contrast_positives"),
    [("absolute", 0.0, True, True), ("absolute", 0.1, False, True), ("relative", 0.2, True, False)],
)
def test_masked_fraction_is_the_mask_the_loss_used(
    student, repo_root: Path, tmp_path: Path, strategy, margin, contrast_anchors, contrast_positives
) -> None:
    rng = np.random.default_rng(0)
    batch = 6
    columns = [[f"{role} {i}" for i in range(batch)] for role in ("anchor", "positive", "negative")]
    features = [student.preprocess(texts) for texts in columns]
    keys = [key for f in features for key in feature_keys(f)]
    guide_vectors = rng.normal(size=(len(keys), 5)).astype(np.float32)
    cache = GuideEmbeddingCache(student, keys, guide_vectors, max_seq_length=32)
    settings = _settings(
        repo_root,
        tmp_path,
        margin_strategy=strategy,
        margin=margin,
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
    )
    loss = build_loss(settings.train, student, cache)
    assert type(loss).__name__ == "GISTEmbedLoss" and loss.guide is cache
    value = loss(features, None)
    assert torch.isfinite(value)
    ga, gp, gn = np.split(guide_vectors, 3)
    masked, total = _gist_oracle_masked(ga, gp, gn, margin, strategy, contrast_anchors, contrast_positives)
    assert mask_stats(loss).pop_masked_fraction() == pytest.approx(masked / total)
    assert mask_stats(loss).pop_masked_fraction() is None  # read and reset


def test_build_loss_picks_the_class_and_validates(student, repo_root: Path, tmp_path: Path) -> None:
    keys = feature_keys(student.preprocess(["x"]))
    cache = GuideEmbeddingCache(student, keys, np.ones((1, 3), dtype=np.float32), max_seq_length=32)
    settings = _settings(repo_root, tmp_path, mini_batch_size=4)
    cached = build_loss(settings.train, student, cache)
    assert type(cached).__name__ == "CachedGISTEmbedLoss" and cached.mini_batch_size == 4
    assert mask_stats(cached) is not None
    mnrl = build_loss(_settings(repo_root, tmp_path, loss="mnrl").train, student, None)
    assert type(mnrl).__name__ == "MultipleNegativesRankingLoss" and mnrl.scale == pytest.approx(100.0)
    assert mask_stats(mnrl) is None
    with pytest.raises(ValueError, match="needs a guide"):
        build_loss(settings.train, student, None)
    short = GuideEmbeddingCache(student, keys, np.ones((1, 3), dtype=np.float32), max_seq_length=16)
    with pytest.raises(ValueError, match="built at max_seq_length 16, but the student trains at 32"):
        build_loss(settings.train, student, short)


@pytest.mark.parametrize(("contrast_anchors", "contrast_positives"), [(True, True), (False, True), (True, False)])
def test_masked_candidates_split_by_label(
    student, repo_root: Path, tmp_path: Path, contrast_anchors: bool, contrast_positives: bool
) -> None:
    """Same-label and other-label masking rates equal a count written out from the GISTEmbed rule."""
    from gist_core.training.loss import LabelledBatches

    rng = np.random.default_rng(1)
    batch = 8
    row_labels = ["a", "b", "a", "c", "b", "a", "c", "c"]
    neg_labels = ["a", "c", "b", "c", "a", "b", "a", "b"]  # some negatives share the anchor's label
    columns = [[f"{role} {i}" for i in range(batch)] for role in ("anchor", "positive", "negative")]
    labels = dict(zip(columns[0] + columns[1] + columns[2], row_labels + row_labels + neg_labels, strict=True))
    labels["unlabelled text"] = "a"
    features = [student.preprocess(texts) for texts in columns]
    keys = [key for f in features for key in feature_keys(f)]
    # Guide vectors clustered by label, so the guide masks a fair share of same-label candidates.
    centres = {label: rng.normal(size=6) for label in "abc"}
    column_labels = row_labels + row_labels + neg_labels
    vectors = np.stack([centres[label] + 0.9 * rng.normal(size=6) for label in column_labels]).astype(np.float32)
    cache = GuideEmbeddingCache(student, keys, vectors, max_seq_length=32)
    settings = _settings(repo_root, tmp_path, contrast_anchors=contrast_anchors, contrast_positives=contrast_positives)
    loss = build_loss(settings.train, student, cache)
    LabelledBatches(mask_stats(loss), student, labels).attach(loss)
    loss(features, None)

    def cos(x, y):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return x @ y.T

    ga, gp, gn = np.split(vectors, 3)
    ap, aa, pp, an = cos(ga, gp), cos(ga, ga), cos(gp, gp), cos(ga, gn)
    counts = {"same": [0, 0], "other": [0, 0]}
    for i in range(batch):
        blocks = [(ap[i], row_labels, True), (an[i], neg_labels, False)]
        blocks += [(aa[i], row_labels, True)] if contrast_anchors else []
        blocks += [(pp[i], row_labels, True)] if contrast_positives else []
        for sims, candidate_labels, skip_own in blocks:
            for j, sim in enumerate(sims):
                if skip_own and j == i:
                    continue
                kind = "same" if candidate_labels[j] == row_labels[i] else "other"
                counts[kind][0] += int(sim > ap[i, i])
                counts[kind][1] += 1
    rates = mask_stats(loss).pop_counts()
    assert counts["same"][0] > 0 and counts["other"][0] > 0, "the fixture must exercise both kinds"
    assert rates["guide_masked_same_label"] == pytest.approx(counts["same"][0] / counts["same"][1])
    assert rates["guide_masked_other_label"] == pytest.approx(counts["other"][0] / counts["other"][1])
    total_masked = counts["same"][0] + counts["other"][0]
    assert rates["guide_masked_same_label_share"] == pytest.approx(counts["same"][0] / total_masked)
    assert rates["guide_masked_fraction"] == pytest.approx(total_masked / (counts["same"][1] + counts["other"][1]))
