"""The DVC ``embed`` stage: the guide's embedding of every text the data stages show it, as a versioned file.

The guide's float results differ in the last bits between CPUs (NOTES.md, *Machines differ*), and
mining samples positives from those floats, so a data version computed from a live guide would
depend on the machine. Here the guide runs once, in this stage; its output
``data.embeddings`` (``keys.npy``, ``vectors.npy``, ``manifest.json``) is a DVC output pushed with the
data, and the ``mine`` and ``data`` stages read it instead of the guide (``StoredEmbeddings``). A
machine that pulls it re-derives the same triplets, byte for byte, on any CPU.

What it embeds: each classification source's mining pool (``mine.mining_pool``) when mining or the
audit uses the guide, and, with ``data.medi`` and ``data.audit.guide_verdicts``, every distinct MEDI
text (the verdicts score the kept ones). Embeddings go through the shared embedding store, so only
texts never embedded before with this guide and max length are encoded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gist_core.config import Settings
from gist_core.data.combine import load_configured_medi
from gist_core.data.contamination import arrow_strings, contamination_index
from gist_core.data.guide_encoder import GuideEncoder, load_guide
from gist_core.data.mine import mining_pool
from gist_core.embedding_store import KEY_DTYPE, string_keys
from gist_core.errors import DataError
from gist_core.folders import replaced_folder

log = logging.getLogger(__name__)

KEYS_FILE = "keys.npy"
VECTORS_FILE = "vectors.npy"
MANIFEST_FILE = "manifest.json"
WRITE_CHUNK = 65_536
EMBED_FORMAT = 1


def needs_guide(settings: Settings) -> bool:
    """Whether the data stages use the guide at all (mining with it, or the audit's verdicts)."""
    cfg = settings.data
    mines = bool(cfg.classification) and (cfg.mining.positive_strategy == "guide_topk" or cfg.audit.guide_verdicts)
    return mines or (cfg.medi is not None and cfg.audit.guide_verdicts)


def _texts_to_embed(settings: Settings) -> Iterator[tuple[str, list[str]]]:
    """(pass name, texts) for every text the data stages will ask the guide about."""
    cfg = settings.data
    if cfg.classification and (cfg.mining.positive_strategy == "guide_topk" or cfg.audit.guide_verdicts):
        contamination = contamination_index(settings)
        for source in cfg.classification:
            if cfg.is_excluded(source.name):
                continue
            pool = mining_pool(source, settings.root, cfg, settings.base.seed, contamination)
            yield "mining", pool.frame["text"].astype(str).tolist()
    if cfg.medi is not None and cfg.audit.guide_verdicts:
        medi = load_configured_medi(cfg, settings.root)
        assert medi is not None
        columns = [arrow_strings(medi.triplets[c]) for c in ("anchor", "positive", "negative")]
        distinct = pa.chunked_array([chunk for column in columns for chunk in column.chunks]).unique()
        for begin in range(0, len(distinct), WRITE_CHUNK):
            yield "verdicts", distinct.slice(begin, WRITE_CHUNK).to_pylist()


def write_embeddings(folder: Path, guide: GuideEncoder, keys: np.ndarray, params: dict[str, Any]) -> dict[str, Any]:
    """Write the unit-length embeddings of ``keys`` (all embedded by ``guide`` already), sorted by key."""
    keys = np.unique(keys)
    manifest = {
        "format": EMBED_FORMAT,
        "guide": guide.name,
        "guide_fingerprint": guide.fingerprint,
        "max_seq_length": guide.max_seq_length,
        "entries": len(keys),
        "params": params,
    }
    with replaced_folder(folder) as staged:
        vectors = None
        for begin in range(0, len(keys), WRITE_CHUNK):
            part = guide.stored(keys[begin : begin + WRITE_CHUNK])
            if vectors is None:
                shape = (len(keys), part.shape[1])
                vectors = np.lib.format.open_memmap(staged / VECTORS_FILE, mode="w+", dtype=np.float32, shape=shape)
            vectors[begin : begin + len(part)] = part
        if vectors is None:
            np.save(staged / VECTORS_FILE, np.empty((0, 0), dtype=np.float32))
        else:
            vectors.flush()
            del vectors
        np.save(staged / KEYS_FILE, keys)
        (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def embed_params(settings: Settings) -> dict[str, Any]:
    """The settings the stored embeddings depend on (the DVC ``embed`` stage's params, resolved)."""
    data = settings.data.model_dump(mode="json")
    return {
        "guide": settings.base.guide,
        "max_seq_length": settings.data.mining.max_seq_length,
        "medi": data["medi"] if settings.data.medi is not None and settings.data.audit.guide_verdicts else None,
    }


def embed_stage(settings: Settings) -> dict[str, Any]:
    """The DVC ``embed`` stage: embed every text the data stages need and write ``data.embeddings``."""
    folder = settings.path(settings.data.embeddings)
    params = embed_params(settings)
    if not needs_guide(settings):
        guide_name = settings.base.guide
        empty = GuideEncoder(guide_name, "none", lambda: None, settings.data.mining.max_seq_length)
        return write_embeddings(folder, empty, np.empty(0, dtype=KEY_DTYPE), params)
    guide = load_guide(settings)
    keys = []
    for pass_name, texts in _texts_to_embed(settings):
        guide.embed(texts, pass_name=pass_name)
        keys.append(string_keys(texts))
    manifest = write_embeddings(folder, guide, np.concatenate(keys) if keys else np.empty(0, KEY_DTYPE), params)
    log.info("guide %s: %s", guide.name, guide.describe())
    log.info("guide embeddings of %d distinct texts -> %s", manifest["entries"], folder)
    return {**manifest, "passes": guide.passes}


class StoredEmbeddings:
    """The ``embed`` stage's output read back: the guide's embeddings, looked up by exact text, no model.

    Stands in for ``GuideEncoder`` in the mining and audit code. A text the stage did not embed is
    an error (the stored embeddings belong to other data or settings), never a silent recompute.
    """

    def __init__(self, folder: Path) -> None:
        manifest = folder / MANIFEST_FILE
        if not manifest.is_file():
            raise DataError(f"{folder}: no stored guide embeddings; run `gist data --step embed` or `dvc repro embed`")
        self.folder = folder
        self.manifest = json.loads(manifest.read_text())
        self.name = str(self.manifest["guide"])
        self.fingerprint = str(self.manifest["guide_fingerprint"])
        self.max_seq_length = int(self.manifest["max_seq_length"])
        self.keys = np.load(folder / KEYS_FILE)
        self.vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
        if (
            self.keys.dtype != KEY_DTYPE
            or len(self.keys) != int(self.manifest["entries"])
            or (len(self.keys) and len(self.vectors) != len(self.keys))
        ):
            raise DataError(f"{folder}: keys, vectors and manifest disagree; rebuild with `dvc repro embed`")
        self.passes: dict[str, dict[str, float]] = {}

    def embed(self, texts: Sequence[str], pass_name: str = "embed") -> np.ndarray:
        keys = string_keys(texts)
        if not len(self.keys):
            raise DataError(f"{self.folder}: holds no embeddings; run `dvc repro embed` with these settings")
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = self.keys[pos] == keys
        if not hit.all():
            sample = texts[int(np.flatnonzero(~hit)[0])]
            raise DataError(
                f"{self.folder}: {int((~hit).sum())} of {len(texts)} texts have no stored guide embedding "
                f"(e.g. {sample[:60]!r}): it was computed for other data or settings; run `dvc repro embed`"
            )
        order = np.argsort(pos, kind="stable")
        out = np.empty((len(texts), self.vectors.shape[1]), dtype=np.float32)
        out[order] = self.vectors[pos[order]]
        record = self.passes.setdefault(pass_name, {"texts": 0})
        record["texts"] += len(texts)
        return out

    def check(self, settings: Settings) -> None:
        """Refuse embeddings computed with another guide or max length than the settings name."""
        expected = embed_params(settings)
        recorded = self.manifest.get("params") or {}
        changed = sorted(k for k in expected if recorded.get(k) != expected[k])
        if changed:
            raise DataError(
                f"{self.folder} was computed with other settings ({', '.join(changed)}); "
                "run `gist data` (all steps) or `dvc repro data`"
            )
