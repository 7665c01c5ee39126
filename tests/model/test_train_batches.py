"""The paper's batches: with task_homogeneous_batches every training batch comes from one task and holds no
text twice (sentence-transformers' PROPORTIONAL multi-dataset sampler over NO_DUPLICATES samplers)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from gist_core.config import settings_from_dict
from gist_core.training.train_data import build_train_dataset
from gist_core.training.trainer import training_arguments
from tests.support.triplets import write_triplets

pytestmark = pytest.mark.slow
COLUMNS = ("anchor", "positive", "negative")


@pytest.fixture(scope="module")
def triplets(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_triplets(repo_root, tmp_path_factory.mktemp("batches") / "triplets.parquet", per_task=60, seed=2)


def _epoch_batches(repo_root: Path, tmp_path: Path, triplets: Path, model_dir: Path, homogeneous: bool):
    """Every batch (as rows of the training data) the trainer's own data loader draws in one epoch."""
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["train"].update({"batch_size": 16, "task_homogeneous_batches": homogeneous})
    settings = settings_from_dict(raw, tmp_path)
    dataset = build_train_dataset(triplets, homogeneous)
    model = SentenceTransformer(str(model_dir), device="cpu")
    args = training_arguments(settings, tmp_path / "run", "cpu", processes=1)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model)
    )
    sampler = trainer.get_train_dataloader().batch_sampler
    parts = list(dataset.items()) if homogeneous else [("all", dataset)]
    offsets = [0, *itertools.accumulate(len(d) for _, d in parts)]

    def row(index: int) -> tuple[str, dict]:
        part = next(p for p in range(len(parts)) if index < offsets[p + 1])
        name, data = parts[part]
        return name, data[index - offsets[part]]

    return [[row(i) for i in batch] for batch in sampler], sum(len(d) for _, d in parts)


def test_every_batch_is_one_task_without_duplicate_texts(
    repo_root: Path, tmp_path: Path, triplets: Path, tiny_model_dir: Path
) -> None:
    batches, rows = _epoch_batches(repo_root, tmp_path, triplets, tiny_model_dir, homogeneous=True)
    assert len(batches) >= rows // 16 and sum(len(b) for b in batches) >= rows * 0.9
    for batch in batches:
        assert len({task for task, _ in batch}) == 1, "a batch mixes tasks"
        texts = [values[c] for _, values in batch for c in COLUMNS]
        assert len(texts) == len(set(texts)), "a batch holds a text twice"
    assert len({batch[0][0] for batch in batches}) == 3, "all three tasks take turns"


def test_without_task_homogeneous_batches_tasks_mix(
    repo_root: Path, tmp_path: Path, triplets: Path, tiny_model_dir: Path
) -> None:
    import pandas as pd

    frame = pd.read_parquet(triplets)
    task_of = dict(zip(frame["anchor"], frame["task_name"], strict=True))
    batches, _ = _epoch_batches(repo_root, tmp_path, triplets, tiny_model_dir, homogeneous=False)
    assert any(len({task_of[values["anchor"]] for _, values in batch}) > 1 for batch in batches)


def test_multi_process_sampler_factories_survive_a_checkpoint(tmp_path: Path) -> None:
    """The trainer pickles its arguments into every checkpoint and logs them as JSON: the factories must allow both."""
    import pickle

    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments

    from gist_core.training.batching import GroupedProportionalFactory, SplitBatchSamplerFactory

    batch_sampler, multi_sampler = SplitBatchSamplerFactory("no_duplicates", 2), GroupedProportionalFactory(2)
    assert pickle.loads(pickle.dumps(batch_sampler)) == batch_sampler
    assert pickle.loads(pickle.dumps(multi_sampler)) == multi_sampler
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"),
        batch_sampler=batch_sampler,
        multi_dataset_batch_sampler=multi_sampler,
        use_cpu=True,
        report_to="none",
    )
    torch.save(args, tmp_path / "training_args.bin")  # what a checkpoint holds
    restored = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert (restored.batch_sampler, restored.multi_dataset_batch_sampler) == (batch_sampler, multi_sampler)
    assert args.to_json_string()


def test_many_tasks_start_quickly_and_the_model_card_lists_them(
    repo_root: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """With hundreds of tasks the model card's statistics cover a sample (start-up in seconds), every task listed."""
    import pandas as pd

    from gist_core.training.trainer import MODEL_CARD_FULL_STATS_TASKS, train

    rows = [
        (f"anchor {t}-{i}", f"positive {t}-{i}", f"negative {t}-{i}", f"task_{t:02d}")
        for t in range(MODEL_CARD_FULL_STATS_TASKS + 4)
        for i in range(6 + t)
    ]
    path = tmp_path / "many.parquet"
    pd.DataFrame(rows, columns=["anchor", "positive", "negative", "task_name"]).to_parquet(path)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"].update({"student": str(tiny_model_dir), "guide": str(tiny_model_dir)})
    raw["train"].update({"max_steps": 1, "batch_size": 4, "save_steps": None, "guide_cache": False, "loss": "mnrl"})
    result = train(settings_from_dict(raw, tmp_path), path)
    card = (result.output_dir / "README.md").read_text()
    assert result.steps == 1 and "task_19" in card and "Size: 25 training samples" in card
