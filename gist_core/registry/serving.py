"""Consuming registered models: download a version, load it by alias or number, embed texts with it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_core.config import Settings
from gist_core.errors import RegistryError
from gist_core.registry.client import Store, client, fluent_uri, model_name, retry, target_of
from gist_core.registry.tags import CHAMPION
from gist_core.registry.versions import alias_holder

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def download_version(store: Store, version: str, dest: Path, name: str | None = None) -> Path:
    """Download a version's sentence-transformers folder to ``dest`` (replaced in one rename)."""
    # deferred: mlflow takes seconds to import
    import mlflow
    from mlflow.sentence_transformers import SENTENCE_TRANSFORMERS_DATA_PATH

    target, name = target_of(store), model_name(store, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with fluent_uri(target):
            local = retry(
                target,
                f"downloading {name} version {version}",
                mlflow.artifacts.download_artifacts,
                artifact_uri=f"models:/{name}/{version}",
                dst_path=str(scratch / "mlflow-model"),
            )
        folder = Path(local) / SENTENCE_TRANSFORMERS_DATA_PATH
        if not (folder / "modules.json").is_file():
            raise RegistryError(f"models:/{name}/{version} is not a sentence-transformers model")
        old = scratch / "old"
        if dest.exists():
            dest.rename(old)
        folder.rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def version_number(store: Store, alias_or_version: str, name: str | None = None) -> str:
    """A version number from a number or an alias (raises when the alias is not set)."""
    if alias_or_version.isdigit():
        return alias_or_version
    target, name = target_of(store), model_name(store, name)
    number = alias_holder(target, client(target), name, alias_or_version)
    if number is None:
        raise RegistryError(f"{name!r} has no version with alias {alias_or_version!r} in {target.uri}")
    return number


def load_model(store: Store, alias_or_version: str = CHAMPION, name: str | None = None) -> SentenceTransformer:
    """Load a registered version (by alias or number) as a SentenceTransformer."""
    # deferred: mlflow takes seconds to import
    import mlflow

    target, name = target_of(store), model_name(store, name)
    sep = "/" if alias_or_version.isdigit() else "@"
    uri = f"models:/{name}{sep}{alias_or_version}"
    try:
        with fluent_uri(target):
            return retry(target, f"loading {uri}", mlflow.sentence_transformers.load_model, uri)
    except RegistryError:
        raise
    except Exception as err:  # noqa: BLE001
        raise RegistryError(f"could not load {uri} from {target.uri}: {err}") from err


def load_champion(settings_or_uri: Settings | str, name: str | None = None) -> SentenceTransformer:
    """``models:/NAME@champion`` as a SentenceTransformer.

    Args:
        settings_or_uri: Settings (``registry.tracking_uri``), or a tracking URI such as
            ``sqlite:///mlflow.db`` or ``http://127.0.0.1:5000``.
        name: the registered model name (default ``registry.model_name``).
    """
    return load_model(settings_or_uri, CHAMPION, name)


def encode(
    settings_or_uri: Settings | str, texts: Iterable[str], name: str | None = None, alias: str = CHAMPION
) -> dict[str, Any]:
    """Embed ``texts`` with a registered version: ``{model_uri, version, dimension, embeddings}``."""
    target, name = target_of(settings_or_uri), model_name(settings_or_uri, name)
    texts = list(texts)
    number = version_number(target, alias, name)
    model = load_model(target, number, name)
    vectors = model.encode(texts, convert_to_numpy=True)
    return {
        "model_uri": f"models:/{name}/{number}",
        "version": number,
        "dimension": int(vectors.shape[1]) if vectors.ndim == 2 and len(texts) else None,
        "embeddings": [[float(x) for x in row] for row in vectors],
    }
