"""The encoder mteb runs during ``gist_core.evaluation.evaluate.evaluate_model``: each distinct text encoded once.

mteb (2.26) already encodes a classification task's training examples once for all its
experiments, but it still encodes a text again each time it occurs: a sentence shared by several
STS pairs, a tweet repeated in a split, a text in both the train and test split. ``DedupEncoder``
wraps mteb's own ``SentenceTransformerEncoderWrapper`` and keeps each text's embedding for the
rest of the task, so a repeated text costs a dictionary lookup. The memo is keyed by the text
and by what else can change its embedding (the prompt type, and the task when the model has
prompts); ``reset`` empties it between tasks, which bounds its memory by one task's texts.

This module imports mteb at import time (it subclasses mteb's wrapper); ``evaluate`` imports it on first use.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import PromptType
    from sentence_transformers import SentenceTransformer
    from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

NON_TEXT_FEATURES = ("image", "audio", "video")
Precision = Literal["float32", "bfloat16"]


@dataclass
class EncodeStats:
    """What one task cost in encoding: texts mteb asked for, texts actually encoded, seconds in encode."""

    texts: int = 0
    encoded: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"texts": self.texts, "encoded": self.encoded, "seconds": round(self.seconds, 3)}


class DedupEncoder(SentenceTransformerEncoderWrapper):
    """mteb's SentenceTransformer wrapper, named ``name``@``revision``, encoding each distinct text once.

    Args:
        model: the SentenceTransformer.
        name: ``org/name``; with ``revision`` it is the result cache's key (``ModelMeta.name``/``revision``).
        revision: a content hash of the weights.
        deduplicate: False encodes every text mteb passes (for measuring the saving).
        precision: ``bfloat16`` runs the forward passes under torch's bf16 autocast (weights stay
            float32; about 2.2x faster on CPUs with AMX, embeddings within 3e-5 cosine of float32).
            Scores then differ slightly from float32 ones: keep the two apart in the cache key.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        *,
        name: str,
        revision: str,
        deduplicate: bool = True,
        precision: Precision = "float32",
    ) -> None:
        super().__init__(model)
        # The cache key, set on the wrapper's own metadata: the model's card stays untouched.
        self.mteb_model_meta = self.mteb_model_meta.model_copy(update={"name": name, "revision": revision})
        self.deduplicate = deduplicate
        self.precision = precision
        self.stats = EncodeStats()
        self._memo: dict[tuple[Any, ...], np.ndarray] = {}

    def reset(self) -> EncodeStats:
        """Forget the embeddings and start new stats (between tasks); returns the stats so far."""
        stats, self.stats = self.stats, EncodeStats()
        self._memo.clear()
        return stats

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> Any:
        features = getattr(inputs.dataset, "features", None) or {}
        if not self.deduplicate or any(f in features for f in NON_TEXT_FEATURES) or not len(inputs.dataset):
            self.stats.texts += len(inputs.dataset)
            return self._timed(inputs, task_metadata, hf_split, hf_subset, prompt_type, kwargs, len(inputs.dataset))
        # The texts exactly as mteb's wrapper would read them (documents already joined with their titles).
        texts = [text for batch in inputs for text in batch["text"]]
        if not all(isinstance(text, str) for text in texts):  # e.g. structured inputs: no memo key
            self.stats.texts += len(texts)
            return self._timed(inputs, task_metadata, hf_split, hf_subset, prompt_type, kwargs, len(texts))
        # With prompts, the prompt depends on the task (and its type): never share across tasks then.
        scope = (str(prompt_type), task_metadata.name if self.model_prompts else None)
        keys = [(scope, text) for text in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._memo))
        if missing:
            # deferred: datasets and torch take seconds to import
            from datasets import Dataset
            from torch.utils.data import DataLoader

            loader = DataLoader(Dataset.from_dict({"text": [k[1] for k in missing]}), batch_size=len(missing))
            vectors = np.asarray(
                self._timed(loader, task_metadata, hf_split, hf_subset, prompt_type, kwargs, len(missing))
            )
            self._memo.update(zip(missing, vectors, strict=True))
        self.stats.texts += len(texts)
        if len(missing) < len(texts):
            log.info(
                "%s %s: %d texts, %d encoded (%d repeated or already encoded)",
                task_metadata.name,
                hf_split,
                len(texts),
                len(missing),
                len(texts) - len(missing),
            )
        return np.stack([self._memo[k] for k in keys])

    def _timed(
        self,
        inputs: DataLoader,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None,
        kwargs: dict[str, Any],
        count: int,
    ) -> Any:
        tick = time.perf_counter()
        with self._autocast():
            out = super().encode(
                inputs,
                task_metadata=task_metadata,
                hf_split=hf_split,
                hf_subset=hf_subset,
                prompt_type=prompt_type,
                **kwargs,
            )
        self.stats.seconds += time.perf_counter() - tick
        self.stats.encoded += count
        return out

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "float32":
            return contextlib.nullcontext()
        # deferred: torch takes seconds to import
        import torch

        return torch.autocast(self.model.device.type, dtype=torch.bfloat16)
