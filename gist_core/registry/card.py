"""The model card of a registered version: README.md at the root of the logged model, as on the Hub.

Laid out like the published GISTEmbed cards (GIST-small-Embedding-v0, GIST-Embedding-v0): the base
model and the guide, the loss and its settings, the training parameters, the training data, the MTEB
results, plus what this pipeline adds: the results beside the base model and the champion the
version was compared with, the gate's decision, the lineage, and how to load the version.

The results metadata (the ``model-index`` YAML the Hub reads) and the results table come from mteb's
own helpers: ``TaskResult.get_hf_eval_results`` (one Hugging Face ``EvalResult`` per task, split
and subset, with the task's dataset path and revision) into ``huggingface_hub.ModelCardData``, and
``BenchmarkResults.to_dataframe`` for the per-task main scores of each model. ``render`` is pure;
``log_card`` writes the text into the version's logged model, where MLflow's artifact view shows it.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_core.config import Settings
from gist_core.errors import RegistryError
from gist_core.gate import GateDecision
from gist_core.models import PACKAGED_MODELS, ModelRef, model_fingerprint, resolve_model
from gist_core.registry.client import Store, client, model_name, retry, target_of
from gist_core.registry.tags import CARD_FILE
from gist_core.tables import markdown_table

if TYPE_CHECKING:
    from mteb.results import TaskResult

log = logging.getLogger(__name__)

THIS = "this version"
CITATION = """@article{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    journal={arXiv preprint arXiv:2402.16829},
    year={2024},
    URL={https://arxiv.org/abs/2402.16829},
    eprint={2402.16829},
    archivePrefix={arXiv},
    eprinttype={arXiv}
}"""
# Sections every card has, in this order (a test checks them against a real run's values).
SECTIONS = (
    "Base model and guide",
    "Loss",
    "Training parameters",
    "Training data",
    "MTEB results",
    "Promotion decision",
    "Lineage",
    "Usage",
    "Citation",
)


@dataclass(frozen=True)
class CardInputs:
    """Everything a card says, gathered by ``gist_core.stages`` from the run's real values.

    ``results`` holds mteb's TaskResult objects per model label (``THIS``, ``base``,
    ``champion vN``); ``recorded`` the scores of a label whose results are not in the result cache
    (a champion compared through its version tags). ``train`` is the ``train`` section as run;
    ``trained`` the trainer's summary (steps, loss, guide source, seconds).
    """

    name: str
    version: str
    aliases: tuple[str, ...]
    student: str
    student_id: str | None  # Hub id of the base model when known (the card's ``base_model``)
    student_fingerprint: str
    guide: str
    guide_fingerprint: str | None
    train: Mapping[str, Any]
    trained: Mapping[str, Any]
    seed: int
    data_version: str
    data_path: str
    sources: Sequence[tuple[str, str]]  # (name, file) of each training data source
    triplets_per_task: Mapping[str, int]
    decision: GateDecision
    run_id: str
    tracking_uri: str
    git_commit: str
    params_hash: str
    weights_hash: str
    mteb_version: str
    eval_settings: Mapping[str, str]
    task_revisions: Mapping[str, str]
    categories: Mapping[str, str]
    results: Mapping[str, Sequence[TaskResult]] = field(default_factory=dict)
    recorded: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    train_key: str | None = None
    guide_id: str | None = None  # Hub id of the guide when known


def from_run(
    settings: Settings,
    *,
    version: tuple[str, str, tuple[str, ...]],
    decision: GateDecision,
    run_id: str,
    data: tuple[str, str, Mapping[str, int]],
    lineage: Mapping[str, str | None],
    trained: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    results: Mapping[str, Sequence[TaskResult]],
    recorded: Mapping[str, Mapping[str, float]],
) -> CardInputs:
    """A card's inputs from a run: ``version`` (name, number, aliases), ``data`` (version, path, triplets
    per task), ``lineage`` (git_commit, weights_hash, train_key) and the evaluation output as a dict."""
    models_dir = settings.path(settings.base.models_dir)
    student = resolve_model(settings.base.student, models_dir, settings.root)
    packaged = PACKAGED_MODELS.get(settings.base.student)
    guide = resolve_model(settings.base.guide, models_dir, settings.root)
    packaged_guide = PACKAGED_MODELS.get(settings.base.guide)
    sources = [(s.name, s.path) for s in settings.data.classification]
    if settings.data.medi is not None:
        sources.append(("MEDI", settings.data.medi.path))
    scored_base = (evaluation.get("models") or {}).get("base") or {}
    return CardInputs(
        name=version[0],
        version=version[1],
        aliases=version[2],
        student=settings.base.student,
        student_id=packaged.hub_id if packaged else (student.location if student.source == "hub" else None),
        student_fingerprint=scored_base.get("fingerprint") or _local_fingerprint(student) or "unknown",
        guide=settings.base.guide,
        guide_fingerprint=_local_fingerprint(guide),
        guide_id=packaged_guide.hub_id if packaged_guide else (guide.location if guide.source == "hub" else None),
        train=settings.train.model_dump(mode="json"),
        trained=trained,
        seed=settings.base.seed,
        data_version=data[0],
        data_path=data[1],
        sources=sources,
        triplets_per_task=data[2],
        decision=decision,
        run_id=run_id,
        tracking_uri=settings.tracking_uri,
        git_commit=str(lineage.get("git_commit")),
        params_hash=settings.params_hash(),
        weights_hash=str(lineage.get("weights_hash")),
        mteb_version=evaluation["mteb_version"],
        eval_settings=evaluation.get("eval_settings") or {},
        task_revisions=evaluation["task_revisions"],
        categories=evaluation.get("categories") or {},
        results=results,
        recorded=recorded,
        train_key=lineage.get("train_key"),
    )


def _local_fingerprint(ref: ModelRef) -> str | None:
    """A model's fingerprint when its folder is here (a card never downloads or provisions a model)."""
    return model_fingerprint(ref) if ref.is_local and Path(ref.location).is_dir() else None


