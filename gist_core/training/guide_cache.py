"""The guide-embedding cache: the frozen guide's embedding of every training text, computed once.

A cache belongs to one guide model, student tokenizer, ``max_seq_length`` and triplets file. It
lives beside the data (``train.guide_cache_dir``, by default ``data/prepared/guide_cache``), where
the DVC stage ``guide_cache`` builds it (``gist guide-cache``) and versions it with the triplets.
Training compares the cache's manifest with what it is about to train with and rebuilds a missing
or stale cache itself, so a cache never feeds one guide's embeddings to another guide, student or
data set.

What the cache must embed is what the GIST losses show the guide:

- The student and guide share a vocabulary: the guide reads the student's own token ids.
- They do not (all-MiniLM-L6-v2 and all-mpnet-base-v2): the loss decodes the student's token ids
  and re-tokenizes the result for the guide. The guide then reads lowercased, re-spaced text, cut
  to the student's ``max_seq_length`` (and again to the guide's).

Either way the guide's input is a function of the student's token ids, so those ids (padding
removed) are the key: the loss only ever sees tokenized features, and ids never collide the way
two texts that decode to the same string would.

Files: ``embeddings.npy`` (float32, one row per key), ``keys.parquet`` (``token_ids``, and
``guide_text``, the string the guide read when it re-tokenized) and ``manifest.json`` (identity,
counts, timing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from gist_core.config import Settings
from gist_core.data.schema import TEXT_COLUMNS, load_triplets
from gist_core.errors import DataError
from gist_core.hashing import file_md5
from gist_core.models import ModelRef, load_sentence_transformer, model_fingerprint
from gist_core.training.runtime import pick_device, resolve_models
from gist_core.versioning import push_to_remote, run_dvc

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

Key = tuple[int, ...]
GUIDE_CACHE_STAGE = "guide_cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
KEYS_FILE = "keys.parquet"
ENCODE_BATCH_SIZE = 64


def feature_keys(features: dict[str, Any]) -> list[Key]:
    """Each row's cache key: the student's token ids with the padding removed."""
    input_ids = features["input_ids"]
    if "cu_seq_lens_q" in features:  # a flattened (unpadded) batch: one row, split by the offsets
        flat = input_ids[0].tolist()
        bounds = features["cu_seq_lens_q"].tolist()
        return [tuple(flat[start:end]) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    rows = input_ids.tolist()
    mask = features.get("attention_mask")
    if mask is None:
        return [tuple(row) for row in rows]
    return [tuple(compress(row, keep)) for row, keep in zip(rows, mask.tolist(), strict=True)]


def must_retokenize(student: SentenceTransformer, guide: SentenceTransformer) -> bool:
    """Whether the GIST losses decode the student's tokens and re-tokenize them for this guide (their rule)."""
    return student.tokenizer.get_vocab() != guide.tokenizer.get_vocab() or guide.max_seq_length < student.max_seq_length


@dataclass
class GuideEmbeddings:
    """The guide's embeddings of a set of texts, keyed as the loss looks them up."""

    keys: list[Key]
    embeddings: np.ndarray  # float32, (len(keys), dim)
    guide_texts: list[str] | None  # what the guide read, when it re-tokenized decoded text
    retokenized: bool


