"""The guide-embedding cache: the frozen guide's embedding of every training text, computed once.

A cache belongs to one guide model, student tokenizer, ``max_seq_length``, storage dtype and
triplets file. It lives beside the data (``train.guide_cache_dir``, by default
``data/prepared/guide_cache``), where the DVC stage ``guide_cache`` builds it (``gist guide-cache``) and
versions it with the triplets. Training compares the cache's manifest with what it is about to train
with and rebuilds a missing, stale or inconsistent cache itself, so a cache never feeds one guide's
embeddings to another guide, student or data set.

What the cache must embed is what the GIST losses show the guide:

- The student and guide share a vocabulary: the guide reads the student's own token ids.
- They do not (all-MiniLM-L6-v2 and all-mpnet-base-v2): the loss decodes the student's token ids
  and re-tokenizes the result for the guide. The guide then reads lowercased, re-spaced text, cut
  to the student's ``max_seq_length`` (and again to the guide's).

Either way the guide's input is a function of the student's token ids (padding removed), so they
are the key. At a million texts a key cannot be a Python tuple per text: each key is a 64-bit hash
of the id sequence (``token_key_hashes``) in a sorted array, with an independent 64-bit check hash
beside it. Two different sequences with the same key are a collision: the build refuses it, and a
lookup whose check hash differs is refused too, never answered with another text's embedding.

Files: ``embeddings.npy`` (float32, or float16 with ``train.guide_cache_dtype``; one row per key,
in key order), ``keys.npy`` and ``checks.npy`` (uint64) and ``manifest.json`` (identity, counts,
timing). Training memory-maps all three read-only, so processes on one host share their pages and a
step's lookup is a binary search per text: O(batch x log n), nothing loaded up front.

The build runs in chunks: the distinct texts are tokenized once (the ids kept compactly), the keys
deduplicated, and the entries embedded in length-sorted batches straight into the memory-mapped
file, through the shared embedding store (``gist_core.embedding_store``), so a text embedded before
with this guide and max length (by mining, the audit, or an earlier cache) is not embedded again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import mmap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from gist_core.config import Settings
from gist_core.data.schema import TEXT_COLUMNS
from gist_core.embedding_store import INPUT_TEXT, KEY_DTYPE, EmbeddingStore, string_keys
from gist_core.errors import DataError
from gist_core.folders import replaced_folder
from gist_core.hashing import file_md5
from gist_core.models import ModelRef, load_sentence_transformer, model_fingerprint
from gist_core.training.cache_index import (
    Key,
    KeyIndex,
    dedup,
    feature_keys,
    padded_ids,
    sequence_hashes,
    token_key_hashes,
    tokenizer_fingerprint,
)
from gist_core.training.runtime import pick_device, resolve_models
from gist_core.versioning import push_to_remote, run_dvc

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)
__all__ = ["Key", "KeyIndex", "feature_keys", "token_key_hashes"]  # the key index, as callers imported it

try:  # glibc's malloc_trim, to return freed heap during long builds (absent elsewhere: then nothing is trimmed)
    _LIBC: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - probe the symbol
except (OSError, AttributeError):
    _LIBC = None

GUIDE_CACHE_STAGE = "guide_cache"
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
KEYS_FILE = "keys.npy"
CHECKS_FILE = "checks.npy"
ENCODE_BATCH_SIZE = 64
READ_ROWS = 16_384  # rows of the triplets file read at a time
TOKENIZE_CHUNK = 256  # texts per tokenizer call: larger calls leave tens of MB of allocator fragmentation behind
STORE_FLUSH = 65_536  # new embeddings gathered before they become one shard of the store
RELEASE_ROWS = 4096  # entries written between releases of the output's pages and of freed heap
PROGRESS_SECONDS = 30.0


def must_retokenize(student: SentenceTransformer, guide: SentenceTransformer) -> bool:
    """Whether the GIST losses decode the student's tokens and re-tokenize them for this guide (their rule)."""
    return student.tokenizer.get_vocab() != guide.tokenizer.get_vocab() or guide.max_seq_length < student.max_seq_length


@dataclass
class GuideEmbeddings:
    """The guide's embeddings of a set of texts, keyed as the loss looks them up (row ``i`` is ``index.keys[i]``)."""

    index: KeyIndex
    embeddings: np.ndarray  # (len(index), dim), float32 or float16; may be memory-mapped
    retokenized: bool

    @property
    def entries(self) -> int:
        return len(self.index)