def render(card: CardInputs) -> str:
    """The card's Markdown with its YAML front matter."""
    body = [f"# {card.name} version {card.version}", "", _intro(card), ""]
    body += _models(card) + _loss(card) + _training(card) + _data(card) + _results(card)
    body += _decision(card) + _lineage(card) + _usage(card)
    body += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return f"---\n{_metadata(card)}---\n\n" + "\n".join(body)


def _metadata(card: CardInputs) -> str:
    """The YAML front matter: library, tags, base model and mteb's results metadata (``model-index``)."""
    # deferred: huggingface_hub is imported by mteb anyway; only a card needs it
    from huggingface_hub import ModelCardData

    eval_results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mteb marks the model-index helper deprecated in favour of Hub benchmarks
        for result in card.results.get(THIS, ()):
            eval_results += result.get_hf_eval_results()
    data = ModelCardData(
        model_name=f"{card.name}-v{card.version}",
        base_model=card.student_id,
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        language="en",
        tags=["sentence-transformers", "feature-extraction", "sentence-similarity", "mteb", "gistembed"],
        eval_results=eval_results or None,
    )
    return data.to_yaml() + "\n"


def _intro(card: CardInputs) -> str:
    aliases = ", ".join(card.aliases) or "none"
    return (
        f"A [GISTEmbed](https://arxiv.org/abs/2402.16829) fine-tune of `{card.student}`, guided by `{card.guide}`. "
        f"Registered as `models:/{card.name}/{card.version}` (aliases: {aliases}); "
        f"gate: {card.decision.summary()}."
    )


def _models(card: CardInputs) -> list[str]:
    hub_id = card.student_id or "local folder"
    rows = [["base model (student)", f"`{card.student}`", hub_id, f"`{card.student_fingerprint}`"]]
    if card.train.get("loss") == "gist":
        guide_id = card.guide_id or "local folder"
        rows.append(["guide (frozen)", f"`{card.guide}`", guide_id, f"`{card.guide_fingerprint or 'unknown'}`"])
    out = ["## Base model and guide", ""]
    out += markdown_table(["role", "model", "Hub id", "content fingerprint"], rows)
    return out + [""]


def _loss(card: CardInputs) -> list[str]:
    t = card.train
    if t.get("loss") != "gist":
        return ["## Loss", "", "MultipleNegativesRankingLoss (no guide), temperature-free in-batch negatives.", ""]
    name = "CachedGISTEmbedLoss" if t.get("mini_batch_size") else "GISTEmbedLoss"
    rows = [
        ["loss", f"sentence-transformers' `{name}`"],
        ["temperature", t.get("temperature")],
        ["margin strategy", t.get("margin_strategy")],
        ["margin", t.get("margin")],
        ["contrast anchors (anchor-anchor negatives)", t.get("contrast_anchors")],
        ["contrast positives (positive-positive negatives)", t.get("contrast_positives")],
        ["guide source", f"{card.trained.get('guide', 'model')} (guide-embedding cache or live model)"],
        ["GradCache mini-batch", t.get("mini_batch_size") or "none"],
    ]
    out = ["## Loss", "", "In-batch candidates the guide scores above the true positive are masked out.", ""]
    return out + markdown_table(["setting", "value"], _plain(rows)) + [""]


