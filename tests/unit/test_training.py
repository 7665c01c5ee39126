"""Training pieces that need no model: settings validation, run keys, checkpoints, the loss statistics,
and the multi-process batch samplers."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from gist_core.config import settings_from_dict
from gist_core.errors import ConfigError
from gist_core.training.loss import GuideMaskStats
from gist_core.training.train_data import task_groups, task_sorted_arrow, text_labels
from gist_core.training.trainer import last_checkpoint, mean_train_loss, run_key


def _settings(repo_root: Path, tmp: Path, **train):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["train"].update(train)
    return settings_from_dict(raw, tmp)


def test_mask_stats_counts_minus_self_pairs() -> None:
    stats = GuideMaskStats(self_pairs=2)
    scores = torch.zeros(2, 9)
    scores[0, [3, 4, 7]] = -torch.inf  # two self-pairs + one masked candidate
    scores[1, [4, 7]] = -torch.inf
    stats(scores, torch.tensor([0, 1]))
    assert stats.pop_masked_fraction() == pytest.approx(1 / (2 * (9 - 1 - 2)))


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


MODELS = {"student": "s" * 64, "guide": "g" * 64}


def test_run_key_follows_what_changes_the_result(repo_root: Path, tmp_path: Path) -> None:
    """Content decides the key: data, train settings, seed, model fingerprints, code; never paths or names."""
    base = _settings(repo_root, tmp_path)
    key = run_key(base, "md5", 1, MODELS, "code")
    same = _settings(repo_root, tmp_path, logging_steps=1, save_steps=3, output_dir="x", cached_models=0)
    assert run_key(same, "md5", 1, MODELS, "code") == key
    moved = settings_from_dict({**yaml.safe_load((repo_root / "params.yaml").read_text())}, tmp_path / "elsewhere")
    assert run_key(moved, "md5", 1, MODELS, "code") == key, "where the project lives is not content"
    renamed = base.model_copy(update={"base": base.base.model_copy(update={"student": "my-copy-of-minilm"})})
    assert run_key(renamed, "md5", 1, MODELS, "code") == key, "a model's name is not its content"
    assert run_key(_settings(repo_root, tmp_path, learning_rate=1e-5), "md5", 1, MODELS, "code") != key
    assert run_key(_settings(repo_root, tmp_path, margin=0.1), "md5", 1, MODELS, "code") != key
    assert run_key(base, "other-md5", 1, MODELS, "code") != key
    assert run_key(base, "md5", 2, MODELS, "code") != key
    assert run_key(base, "md5", 1, {**MODELS, "student": "t" * 64}, "code") != key
    assert run_key(base, "md5", 1, {**MODELS, "guide": "h" * 64}, "code") != key
    assert run_key(base, "md5", 1, MODELS, "other code") != key
    reseeded = base.model_copy(update={"base": base.base.model_copy(update={"seed": 7})})
    assert run_key(reseeded, "md5", 1, MODELS, "code") != key
    # without a guide in the loss, the guide's weights do not matter
    mnrl = _settings(repo_root, tmp_path, loss="mnrl")
    assert run_key(mnrl, "md5", 1, MODELS, "c") == run_key(mnrl, "md5", 1, {**MODELS, "guide": "h" * 64}, "c")


def test_training_code_hash_covers_the_package_and_the_libraries(monkeypatch) -> None:
    from gist_core.training import trainer

    before = trainer.training_code_hash()
    assert before == trainer.training_code_hash()
    monkeypatch.setattr(trainer, "runtime_libraries", lambda: "sentence-transformers==99 transformers==1 torch==1")
    assert trainer.training_code_hash() != before


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


def test_the_task_sorted_file_is_written_a_bounded_group_of_tasks_at_a_time(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tasks = [f"task_{t}" for t in rng.integers(0, 7, size=200)] + ["Émotion", "zeta"]  # non-ASCII sorts by bytes
    table = pa.table(
        {
            "task_name": tasks,
            "anchor": [f"a{i}" for i in range(len(tasks))],
            "positive": [f"p{i}" for i in range(len(tasks))],
            "negative": [f"n{i}" for i in range(len(tasks))],
            "anchor_label": [""] * len(tasks),
        }
    )
    path = tmp_path / "triplets.parquet"
    pq.write_table(table, path, row_group_size=37)
    groups = task_groups(table["task_name"], rows_per_pass=60)
    assert [t for g in groups for t in g] == sorted(set(tasks), key=lambda t: t.encode())
    counts = {t: tasks.count(t) for t in set(tasks)}
    assert all(sum(counts[t] for t in g) <= 60 or len(g) == 1 for g in groups) and len(groups) > 2
    written = task_sorted_arrow(path, tmp_path / "arrow", rows_per_pass=60)
    with pa.memory_map(str(written)) as source:
        got = pa.ipc.open_stream(source).read_all()
    expected = table.select(["task_name", "anchor", "positive", "negative"])
    expected = expected.take(pa.compute.sort_indices(expected, sort_keys=[("task_name", "ascending")]))
    assert got.equals(expected)  # the one-pass sort's result: by task, file order within a task
    assert task_sorted_arrow(path, tmp_path / "arrow") == written  # once per data version
    grouped = tmp_path / "grouped.parquet"  # written task by task, as MEDI is: passes skip row groups
    pq.write_table(table.take(pa.compute.sort_indices(table, sort_keys=[("task_name", "descending")])), grouped)
    pq.write_table(pq.read_table(grouped), grouped, row_group_size=16)
    again = task_sorted_arrow(grouped, tmp_path / "arrow2", rows_per_pass=60)
    with pa.memory_map(str(again)) as source:
        assert pa.ipc.open_stream(source).read_all().equals(expected)


def test_text_labels_reads_labelled_rows_only_and_leaves_out_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "triplets.parquet"
    table = pa.table(
        {
            "task_name": ["emotion", "emotion", "emotion", "medi_task", "banking"],
            "anchor": ["happy day", "sad day", "odd one", "a MEDI query", "odd one"],
            "positive": ["great day", "bad day", "x", "a MEDI passage", "y"],
            "negative": ["bad day", "great day", "z", "another passage", "w"],
            "anchor_label": ["joy", "sadness", "joy", "", None],
            "positive_label": ["joy", "sadness", "sadness", "", None],
            "negative_label": ["sadness", "joy", "fear", "", None],
        }
    )
    pq.write_table(table, path, row_group_size=2)  # the filter runs per row group
    labels = text_labels(path)
    assert labels["happy day"] == "emotion:joy"
    assert labels["bad day"] == "emotion:sadness"  # as a positive and as a negative: one label
    assert "odd one" in labels  # labelled once (the banking row has no label)
    assert "a MEDI query" not in labels and "y" not in labels  # unlabelled rows add nothing
    conflicted = pq.read_table(path).to_pylist()
    conflicted[2]["anchor_label"] = "fear"
    conflicted.append({**conflicted[0], "anchor_label": "sadness"})  # "happy day" seen with two labels
    pq.write_table(pa.Table.from_pylist(conflicted), path)
    assert "happy day" not in text_labels(path)
    pq.write_table(table.drop_columns(["anchor_label", "positive_label", "negative_label"]), path)
    assert text_labels(path) == {}


def test_mean_train_loss_weights_each_logged_interval() -> None:
    history = [{"loss": 2.0, "step": 2}, {"loss": 1.0, "step": 3}, {"train_runtime": 1.0, "step": 3}]
    assert mean_train_loss(history) == pytest.approx((2.0 * 2 + 1.0) / 3)


def test_split_and_grouped_samplers_keep_each_global_batch_one_task_without_duplicates() -> None:
    from datasets import Dataset
    from torch.utils.data import ConcatDataset

    from gist_core.training.batching import GroupedProportionalFactory, SplitBatchSamplerFactory

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


def test_a_split_pass_yields_exactly_its_advertised_length_even_with_many_repeats() -> None:
    """Under DDP a pass that yields fewer batches than len() leaves a process waiting forever: never."""
    from datasets import Dataset

    from gist_core.training.batching import SplitBatchSamplerFactory

    rng = np.random.default_rng(0)
    # 60 rows over a pool of 45 texts: one no-duplicates pass cannot fill 60 // 8 = 7 batches of 8 rows (24 texts)
    picks = [rng.choice(45, size=3, replace=False) for _ in range(60)]
    rows = {c: [f"t{p[k]}" for p in picks] for k, c in enumerate(("anchor", "positive", "negative"))}
    dataset = Dataset.from_dict(rows)
    for kind in ("no_duplicates", "no_duplicates_hashed"):
        sampler = SplitBatchSamplerFactory(kind, 2)(dataset, 4, True, generator=torch.Generator(), seed=1)
        one_pass = [
            b for b in sampler.inner._iter_one_pass(lambda i: set(dataset[i].values()), lambda v, b: bool(v & b))
        ]
        assert len(one_pass) < 7, "the fixture must need more than one pass"
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) == 14, kind
            for start in range(0, len(batches), 2):
                texts = [dataset[i][c] for b in batches[start : start + 2] for i in b for c in rows]
                assert len(texts) == len(set(texts)), "a global batch repeats a text"
    # a task that cannot give one duplicate-free global batch advertises none (and is reported)
    from gist_core.training.batching import unbatchable_tasks

    repeats = Dataset.from_dict({"anchor": ["a"] * 20, "positive": ["b"] * 20, "negative": ["c"] * 20})
    short = Dataset.from_dict({c: [f"{c}{i}" for i in range(7)] for c in rows})
    for data in (repeats, short):
        sampler = SplitBatchSamplerFactory("no_duplicates", 2)(data, 4, True, generator=torch.Generator(), seed=1)
        assert len(sampler) == 0 and list(sampler) == []
    assert unbatchable_tasks({"repeats": repeats, "short": short, "fine": dataset}, 8) == {"repeats": 20, "short": 7}
