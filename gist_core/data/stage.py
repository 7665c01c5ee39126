"""The three DVC data stages: ``embed`` (``embed_stage``), ``mine`` (``mine_stage``) and ``data`` (``combine_stage``).

``gist data --step embed|mine|combine`` run them (dvc.yaml); ``gist data`` runs all three. Only
``embed`` runs the guide; ``mine`` and ``data`` read its versioned output, so the triplets are a
function of versioned files. Each builds what it needs from the settings (the contamination index,
MEDI) and writes its outputs.
"""

from __future__ import annotations

import logging

from gist_core.config import Settings
from gist_core.data.audit import DataReport
from gist_core.data.combine import combine, load_configured_medi, write_outputs
from gist_core.data.contamination import contamination_index
from gist_core.data.embed import StoredEmbeddings, embed_stage, needs_guide

__all__ = ["combine_stage", "data_stage", "embed_stage", "mine_stage"]
from gist_core.data.mine import Mined, mine_all, mine_params, read_mined, write_mined
from gist_core.errors import DataError

log = logging.getLogger(__name__)


def mine_stage(settings: Settings) -> Mined:
    """The DVC ``mine`` stage: mine every classification source and write ``data.mined``."""
    cfg = settings.data
    guide = _stored_embeddings(settings) if needs_guide(settings) and cfg.classification else None
    mined = mine_all(cfg, settings.root, settings.base.seed, guide, contamination_index(settings))
    mined.params = mine_params(settings)
    mined.guide = {"name": guide.name, "fingerprint": guide.fingerprint} if guide is not None else {}
    write_mined(mined, settings.path(cfg.mined))
    return mined


def _stored_embeddings(settings: Settings) -> StoredEmbeddings:
    stored = StoredEmbeddings(settings.path(settings.data.embeddings))
    stored.check(settings)
    return stored


def combine_stage(settings: Settings) -> DataReport:
    """The DVC ``data`` stage: combine the mined triplets with MEDI, audit, and write every output."""
    cfg = settings.data
    mined = read_mined(settings.path(cfg.mined))
    expected = mine_params(settings)
    if mined.params != expected:
        changed = sorted(k for k in expected if mined.params.get(k) != expected[k])
        raise DataError(
            f"{settings.path(cfg.mined)} was mined with other settings ({', '.join(changed)}); "
            "run `gist data` (both steps) or `dvc repro data`"
        )
    medi = load_configured_medi(cfg, settings.root)
    guide = None
    if cfg.audit.guide_verdicts and medi is not None:
        guide = _stored_embeddings(settings)
    data, report, skipped = combine(mined, medi, cfg, settings.base.seed, guide, contamination_index(settings))
    report.settings = {
        "seed": settings.base.seed,
        "positive_strategy": cfg.mining.positive_strategy,
        "top_k": cfg.mining.top_k,
        "temperature": cfg.mining.temperature,
        "max_texts_per_task": cfg.mining.max_texts_per_task,
        "exclude": ", ".join(cfg.mining.exclude) or "none",
        "excluded sources": ", ".join(mined.excluded) or "none",
        "max_per_task": cfg.max_per_task,
        "medi": cfg.medi.path if cfg.medi is not None else "none",
        "keep_instructions": cfg.medi.keep_instructions if cfg.medi is not None else "-",
    }
    write_outputs(
        data,
        report,
        skipped,
        settings.path(cfg.output),
        settings.path(cfg.report),
        settings.path(cfg.quarantine),
        settings.path(cfg.report_markdown),
    )
    return report


def data_stage(settings: Settings, mine: bool = True) -> DataReport:
    """All three stages in a row (``gist data``): embed, mine, combine; ``mine=False``: only combine."""
    if mine:
        embed_stage(settings)
        mine_stage(settings)
    return combine_stage(settings)