def _training(card: CardInputs) -> list[str]:
    t = card.train
    length = f"{t['max_steps']} steps" if t.get("max_steps") else f"{t.get('num_train_epochs')} epochs"
    rows = [
        ["epochs or steps", length],
        ["checkpoint step", card.trained.get("steps")],
        ["warmup ratio", t.get("warmup_ratio")],
        ["learning rate", t.get("learning_rate")],
        ["batch size (per device)", t.get("batch_size")],
        ["processes", card.trained.get("world_size", 1)],
        ["max_seq_length (training)", t.get("max_seq_length")],
        ["batch sampler", f"{t.get('batch_sampler')}, one task per batch: {t.get('task_homogeneous_batches')}"],
        ["seed", card.seed],
        ["mean training loss", _number(card.trained.get("train_loss"))],
    ]
    return ["## Training parameters", ""] + markdown_table(["parameter", "value"], _plain(rows)) + [""]


def _data(card: CardInputs) -> list[str]:
    total = sum(card.triplets_per_task.values())
    out = [
        "## Training data",
        "",
        f"Data version (DVC md5 of `{card.data_path}`): `{card.data_version}`, {total:,} triplets "
        "(anchor, positive, hard negative).",
        "",
        "Sources: " + "; ".join(f"{n} (`{path}`)" for n, path in card.sources) + ".",
        "",
    ]
    rows = sorted(card.triplets_per_task.items())
    return out + markdown_table(["task", "triplets"], rows, align=["left", "right"]) + [""]


def results_frame(card: CardInputs) -> list[dict[str, Any]]:
    """Per-task main scores of each model label: mteb's ``BenchmarkResults.to_dataframe`` plus recorded scores."""
    labels = [label for label in card.results if card.results[label]]
    scores: dict[str, dict[str, float]] = {}
    if labels:
        # deferred: mteb takes seconds to import
        from mteb.results import BenchmarkResults, ModelResult

        models = [
            ModelResult(model_name=label, model_revision=str(i), task_results=list(card.results[label]))
            for i, label in enumerate(labels)
        ]
        frame = BenchmarkResults(model_results=models).to_dataframe()
        for row in frame.to_dict("records"):
            scores[str(row["task_name"])] = {
                label: float(row[label]) for label in labels if not _missing(row.get(label))
            }
    for label, recorded in card.recorded.items():
        for task, value in recorded.items():
            scores.setdefault(task, {})[label] = float(value)
    return [{"task": task, **values} for task, values in scores.items()]


def _results(card: CardInputs) -> list[str]:
    rows = results_frame(card)
    labels = [THIS] + [label for label in (*card.results, *card.recorded) if label != THIS]
    labels = list(dict.fromkeys(labels))
    baselines = labels[1:]
    header = ["task", "type", *labels] + [f"Δ {b}" for b in baselines]
    table = []
    for row in sorted(rows, key=lambda r: r["task"]):
        this = row.get(THIS)
        cells = [row["task"], card.categories.get(row["task"], "?")]
        cells += [_number(row.get(label)) for label in labels]
        cells += [_delta(this, row.get(b)) for b in baselines]
        table.append(cells)
    settings = ", ".join(f"{k} {v}" for k, v in card.eval_settings.items())
    revisions = ", ".join(f"{t} `{r[:12]}`" for t, r in sorted(card.task_revisions.items()))
    out = [
        "## MTEB results",
        "",
        "Main score of each task on mteb's 0-1 scale (STS: cosine Spearman, classification: accuracy, "
        "retrieval: nDCG@10), this version beside the base model and the champion it was compared with.",
        "",
    ]
    out += markdown_table(header, table, align=["left", "left"] + ["right"] * (len(header) - 2))
    out += ["", f"Evaluated with mteb {card.mteb_version}; {settings}. Task data revisions: {revisions}.", ""]
    return out


def _decision(card: CardInputs) -> list[str]:
    text = card.decision.markdown().replace("## ", "**", 1).replace("\n", "**\n", 1)
    return ["## Promotion decision", "", text, ""]


