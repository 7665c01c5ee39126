"""The registry's names: aliases, tag keys and the tags' JSON."""

from __future__ import annotations

import json
from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREFIX = "gist."
EVENT_PREFIX = TAG_PREFIX + "event."
SCORES_TAG = TAG_PREFIX + "scores"
CATEGORIES_TAG = TAG_PREFIX + "categories"
TASK_REVISIONS_TAG = TAG_PREFIX + "task_revisions"
MTEB_VERSION_TAG = TAG_PREFIX + "mteb_version"
EVAL_SETTINGS_TAG = TAG_PREFIX + "eval_settings"  # precision, max_seq_length, library versions (JSON)
FINGERPRINT_TAG = TAG_PREFIX + "model_fingerprint"  # the weights hash: gist_core.models.model_fingerprint
GATE_BASELINE_VERSION_TAG = TAG_PREFIX + "gate.baseline_version"  # the champion decided against ("": base)
CARD_FILE = "README.md"  # the model card, at the root of the logged model
PROMOTION_TAG = TAG_PREFIX + "promotion"  # pending until the decision is applied, then done
REGISTRATION_TAG = TAG_PREFIX + "registration_id"
SINCE_TAG = TAG_PREFIX + "champion_since"
UNTIL_TAG = TAG_PREFIX + "champion_until"
ROLLED_BACK_TAG = TAG_PREFIX + "gate.rolled_back"


def prefixed(tags: dict[str, Any]) -> dict[str, str]:
    """Tag keys under ``gist.`` (``mlflow.`` and ``gist.`` keys kept as they are), values as strings."""
    return {k if k.startswith(("mlflow.", TAG_PREFIX)) else TAG_PREFIX + k: str(v) for k, v in tags.items()}


def json_tag(tags: dict[str, str], key: str) -> Any:
    """A tag's JSON value, or None when the tag is absent or not JSON."""
    try:
        return json.loads(tags[key]) if key in tags else None
    except ValueError:
        return None
