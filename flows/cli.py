"""The installed ``gist`` command: the stage commands of ``gist_core.cli`` plus the orchestration ones.

``pipeline`` runs the Prefect flow once, ``ablation`` the ablation flow, ``serve`` the deployments.
They join the core's own Typer app, so ``gist --help`` lists every command in one place, while
``gist_core`` itself never imports Prefect.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.parameters import PROJECT_ENV, PipelineParameters
from gist_core.ablation.plan import check as check_ablation
from gist_core.cli import RootOpt, SetOpt, app, cli_settings, friendly, parse_overrides
from gist_core.stages import UnchangedResult, preflight

__all__ = ["app"]


@app.command()
@friendly
def pipeline(root: RootOpt = Path("."), overrides: SetOpt = None) -> None:
    """Run the whole Prefect flow: version data -> fine-tune -> evaluate -> register + gate."""
    parsed = parse_overrides(overrides)
    preflight(cli_settings(root, overrides))  # fail on bad settings or inputs before Prefect starts
    # deferred: Prefect takes seconds to import; the stage commands (DVC runs them) never need it
    from flows.pipeline import gist_pipeline

    os.environ[PROJECT_ENV] = str(root.resolve())  # the flow works on this checkout
    result = gist_pipeline(params=PipelineParameters(overrides=parsed))
    typer.echo("")
    typer.echo("== GIST pipeline finished ==")
    if isinstance(result, UnchangedResult):
        typer.echo(result.headline())
        return
    for task, score in result.evaluation.candidate.items():
        base = result.evaluation.baseline[task]
        typer.echo(f"  {task:<28} candidate {score:.4f}  base {base:.4f}  delta {score - base:+.4f}")
    typer.echo(result.headline())


@app.command()
@friendly
def ablation(
    root: RootOpt = Path("."),
    overrides: SetOpt = None,
    quick: Annotated[bool, typer.Option(help="a few-minute smoke run (2 steps, 2 seeds, STSBenchmark)")] = False,
) -> None:
    """Does the guide help? Train every arm of params.yaml's ``ablation`` per seed and noise level, then report."""
    # deferred: Prefect takes seconds to import; the stage commands (DVC runs them) never need it
    from flows.ablation import AblationParameters, apply_ablation_parameters, gist_ablation

    params = AblationParameters(quick=quick, overrides=parse_overrides(overrides))
    settings = apply_ablation_parameters(cli_settings(root), params)
    preflight(settings)  # bad settings fail before Prefect starts
    check_ablation(settings)
    command = "gist " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["ablation"] else "gist ablation"
    os.environ[PROJECT_ENV] = str(root.resolve())  # the flow works on this checkout
    paths = gist_ablation(params=params, command=command)
    typer.echo("")
    typer.echo("== GIST ablation finished ==")
    typer.echo(Path(paths["markdown"]).read_text())
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command()
@friendly
def serve(
    root: RootOpt = Path("."),
    port: Annotated[int, typer.Option(help="local Prefect server port (used when PREFECT_API_URL is unset)")] = 4200,
    schedule: Annotated[bool, typer.Option(help="also serve the scheduled-retrain deployment")] = True,
) -> None:
    """Serve the pipeline's deployments for UI-triggered and scheduled runs (starts a Prefect server if needed)."""
    # deferred: Prefect takes seconds to import; the stage commands (DVC runs them) never need it
    from flows.deployments import serve_pipeline

    serve_pipeline(cli_settings(root), port=port, schedule=schedule, echo=typer.echo)