def embed_like_gist_loss(
    student: SentenceTransformer,
    guide: SentenceTransformer,
    texts: Iterable[str],
    batch_size: int = ENCODE_BATCH_SIZE,
    show_progress_bar: bool = False,
) -> GuideEmbeddings:
    """Embed each distinct text with the guide exactly as ``GISTEmbedLoss`` shows it to the guide.

    Both models must carry the training ``max_seq_length``. The guide runs in eval mode (a frozen
    guide has no dropout). Texts that tokenize to the same student ids share one entry. Batches are
    sorted by length, which changes embeddings only by float rounding (about 1e-7).
    """
    # deferred: torch and sentence-transformers take seconds to import
    import torch
    from sentence_transformers.util import batch_to_device
    from tqdm.auto import tqdm

    representative: dict[Key, str] = {}
    distinct = sorted(set(texts))
    for start in range(0, len(distinct), 512):
        chunk = distinct[start : start + 512]
        for text, key in zip(chunk, feature_keys(student.preprocess(chunk)), strict=True):
            representative.setdefault(key, text)
    keys = list(representative)
    retokenized = must_retokenize(student, guide)
    guide_texts = (
        student.tokenizer.batch_decode([list(key) for key in keys], skip_special_tokens=True) if retokenized else None
    )
    order = sorted(range(len(keys)), key=lambda i: len(keys[i]))
    out = np.empty((len(keys), guide.get_embedding_dimension()), dtype=np.float32)
    was_training = guide.training
    guide.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc="Guide embeddings", disable=not show_progress_bar):
                rows = order[start : start + batch_size]
                if guide_texts is not None:
                    features = guide.preprocess([guide_texts[i] for i in rows])
                else:
                    features = student.preprocess([representative[keys[i]] for i in rows])
                embedded = guide(batch_to_device(features, guide.device))["sentence_embedding"]
                out[rows] = embedded.float().cpu().numpy()
    finally:
        guide.train(was_training)
    return GuideEmbeddings(keys=keys, embeddings=out, guide_texts=guide_texts, retokenized=retokenized)


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache was built from; a cache is valid only for exactly these."""

    guide: str
    guide_fingerprint: str
    student_tokenizer: str
    max_seq_length: int
    data_md5: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, manifest: dict[str, Any]) -> list[str]:
        """Human-readable mismatches against a cache's manifest (the guide's name alone may differ)."""
        out = []
        if manifest.get("format") != FORMAT_VERSION:
            out.append(f"format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
        recorded = manifest.get("identity") or {}  # None for a placeholder: nothing matches
        for item in fields(self):
            if item.name == "guide":
                continue  # the same weights under another name or path are the same guide
            now = getattr(self, item.name)
            if recorded.get(item.name) != now:
                out.append(f"{item.name}: cache {recorded.get(item.name)!r}, now {now!r}")
        return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides a tokenizer's ids and decoded text."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr(getattr(tokenizer, "clean_up_tokenization_spaces", None)).encode())
    return digest.hexdigest()[:16]


def cache_identity(guide_ref: ModelRef, student: SentenceTransformer, triplets: Path) -> CacheIdentity:
    return CacheIdentity(
        guide=guide_ref.ref,
        guide_fingerprint=model_fingerprint(guide_ref),
        student_tokenizer=tokenizer_fingerprint(student.tokenizer),
        max_seq_length=int(student.max_seq_length),
        data_md5=file_md5(triplets),
    )


def triplet_texts(triplets: Path) -> list[str]:
    """Every text the loss can see: the anchor, positive and negative columns (other columns are ignored)."""
    frame = load_triplets(triplets)
    return [str(text) for column in TEXT_COLUMNS for text in frame[column].tolist()]


def write_guide_cache(
    directory: Path, cached: GuideEmbeddings, identity: CacheIdentity, stats: dict[str, Any]
) -> dict[str, Any]:
    """Write the cache into ``directory``, replacing any old one; the folder is complete or absent."""
    staged = directory.with_name(directory.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    np.save(staged / EMBEDDINGS_FILE, cached.embeddings)
    texts = cached.guide_texts if cached.guide_texts is not None else [None] * len(cached.keys)
    table = pa.table(
        {
            "token_ids": pa.array([list(key) for key in cached.keys], type=pa.list_(pa.int32())),
            "guide_text": pa.array(texts, type=pa.string()),
        }
    )
    pq.write_table(table, staged / KEYS_FILE)
    manifest = {
        "format": FORMAT_VERSION,
        "identity": identity.to_dict(),
        "entries": len(cached.keys),
        "dim": int(cached.embeddings.shape[1]),
        "retokenized": cached.retokenized,
        **stats,
    }
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    old = directory.with_name(directory.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if directory.exists():
        directory.rename(old)
    staged.rename(directory)
    if old.exists():
        shutil.rmtree(old)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def read_guide_cache(directory: Path) -> tuple[GuideEmbeddings, dict[str, Any]]:
    """Read a cache written by ``write_guide_cache``."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(f"{directory}: no guide-embedding cache (run `gist guide-cache` or `dvc repro guide_cache`)")
    embeddings = np.load(directory / EMBEDDINGS_FILE)
    table = pq.read_table(directory / KEYS_FILE)
    keys = [tuple(ids) for ids in table.column("token_ids").to_pylist()]
    if not (len(keys) == embeddings.shape[0] == manifest.get("entries")):
        raise DataError(f"{directory}: keys, embeddings and manifest disagree on the number of entries")
    guide_texts = table.column("guide_text").to_pylist() if manifest.get("retokenized") else None
    return GuideEmbeddings(keys, embeddings, guide_texts, bool(manifest.get("retokenized"))), manifest