def _lineage(card: CardInputs) -> list[str]:
    previous = card.decision.baseline_label if card.decision.baseline_version else "none (compared with the base model)"
    rows = [
        ["registered version", f"`models:/{card.name}/{card.version}`"],
        ["champion compared with", previous],
        ["MLflow run", f"`{card.run_id}` in `{card.tracking_uri}`"],
        ["git commit", f"`{card.git_commit}`"],
        ["params hash (base, data, train)", f"`{card.params_hash}`"],
        ["data version", f"`{card.data_version}`"],
        ["weights hash", f"`{card.weights_hash}`"],
        ["training cache key", f"`{card.train_key or 'unknown'}`"],
    ]
    return ["## Lineage", ""] + markdown_table(["", "value"], rows) + [""]


def _usage(card: CardInputs) -> list[str]:
    return [
        "## Usage",
        "",
        "From the MLflow registry (the current champion, or this version by number):",
        "",
        "```python",
        "import mlflow",
        "",
        f'mlflow.set_tracking_uri("{card.tracking_uri}")',
        f'model = mlflow.sentence_transformers.load_model("models:/{card.name}@champion")',
        f'# this version: mlflow.sentence_transformers.load_model("models:/{card.name}/{card.version}")',
        'embeddings = model.encode(["How do I reset my card PIN?", "A man is playing a guitar."])',
        "```",
        "",
        "With sentence-transformers, from the model's folder in the registry (or a Hub repository after "
        "`gist registry publish`):",
        "",
        "```python",
        "import mlflow",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'mlflow.set_tracking_uri("{card.tracking_uri}")',
        f'local = mlflow.artifacts.download_artifacts("models:/{card.name}/{card.version}")',
        'model = SentenceTransformer(f"{local}/model.sentence_transformer")',
        'embeddings = model.encode(["How do I reset my card PIN?"], normalize_embeddings=True)',
        "```",
        "",
        f'From a shell: `gist registry encode {card.name} "How do I reset my card PIN?"`.',
        "",
    ]


def _plain(rows: list[list[Any]]) -> list[list[str]]:
    """Settings as written in params.yaml (``2e-05``, ``0.01``, ``True``), not the table's 4-decimal floats."""
    return [[f"{v:g}" if isinstance(v, float) else str(v) for v in row] for row in rows]


def _number(value: Any) -> str:
    return "n/a" if _missing(value) else f"{float(value):.4f}"


def _delta(this: Any, other: Any) -> str:
    return "n/a" if _missing(this) or _missing(other) else f"{float(this) - float(other):+.4f}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def logged_model_id(store: Store, name: str, version: str) -> str:
    """The id of the logged model (``m-...``) a version was registered from (its ``models:/m-...`` source)."""
    target = target_of(store)
    mv = retry(target, f"reading {name} version {version}", client(target).get_model_version, name, version)
    model_id = getattr(mv, "model_id", None)  # not kept by every store: the source names it too
    if not model_id and str(mv.source).startswith("models:/m-"):
        model_id = str(mv.source)[len("models:/") :].split("/")[0]
    if not model_id:
        raise RegistryError(f"{name} version {version} was not registered from a logged model ({mv.source})")
    return model_id


def log_card(store: Store, version: str, text: str, name: str | None = None) -> str:
    """Write the card as README.md at the root of the version's logged model; returns its artifact URI."""
    target, name = target_of(store), model_name(store, name)
    mlc = client(target)
    model_id = logged_model_id(target, name, version)
    with tempfile.TemporaryDirectory(prefix="gist-card-") as scratch:
        path = Path(scratch) / CARD_FILE
        path.write_text(text)
        what = f"logging the model card of {name} version {version}"
        retry(target, what, mlc.log_model_artifact, model_id, str(path))
    log.info("model card of %s version %s logged to %s", name, version, model_id)
    return f"models:/{model_id}/{CARD_FILE}"


def read_card(store: Store, version: str, name: str | None = None) -> str:
    """The card of a registered version, as logged (raises if it has none)."""
    # deferred: mlflow takes seconds to import
    import mlflow

    target, name = target_of(store), model_name(store, name)
    mlc = client(target)
    model_id = logged_model_id(target, name, version)
    logged = retry(target, f"reading the logged model of {name} version {version}", mlc.get_logged_model, model_id)
    with tempfile.TemporaryDirectory(prefix="gist-card-") as scratch:
        local = retry(
            target,
            f"downloading the model card of {name} version {version}",
            mlflow.artifacts.download_artifacts,
            artifact_uri=f"{logged.artifact_location.rstrip('/')}/{CARD_FILE}",
            dst_path=scratch,
            tracking_uri=target.uri,
        )
        return Path(local).read_text()