@dataclass
class _Tokenized:
    """Every distinct text's student token ids, compactly: flat ids plus offsets."""

    ids: np.ndarray
    offsets: np.ndarray
    extra: dict[str, Any]  # the non-tensor entries of the student's features (e.g. ``modality``)

    def rows(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = self.offsets[items + 1] - self.offsets[items]
        ids = np.zeros((len(items), int(lengths.max(initial=0))), dtype=np.int64)
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        positions = self.offsets[items][:, None] + np.arange(ids.shape[1])[None, :]
        ids[mask] = self.ids[positions[mask]]
        return ids, mask


TextSource = Sequence[str] | Path


def _text_batches(texts: TextSource) -> Iterator[list[str]]:
    """The texts in batches: a triplets file's text columns streamed by row groups, or a list as given."""
    if isinstance(texts, Path):
        if not texts.is_file():
            raise DataError(f"{texts}: prepared triplets not found; run `gist data` (or `dvc repro data`) first")
        parquet = pq.ParquetFile(texts)
        for column in TEXT_COLUMNS:
            for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=[column]):
                yield [str(t) for t in batch.column(0).to_pylist()]
        return
    items = list(texts)
    for begin in range(0, len(items), READ_ROWS):
        yield items[begin : begin + READ_ROWS]


def _tokenize_distinct(
    student: SentenceTransformer, texts: TextSource
) -> tuple[_Tokenized, np.ndarray, np.ndarray, np.ndarray, int]:
    """Tokenize each distinct text once, streaming: (ids, key and check hashes, string keys, number of texts).

    A first pass keeps a 128-bit key per text to find the distinct ones; a second tokenizes those.
    """
    string_key_parts = [string_keys(batch) for batch in _text_batches(texts)]
    all_keys = np.concatenate(string_key_parts) if string_key_parts else np.empty(0, KEY_DTYPE)
    del string_key_parts
    _, first = np.unique(all_keys, return_index=True)
    is_first = np.zeros(len(all_keys), dtype=bool)
    is_first[first] = True
    distinct_keys = all_keys[np.sort(first)]
    dtype = np.uint16 if len(student.tokenizer) < 2**16 else np.int32
    parts, lengths, keys, checks = [], [], [], []
    extra: dict[str, Any] = {}
    offset = 0
    for batch in _text_batches(texts):
        chosen = [t for t, keep in zip(batch, is_first[offset : offset + len(batch)], strict=True) if keep]
        offset += len(batch)
        for begin in range(0, len(chosen), TOKENIZE_CHUNK):
            features = student.preprocess(chosen[begin : begin + TOKENIZE_CHUNK])
            extra = {k: v for k, v in features.items() if not hasattr(v, "shape")}
            ids, mask = padded_ids(features)
            key, check = sequence_hashes(ids, mask)
            keys.append(key)
            checks.append(check)
            parts.append(ids[mask].astype(dtype))
            lengths.append(mask.sum(axis=1))
    offsets = np.zeros(len(distinct_keys) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    flat = np.concatenate(parts) if parts else np.empty(0, dtype)
    empty = np.empty(0, np.uint64)
    keys_all = np.concatenate(keys) if keys else empty
    checks_all = np.concatenate(checks) if checks else empty
    return _Tokenized(flat, offsets, extra), keys_all, checks_all, distinct_keys, len(all_keys)


def _release_pages(out: np.ndarray) -> None:
    """Write and drop a memory-mapped output's pages (they stay on disk), and return freed heap to the system."""
    mapped = getattr(out, "_mmap", None)
    if isinstance(out, np.memmap) and mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        out.flush()
        mapped.madvise(mmap.MADV_DONTNEED)
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def store_input_form(student: SentenceTransformer, guide: SentenceTransformer, retokenized: bool) -> str:
    """How the cache's inputs reach the guide, for the embedding store's identity (``INPUT_TEXT`` when as a string)."""
    if retokenized:
        return INPUT_TEXT  # the decoded string, tokenized by the guide
    same = tokenizer_fingerprint(student.tokenizer) == tokenizer_fingerprint(guide.tokenizer)
    return INPUT_TEXT if same else f"student-tokens:{tokenizer_fingerprint(student.tokenizer)}"


def embed_like_gist_loss(
    student: SentenceTransformer,
    guide: SentenceTransformer,
    texts: TextSource,
    batch_size: int = ENCODE_BATCH_SIZE,
    show_progress_bar: bool = False,
    allocate: Callable[[tuple[int, int]], np.ndarray] | None = None,
    store: EmbeddingStore | None = None,
    stats: dict[str, Any] | None = None,
) -> GuideEmbeddings:
    """Embed each distinct text with the guide exactly as ``GISTEmbedLoss`` shows it to the guide.

    Both models must carry the training ``max_seq_length``. The guide runs in eval mode (a frozen
    guide has no dropout). Texts that tokenize to the same student ids share one entry. Batches are
    sorted by length, which changes embeddings only by float rounding (about 1e-7). ``allocate``
    makes the output array (default: float32 in memory; the stage passes a memory-mapped file);
    ``store`` is the embedding store to read from and add to; ``stats`` receives counts and seconds.
    """
    # deferred: torch and sentence-transformers take seconds to import
    import torch
    from sentence_transformers.util import batch_to_device
    from tqdm.auto import tqdm

    started = time.perf_counter()
    tokenized, key, check, text_keys, total = _tokenize_distinct(student, texts)
    index, first, _ = dedup(key, check, "guide-embedding cache")
    retokenized = must_retokenize(student, guide)
    dim = guide.get_embedding_dimension()
    out = allocate((len(index), dim)) if allocate is not None else np.empty((len(index), dim), dtype=np.float32)
    lengths = tokenized.offsets[first + 1] - tokenized.offsets[first]
    order = np.argsort(lengths, kind="stable")  # entry rows, shortest first
    tokenize_seconds = time.perf_counter() - started
    counts = {"texts": total, "distinct_texts": len(text_keys), "entries": len(index), "embedded": 0}
    pending_keys: list[np.ndarray] = []
    pending_vectors: list[np.ndarray] = []
    forward_seconds, last_log, since_release = 0.0, time.perf_counter(), 0

    def flush() -> None:
        if store is not None and pending_keys:
            store.add(np.concatenate(pending_keys), np.concatenate(pending_vectors))
        pending_keys.clear()
        pending_vectors.clear()

    was_training = guide.training
    guide.eval()
    bar = tqdm(total=len(index), desc="Guide embeddings", disable=not show_progress_bar, mininterval=5.0)
    try:
        with torch.no_grad():
            for begin in range(0, len(order), TOKENIZE_CHUNK):
                rows = order[begin : begin + TOKENIZE_CHUNK]
                ids, mask = tokenized.rows(first[rows])
                if retokenized:
                    inputs = student.tokenizer.batch_decode(
                        [r[m].tolist() for r, m in zip(ids, mask, strict=True)], skip_special_tokens=True
                    )
                    skeys = string_keys(inputs)
                else:  # the guide reads the student's ids; the store knows the input by its text's key
                    skeys = text_keys[first[rows]]
                found, vectors = store.lookup(skeys, dim) if store is not None else (np.zeros(len(rows), bool), None)
                if vectors is not None and found.any():
                    out[rows[found]] = vectors[found]
                todo = np.flatnonzero(~found)
                tick = time.perf_counter()
                for b in range(0, len(todo), batch_size):
                    batch = todo[b : b + batch_size]
                    if retokenized:
                        features = guide.preprocess([inputs[i] for i in batch])
                    else:
                        width = int(mask[batch].sum(axis=1).max())
                        features = {
                            "input_ids": torch.from_numpy(ids[batch, :width]),
                            "token_type_ids": torch.zeros((len(batch), width), dtype=torch.long),
                            "attention_mask": torch.from_numpy(mask[batch, :width].astype(np.int64)),
                            **tokenized.extra,
                        }
                    embedded = guide(batch_to_device(features, guide.device))["sentence_embedding"]
                    vectors_now = embedded.float().cpu().numpy()
                    out[rows[batch]] = vectors_now
                    pending_keys.append(skeys[batch])
                    pending_vectors.append(vectors_now)
                forward_seconds += time.perf_counter() - tick
                counts["embedded"] += len(todo)
                if sum(len(k) for k in pending_keys) >= STORE_FLUSH:
                    flush()
                since_release += len(rows)
                if since_release >= RELEASE_ROWS:
                    since_release = 0
                    _release_pages(out)
                bar.update(len(rows))
                if time.perf_counter() - last_log > PROGRESS_SECONDS:
                    last_log = time.perf_counter()
                    log.info(
                        "guide cache: %d of %d entries (%d embedded, %d from the store), %.0f s",
                        begin + len(rows),
                        len(index),
                        counts["embedded"],
                        begin + len(rows) - counts["embedded"],
                        last_log - started,
                    )
            flush()
    finally:
        bar.close()
        guide.train(was_training)
    if stats is not None:
        stats.update(
            counts,
            from_store=len(index) - counts["embedded"],
            tokenize_seconds=round(tokenize_seconds, 2),
            embed_seconds=round(forward_seconds, 2),
        )
    return GuideEmbeddings(index=index, embeddings=out, retokenized=retokenized)


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache was built from; a cache is valid only for exactly these."""

    guide: str
    guide_fingerprint: str
    student_tokenizer: str
    max_seq_length: int
    data_md5: str
    dtype: str = "float32"

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


def cache_identity(
    guide_ref: ModelRef, student: SentenceTransformer, triplets: Path, dtype: str = "float32"
) -> CacheIdentity:
    return CacheIdentity(
        guide=guide_ref.ref,
        guide_fingerprint=model_fingerprint(guide_ref),
        student_tokenizer=tokenizer_fingerprint(student.tokenizer),
        max_seq_length=int(student.max_seq_length),
        data_md5=file_md5(triplets),
        dtype=dtype,
    )


def triplet_texts(triplets: Path) -> pa.ChunkedArray:
    """Every text the loss can see: the anchor, positive and negative columns (other columns are not read)."""
    if not triplets.is_file():
        raise DataError(f"{triplets}: prepared triplets not found; run `gist data` (or `dvc repro data`) first")
    table = pq.read_table(triplets, columns=list(TEXT_COLUMNS))
    return pa.chunked_array([chunk.cast(pa.large_string()) for c in TEXT_COLUMNS for chunk in table[c].chunks])


# What one build did (timings, what came from the store): returned and logged, never in the manifest,
# so the DVC output is a function of its inputs and a rebuild elsewhere leaves dvc.lock unchanged.
RUN_STATS = ("embedded", "from_store", "tokenize_seconds", "embed_seconds", "seconds", "entries_per_second")


def _manifest(cached: GuideEmbeddings, identity: CacheIdentity, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "identity": identity.to_dict(),
        "entries": cached.entries,
        "dim": int(cached.embeddings.shape[1]),
        "dtype": str(np.dtype(cached.embeddings.dtype)),
        "retokenized": cached.retokenized,
        **{k: v for k, v in stats.items() if k not in RUN_STATS},
    }


def write_guide_cache(
    directory: Path, cached: GuideEmbeddings, identity: CacheIdentity, stats: dict[str, Any]
) -> dict[str, Any]:
    """Write an in-memory cache into ``directory``, replacing any old one; the folder is complete or absent."""
    with replaced_folder(directory) as staged:
        np.save(staged / EMBEDDINGS_FILE, np.asarray(cached.embeddings, dtype=identity.dtype))
        np.save(staged / KEYS_FILE, cached.index.keys)
        np.save(staged / CHECKS_FILE, cached.index.checks)
        manifest = {**_manifest(cached, identity, stats), "dtype": identity.dtype}
        (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest | {k: stats[k] for k in RUN_STATS if k in stats}


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def read_guide_cache(directory: Path) -> tuple[GuideEmbeddings, dict[str, Any]]:
    """Memory-map a cache (read-only), refusing one whose index, embeddings and manifest disagree."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(f"{directory}: no guide-embedding cache (run `gist guide-cache` or `dvc repro guide_cache`)")
    try:
        embeddings = np.load(directory / EMBEDDINGS_FILE, mmap_mode="r")
        index = KeyIndex(np.load(directory / KEYS_FILE, mmap_mode="r"), np.load(directory / CHECKS_FILE, mmap_mode="r"))
    except (OSError, ValueError) as err:
        raise DataError(f"{directory}: the guide-embedding cache cannot be read ({err}); refused") from None
    where = f"{directory}: guide-embedding cache refused"
    if not (len(index.keys) == len(index.checks) == embeddings.shape[0] == manifest.get("entries")):
        raise DataError(
            f"{where}: keys ({len(index.keys)}), checks ({len(index.checks)}), embeddings ({embeddings.shape[0]}) "
            f"and manifest ({manifest.get('entries')}) disagree on the number of entries"
        )
    if str(embeddings.dtype) != manifest.get("dtype") or embeddings.ndim != 2:
        raise DataError(f"{where}: embeddings are {embeddings.dtype}, the manifest says {manifest.get('dtype')}")
    index.validate(where)
    return GuideEmbeddings(index, embeddings, bool(manifest.get("retokenized"))), manifest


def build_guide_cache(
    directory: Path,
    triplets: Path,
    student: SentenceTransformer,
    guide_ref: ModelRef,
    device: str | None = None,
    show_progress_bar: bool = True,
    identity: CacheIdentity | None = None,
    dtype: str = "float32",
    store_root: Path | None = None,
) -> dict[str, Any]:
    """Load the guide at the student's ``max_seq_length``, embed every triplet text in chunks, write the cache."""
    identity = identity or cache_identity(guide_ref, student, triplets, dtype)
    guide = load_sentence_transformer(guide_ref, student.max_seq_length, device)
    store = None
    if store_root is not None:
        form = store_input_form(student, guide, must_retokenize(student, guide))
        store = EmbeddingStore(store_root, identity.guide_fingerprint, int(student.max_seq_length), form)
    started = time.perf_counter()
    stats: dict[str, Any] = {}
    with replaced_folder(directory) as staged:

        def allocate(shape: tuple[int, int]) -> np.ndarray:
            return np.lib.format.open_memmap(staged / EMBEDDINGS_FILE, mode="w+", dtype=identity.dtype, shape=shape)

        cached = embed_like_gist_loss(
            student, guide, triplets, show_progress_bar=show_progress_bar, allocate=allocate, store=store, stats=stats
        )
        if isinstance(cached.embeddings, np.memmap):
            cached.embeddings.flush()
        np.save(staged / KEYS_FILE, cached.index.keys)
        np.save(staged / CHECKS_FILE, cached.index.checks)
        seconds = time.perf_counter() - started
        stats.update(seconds=round(seconds, 2), entries_per_second=round(cached.entries / max(seconds, 1e-9), 1))
        manifest = _manifest(cached, identity, stats)
        (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        del cached
    log.info(
        "guide-embedding cache: %d texts (%d entries; %d embedded, %d from the store) by %s in %.1f s -> %s",
        stats["texts"],
        stats["entries"],
        stats["embedded"],
        stats["from_store"],
        guide_ref.ref,
        seconds,
        directory,
    )
    return manifest | {k: stats[k] for k in RUN_STATS if k in stats}


def load_or_build_guide_cache(
    directory: Path,
    triplets: Path,
    student: SentenceTransformer,
    guide_ref: ModelRef,
    device: str | None = None,
    dtype: str = "float32",
    store_root: Path | None = None,
) -> tuple[GuideEmbeddings, dict[str, Any]]:
    """The cache for this guide, student and data: read when its manifest matches and it is whole, else (re)built."""
    identity = cache_identity(guide_ref, student, triplets, dtype)
    manifest = read_manifest(directory)
    if manifest is None:
        log.info("no guide-embedding cache at %s: embedding the training texts with the guide once", directory)
    else:
        stale = identity.differences(manifest)
        if not stale:
            try:
                return read_guide_cache(directory)
            except DataError as err:
                log.warning("%s: rebuilding it", err)
        else:
            log.warning("guide-embedding cache at %s is stale (%s): rebuilding it", directory, "; ".join(stale))
    build_guide_cache(directory, triplets, student, guide_ref, device, identity=identity, store_root=store_root)
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
    triplets = settings.path(settings.data.output)
    dtype, root = settings.train.guide_cache_dtype, store_root(settings)
    return build_guide_cache(directory, triplets, student, guide_ref, device, dtype=dtype, store_root=root)


def store_root(settings: Settings) -> Path | None:
    """The shared embedding store (``data.mining.cache_dir``), or None when it is switched off."""
    cache_dir = settings.data.mining.cache_dir
    return settings.path(cache_dir) if cache_dir else None


def write_placeholder(directory: Path, reason: str) -> dict[str, Any]:
    """An empty cache that no identity matches (training rebuilds it if it ever needs the cache)."""
    manifest = {"format": FORMAT_VERSION, "identity": None, "entries": 0, "texts": 0, "seconds": 0.0, "skipped": reason}
    with replaced_folder(directory) as staged:
        (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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