def build_guide_cache(
    directory: Path,
    triplets: Path,
    student: SentenceTransformer,
    guide_ref: ModelRef,
    device: str | None = None,
    show_progress_bar: bool = True,
    identity: CacheIdentity | None = None,
) -> dict[str, Any]:
    """Load the guide at the student's ``max_seq_length``, embed every triplet text, and write the cache."""
    identity = identity or cache_identity(guide_ref, student, triplets)
    texts = triplet_texts(triplets)
    guide = load_sentence_transformer(guide_ref, student.max_seq_length, device)
    started = time.perf_counter()
    cached = embed_like_gist_loss(student, guide, texts, show_progress_bar=show_progress_bar)
    seconds = time.perf_counter() - started
    stats = {
        "texts": len(texts),
        "seconds": round(seconds, 2),
        "entries_per_second": round(len(cached.keys) / max(seconds, 1e-9), 1),
    }
    manifest = write_guide_cache(directory, cached, identity, stats)
    log.info(
        "guide-embedding cache: %d texts (%d distinct) embedded by %s in %.1f s -> %s",
        len(texts),
        len(cached.keys),
        guide_ref.ref,
        seconds,
        directory,
    )
    return manifest


def load_or_build_guide_cache(
    directory: Path,
    triplets: Path,
    student: SentenceTransformer,
    guide_ref: ModelRef,
    device: str | None = None,
) -> tuple[GuideEmbeddings, dict[str, Any]]:
    """The cache for this guide, student and data: read when its manifest matches, else (re)built first."""
    identity = cache_identity(guide_ref, student, triplets)
    manifest = read_manifest(directory)
    if manifest is None:
        log.info("no guide-embedding cache at %s: embedding the training texts with the guide once", directory)
    else:
        stale = identity.differences(manifest)
        if not stale:
            return read_guide_cache(directory)
        log.warning("guide-embedding cache at %s is stale (%s): rebuilding it", directory, "; ".join(stale))
    build_guide_cache(directory, triplets, student, guide_ref, device, identity=identity)
    return read_guide_cache(directory)


def guide_cache_dir(settings: Settings) -> Path:
    return settings.path(settings.train.guide_cache_dir)


def build_for_settings(settings: Settings) -> dict[str, Any]:
    """The DVC stage: build the cache for the configured student, guide, training length and triplets.

    When training does not use the cache (``train.loss: mnrl`` or ``train.guide_cache: false``) it
    writes an empty placeholder instead, so the stage, and ``dvc status``, stay consistent either way.
    """
    directory = guide_cache_dir(settings)
    if not uses_guide_cache(settings):
        return write_placeholder(directory, "train.loss is not gist or train.guide_cache is false")
    student_ref, guide_ref = resolve_models(settings)
    device = pick_device()
    student = load_sentence_transformer(student_ref, settings.train.max_seq_length, device)
    return build_guide_cache(directory, settings.path(settings.data.output), student, guide_ref, device)


def write_placeholder(directory: Path, reason: str) -> dict[str, Any]:
    """An empty cache that no identity matches (training rebuilds it if it ever needs the cache)."""
    staged = directory.with_name(directory.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    manifest = {"format": FORMAT_VERSION, "identity": None, "entries": 0, "texts": 0, "seconds": 0.0, "skipped": reason}
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    staged.rename(directory)
    return manifest


def uses_guide_cache(settings: Settings) -> bool:
    return settings.train.loss == "gist" and settings.train.guide_cache


def version_guide_cache(settings: Settings, push: bool = True) -> bool:
    """``dvc repro`` (and push) the guide_cache stage, when dvc.yaml defines it."""
    dvc_yaml = settings.root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return False
    if GUIDE_CACHE_STAGE not in ((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}):
        return False
    run_dvc(settings.root, "repro", GUIDE_CACHE_STAGE, show=True)
    if push:
        push_to_remote(settings.root, GUIDE_CACHE_STAGE)
    return True
