"""The guided loss: sentence-transformers' GIST losses, guided by a frozen model or by a cache of its embeddings.

The guide never changes during training, so its embedding of a text is the same on every step of
every epoch. ``gist_core.training.guide_cache`` computes those embeddings once, exactly as ``GISTEmbedLoss``
would during training, and ``GuideEmbeddingCache`` hands them back to the loss in place of the
guide model. The loss classes stay sentence-transformers' own (``GISTEmbedLoss``, or
``CachedGISTEmbedLoss`` for GradCache): only where the guide embeddings come from changes, so the
false-negative masking is theirs, not a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from gist_core.config import TrainSettings
from gist_core.errors import DataError
from gist_core.training.cache_index import Key, KeyIndex, feature_keys, token_key_hashes

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class GuideCacheMiss(DataError):
    """A text in a training batch has no entry in the guide-embedding cache (a stale or foreign cache)."""


class GuideEmbeddingCache(nn.Module):
    def __init__(
        self,
        student: SentenceTransformer,
        keys: KeyIndex | Sequence[Key],
        embeddings: Tensor | np.ndarray,
        max_seq_length: int,
        description: dict[str, Any] | None = None,
    ) -> None:
        """
        A frozen guide's embeddings, looked up by the student's token ids: the ``guide`` of a GIST loss.

        Pass it where ``GISTEmbedLoss`` or ``CachedGISTEmbedLoss`` expects the guide model. It offers
        the student's tokenizer, so the loss hands it the student's features unchanged (no decoding,
        no re-tokenizing), and it answers with the embeddings the real guide computed for those token
        ids when the cache was built (``gist_core.training.guide_cache.embed_like_gist_loss``, which decodes
        and re-tokenizes the way the loss would). Each training step then runs only the student.

        The table may be a read-only memory map (``read_guide_cache``): nothing is copied up front,
        processes on one host share its pages, and a batch costs a binary search per text in the
        sorted key index plus the rows it reads (float16 tables are widened to float32 per batch).

        Args:
            student: the model being trained; its tokenizer produced the keys.
            keys: a ``KeyIndex`` whose row ``i`` is ``embeddings[i]``, or the student's token ids of each
                cached text (padding removed), one per embedding row.
            embeddings: one guide embedding per key, ``(len(keys), dim)``.
            max_seq_length: the student's ``max_seq_length`` when the keys were made; training must use it too.
            description: what the cache was built from (guide, data version), for configs and model cards.

        Raises:
            GuideCacheMiss: a batch holds a text the cache was not built for.

        Relations:
            - Stands in for the guide model of :class:`GISTEmbedLoss` and :class:`CachedGISTEmbedLoss`;
              the loss values equal the live guide's up to float rounding.

        Example:
            ::

                cached = embed_like_gist_loss(student, guide, texts)
                loss = GISTEmbedLoss(student, GuideEmbeddingCache(student, cached.index, cached.embeddings, 64))
        """
        super().__init__()
        table = embeddings.detach().cpu().numpy() if isinstance(embeddings, Tensor) else embeddings
        if table.ndim != 2:
            raise ValueError(f"embeddings must be 2-dimensional, got shape {tuple(table.shape)}")
        if len(keys) != len(table):
            raise ValueError(f"{len(keys)} keys but {len(table)} embeddings")
        if isinstance(keys, KeyIndex):
            index = keys
        else:
            index, row_of = KeyIndex.from_sequences(keys)
            if len(index) != len(keys):
                raise ValueError("duplicate keys in the guide-embedding cache")
            ordered = np.empty_like(np.asarray(table))
            ordered[row_of] = table
            table = ordered
        self.index = index
        self.table = table
        self.tokenizer = student.tokenizer
        self.max_seq_length = max_seq_length
        self.description = dict(description or {})

    def rows(self, features: dict[str, Any]) -> np.ndarray:
        """The table row of each text in a batch of student features."""
        key, check = token_key_hashes(features)
        rows = self.index.rows(key, check)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            sample = self.tokenizer.decode(feature_keys(features)[int(missing[0])], skip_special_tokens=True)
            raise GuideCacheMiss(
                f"{len(missing)} of {len(rows)} texts in a batch are not in the guide-embedding cache "
                f"(e.g. {sample[:80]!r}): it was built for other data or another student tokenizer; rebuild it "
                "with `gist guide-cache` (or `dvc repro guide_cache`)"
            )
        return rows

    def forward(self, features: dict[str, Any]) -> dict[str, Tensor]:
        rows = self.rows(features)
        order = np.argsort(rows, kind="stable")  # read the memory map in file order
        values = np.empty((len(rows), self.table.shape[1]), dtype=np.float32)
        values[order] = self.table[rows[order]]
        return {"sentence_embedding": torch.from_numpy(values).to(features["input_ids"].device)}

    @property
    def entries(self) -> int:
        return len(self.index)

    def get_embedding_dimension(self) -> int:
        return int(self.table.shape[1])

    def get_config_dict(self) -> dict[str, Any]:
        return {**self.description, "entries": self.entries, "max_seq_length": self.max_seq_length}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config_dict().items())


class GuideMaskStats(nn.CrossEntropyLoss):
    """The GIST losses' cross-entropy, also counting the in-batch candidates the guide masked.

    The GIST losses mask a candidate by setting its score to ``-inf`` just before the cross-entropy,
    so the scores this module receives carry exactly the mask the loss used. A candidate is every
    score in an anchor's row except its own positive (never masked) and the row's self-pairs (the
    anchor with itself, the positive with itself: ``self_pairs`` per row, one for each of
    ``contrast_anchors`` and ``contrast_positives``), which the guide masks by construction since
    nothing is closer to a text than itself. Counts accumulate on the device until
    ``pop_masked_fraction`` reads and resets them.
    """

    def __init__(self, self_pairs: int, contrast_anchors: bool = True, contrast_positives: bool = True) -> None:
        super().__init__()
        self.self_pairs = self_pairs
        self.contrast_anchors = contrast_anchors
        self.contrast_positives = contrast_positives
        # masked, candidates; then same-label masked, same-label candidates, other-label masked, other-label candidates
        self.register_buffer("counts", torch.zeros(6, dtype=torch.long), persistent=False)
        # Label ids of the current batch's columns (anchor, positive, negatives...), -1 unknown; set by
        # ``LabelledBatches`` before each forward.
        self.column_labels: list[Tensor] | None = None

    def forward(self, scores: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            masked = torch.isneginf(scores)
            self.counts[0] += (masked.sum(dim=1) - self.self_pairs).clamp(min=0).sum()
            self.counts[1] += scores.size(0) * max(scores.size(1) - 1 - self.self_pairs, 0)
            if self.column_labels is not None:
                self._count_by_label(masked)
        return super().forward(scores, labels)

    def _count_by_label(self, masked: Tensor) -> None:
        """Split the masked candidates into those of the anchor's own label and of another label.

        The GIST loss concatenates its score blocks as anchor-positive, anchor-anchor (with
        ``contrast_anchors``), positive-positive (with ``contrast_positives``), then anchor-negative
        per negative column. A block's diagonal is the anchor's own positive or a self-pair, never a
        candidate. Batches whose layout differs (candidates gathered across processes, GradCache
        mini-batches) are not split.
        """
        columns = self.column_labels or []
        rows = columns[0]
        blocks: list[tuple[Tensor, bool]] = [(columns[1], True)]  # (candidate labels, has a diagonal)
        if self.contrast_anchors:
            blocks.append((columns[0], True))
        if self.contrast_positives:
            blocks.append((columns[1], True))
        blocks += [(column, False) for column in columns[2:]]
        if masked.size(0) != rows.numel() or masked.size(1) != sum(b.numel() for b, _ in blocks):
            return
        offset = 0
        for block, has_diagonal in blocks:
            width = block.numel()
            cells = masked[:, offset : offset + width]
            offset += width
            known = (rows[:, None] >= 0) & (block[None, :] >= 0)
            if has_diagonal:
                known &= ~torch.eye(rows.numel(), width, dtype=torch.bool, device=known.device)
            same = known & (rows[:, None] == block[None, :])
            other = known & ~same
            self.counts[2] += (cells & same).sum()
            self.counts[3] += same.sum()
            self.counts[4] += (cells & other).sum()
            self.counts[5] += other.sum()

    def pop_counts(self, reduce_across_processes: bool = False) -> dict[str, float]:
        """The masked fractions since the last call (summed over processes if asked), and reset.

        ``guide_masked_fraction``: of all in-batch candidates. With labels:
        ``guide_masked_same_label``: of candidates with the anchor's label (false negatives the
        guide caught); ``guide_masked_other_label``: of candidates with another label (true
        negatives it dropped); ``guide_masked_same_label_share``: of the masked labelled candidates.
        Keys without candidates are left out.
        """
        counts = self.counts.clone()
        self.counts.zero_()
        if reduce_across_processes and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        masked, candidates, same_masked, same, other_masked, other = counts.tolist()
        out: dict[str, float] = {}
        if candidates:
            out["guide_masked_fraction"] = masked / candidates
        if same:
            out["guide_masked_same_label"] = same_masked / same
        if other:
            out["guide_masked_other_label"] = other_masked / other
        if same_masked + other_masked:
            out["guide_masked_same_label_share"] = same_masked / (same_masked + other_masked)
        return out

    def pop_masked_fraction(self, reduce_across_processes: bool = False) -> float | None:
        """The fraction masked since the last call (summed over processes if asked); None if nothing was scored."""
        return self.pop_counts(reduce_across_processes).get("guide_masked_fraction")


class LabelledBatches:
    """Tells a loss's ``GuideMaskStats`` the label of every text in each batch, by the student's token ids.

    Attach with ``LabelledBatches(stats, student, labels).attach(loss)``: a forward pre-hook on the
    loss looks up each column's texts before the loss runs. ``labels`` maps a text to its label; a
    text seen with two labels, or not listed, counts as unknown and is left out of the split.
    """

    def __init__(self, stats: GuideMaskStats, student: SentenceTransformer, labels: dict[str, str]) -> None:
        self.stats = stats
        ids: dict[str, int] = {}
        by_key: dict[int, int] = {}
        texts = list(labels)
        for start in range(0, len(texts), 512):
            chunk = texts[start : start + 512]
            keys, _ = token_key_hashes(student.preprocess(chunk))
            for text, key in zip(chunk, keys.tolist(), strict=True):
                label = ids.setdefault(labels[text], len(ids))
                by_key[key] = label if by_key.get(key, label) == label else -1  # truncation may merge texts
        self.by_key = by_key

    def attach(self, loss: nn.Module) -> LabelledBatches:
        loss.register_forward_pre_hook(self._before_forward)
        return self

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        features = args[0]
        self.stats.column_labels = [
            torch.tensor([self.by_key.get(key, -1) for key in token_key_hashes(f)[0].tolist()], dtype=torch.long)
            for f in features
        ]


def build_loss(
    cfg: TrainSettings,
    student: SentenceTransformer,
    guide: SentenceTransformer | GuideEmbeddingCache | None,
    gather_across_devices: bool = False,
) -> nn.Module:
    """The training loss the settings name, built from sentence-transformers' own classes.

    ``gist``: ``GISTEmbedLoss`` (``CachedGISTEmbedLoss`` when ``mini_batch_size`` is set) guided by
    the guide model or a ``GuideEmbeddingCache``, with a ``GuideMaskStats`` as its cross-entropy.
    ``mnrl``: ``MultipleNegativesRankingLoss`` (or its cached variant) at scale ``1 / temperature``.
    ``gather_across_devices``: in-batch candidates come from every process (multi-GPU training).
    """
    # deferred: sentence-transformers takes seconds to import
    from sentence_transformers.sentence_transformer.losses import (
        CachedGISTEmbedLoss,
        CachedMultipleNegativesRankingLoss,
        GISTEmbedLoss,
        MultipleNegativesRankingLoss,
    )

    if cfg.loss == "mnrl":
        if cfg.mini_batch_size:
            return CachedMultipleNegativesRankingLoss(
                student,
                scale=1.0 / cfg.temperature,
                mini_batch_size=cfg.mini_batch_size,
                gather_across_devices=gather_across_devices,
            )
        return MultipleNegativesRankingLoss(
            student, scale=1.0 / cfg.temperature, gather_across_devices=gather_across_devices
        )
    if guide is None:
        raise ValueError("the gist loss needs a guide model or a guide-embedding cache")
    if isinstance(guide, GuideEmbeddingCache) and guide.max_seq_length != student.max_seq_length:
        raise ValueError(
            f"the guide-embedding cache was built at max_seq_length {guide.max_seq_length}, "
            f"but the student trains at {student.max_seq_length}"
        )
    options: dict[str, Any] = {
        "temperature": cfg.temperature,
        "margin_strategy": cfg.margin_strategy,
        "margin": cfg.margin,
        "contrast_anchors": cfg.contrast_anchors,
        "contrast_positives": cfg.contrast_positives,
        "gather_across_devices": gather_across_devices,
    }
    if cfg.mini_batch_size:
        loss: nn.Module = CachedGISTEmbedLoss(student, guide, mini_batch_size=cfg.mini_batch_size, **options)
    else:
        loss = GISTEmbedLoss(student, guide, **options)
    loss.cross_entropy_loss = GuideMaskStats(
        self_pairs=int(cfg.contrast_anchors) + int(cfg.contrast_positives),
        contrast_anchors=cfg.contrast_anchors,
        contrast_positives=cfg.contrast_positives,
    )
    return loss


def mask_stats(loss: nn.Module) -> GuideMaskStats | None:
    """The loss's masked-candidate counter, if it has one."""
    stats = getattr(loss, "cross_entropy_loss", None)
    return stats if isinstance(stats, GuideMaskStats) else None
