"""The guided-loss plumbing on a tiny random model: cache keys and lookup, the masked-candidate stat,
loss construction and validation, run keys and checkpoints, and the multi-process batch samplers."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gist_core.config import settings_from_dict
from gist_core.errors import ConfigError
from gist_core.guide_cache import CacheIdentity, GuideEmbeddings, feature_keys, read_guide_cache, write_guide_cache
from gist_core.loss import GuideCacheMiss, GuideEmbeddingCache, GuideMaskStats, build_loss, mask_stats
from gist_core.train import last_checkpoint, mean_train_loss, run_key


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
    cached = GuideEmbeddings(keys, np.eye(2, 3, dtype=np.float32), ["one", "two"], retokenized=True)
    identity = CacheIdentity("g", "fp", "tok", 32, "md5")
    manifest = write_guide_cache(tmp_path / "cache", cached, identity, {"texts": 2})
    back, read_manifest = read_guide_cache(tmp_path / "cache")
    assert back.keys == keys and np.array_equal(back.embeddings, cached.embeddings)
    assert back.guide_texts == ["one", "two"]
    assert read_manifest == manifest and identity.differences(manifest) == []
    changed = CacheIdentity("other-name", "fp2", "tok", 64, "md5")
    assert [d.split(":")[0] for d in changed.differences(manifest)] == ["guide_fingerprint", "max_seq_length"]
    assert not (tmp_path / "cache.partial").exists()


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


def test_mask_stats_counts_minus_self_pairs() -> None:
    stats = GuideMaskStats(self_pairs=2)
    scores = torch.zeros(2, 9)
    scores[0, [3, 4, 7]] = -torch.inf  # two self-pairs + one masked candidate
    scores[1, [4, 7]] = -torch.inf
    stats(scores, torch.tensor([0, 1]))
    assert stats.pop_masked_fraction() == pytest.approx(1 / (2 * (9 - 1 - 2)))


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


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mini_batch_size", 64, r"mini_batch_size \(64\) is larger than batch_size \(32\)"),
        ("margin", 1.5, r"train\.margin: Input should be less than or equal to 1"),
        ("margin_strategy", "median", r"train\.margin_strategy: Input should be 'absolute' or 'relative'"),
        ("save_steps", 0, r"train\.save_steps: Input should be greater than or equal to 1"),
        ("guide_cache", "sometimes", r"train\.guide_cache: Input should be a valid boolean"),
    ],
)
def test_train_settings_are_validated(repo_root: Path, tmp_path: Path, key, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(repo_root, tmp_path, **{key: value})


def test_run_key_follows_what_changes_the_result(repo_root: Path, tmp_path: Path) -> None:
    base = _settings(repo_root, tmp_path)
    key = run_key(base, "md5", 1)
    assert run_key(_settings(repo_root, tmp_path, logging_steps=1, save_steps=3, output_dir="x"), "md5", 1) == key
    assert run_key(_settings(repo_root, tmp_path, learning_rate=1e-5), "md5", 1) != key
    assert run_key(_settings(repo_root, tmp_path, margin=0.1), "md5", 1) != key
    assert run_key(base, "other-md5", 1) != key
    assert run_key(base, "md5", 2) != key


def test_last_checkpoint_skips_incomplete_ones(tmp_path: Path) -> None:
    assert last_checkpoint(tmp_path / "none") is None
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert (tmp_path / "checkpoint-6").exists()
    assert last_checkpoint(tmp_path, remove_incomplete=True) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists()


def test_mean_train_loss_weights_each_logged_interval() -> None:
    history = [{"loss": 2.0, "step": 2}, {"loss": 1.0, "step": 3}, {"train_runtime": 1.0, "step": 3}]
    assert mean_train_loss(history) == pytest.approx((2.0 * 2 + 1.0) / 3)


def test_split_and_grouped_samplers_keep_each_global_batch_one_task_without_duplicates() -> None:
    from datasets import Dataset
    from torch.utils.data import ConcatDataset

    from gist_core.batching import GroupedProportionalFactory, SplitBatchSamplerFactory

    rng = np.random.default_rng(1)
    datasets = []
    for task in range(3):
        # Each row holds three distinct texts; rows share texts often (a small pool).
        picks = [rng.choice(100, size=3, replace=False) for _ in range(40 + 10 * task)]
        rows = {c: [f"t{task}-{p[k]}" for p in picks] for k, c in enumerate(("anchor", "positive", "negative"))}
        datasets.append(Dataset.from_dict(rows))
    parts, batch_size = 2, 4
    make_batch_sampler = SplitBatchSamplerFactory("no_duplicates", parts)
    generator = torch.Generator()
    samplers = [make_batch_sampler(d, batch_size, False, generator=generator, seed=3) for d in datasets]
    concat = ConcatDataset(datasets)
    sampler = GroupedProportionalFactory(parts)(concat, samplers, generator=generator, seed=3)
    batches = list(sampler)
    assert batches and len(batches) % parts == 0 and len(batches) <= len(sampler)
    offsets = list(itertools.accumulate(len(d) for d in datasets))
    for start in range(0, len(batches), parts):
        group = batches[start : start + parts]
        assert all(len(b) == batch_size for b in group)
        indices = [i for b in group for i in b]
        tasks = {next(t for t, end in enumerate(offsets) if i < end) for i in indices}
        assert len(tasks) == 1, "a global batch mixes tasks"
        texts = [concat[i][c] for i in indices for c in ("anchor", "positive", "negative")]
        assert len(texts) == len(set(texts)), "a global batch repeats a text"
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch, like sentence-transformers' samplers


@pytest.mark.parametrize(("contrast_anchors", "contrast_positives"), [(True, True), (False, True), (True, False)])
def test_masked_candidates_split_by_label(
    student, repo_root: Path, tmp_path: Path, contrast_anchors: bool, contrast_positives: bool
) -> None:
    """Same-label and other-label masking rates equal a count written out from the GISTEmbed rule."""
    from gist_core.loss import LabelledBatches

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
