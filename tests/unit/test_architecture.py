"""The code's shape, checked: import layers and cycles, DVC deps that follow the code, deferred imports, sizes.

Static checks over the source tree: no model, server or network.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import tomllib
import yaml

from tests.support.projects import REPO

PACKAGES = ("gist_core", "flows")
MAX_MODULE_LINES = 600
# The module each DVC stage's command runs (through the CLI and gist_core.stages, which are thin).
STAGE_ENTRIES = {
    "gist data --step mine": "gist_core.data.stage",
    "gist data --step combine": "gist_core.data.stage",
    "gist guide-cache": "gist_core.training.guide_cache",
}
# What may be imported inside a function: libraries that take seconds to import (so light commands
# and DVC stages do not pay for them) and our modules that import such libraries at their top.
HEAVY_LIBRARIES = {
    "accelerate",
    "datasets",
    "huggingface_hub",
    "matplotlib",
    "mlflow",
    "mteb",
    "prefect",
    "sentence_transformers",
    "torch",
    "tqdm",
    "transformers",
}
HEAVY_MODULES = {
    "gist_core.training.loss",  # torch and sentence-transformers at its top (it subclasses their classes)
    "gist_core.training.batching",  # sentence-transformers' samplers
    "gist_core.evaluation.encoding",  # mteb's encoder wrapper
    "flows.pipeline",  # Prefect
    "flows.ablation",
    "flows.deployments",
}


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_import_contracts_hold() -> None:
    """import-linter's contracts in pyproject.toml: layers, independence, no Prefect in the core, no cycles."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, no_cache=True, no_logo=True))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    contracts = len(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"])
    assert proc.returncode == 0 and f"Contracts: {contracts} kept, 0 broken." in proc.stdout, (
        proc.stdout[-4000:] + proc.stderr[-2000:]
    )


def _dvc_path_covers(deps: list[str], module_file: Path) -> bool:
    relative = module_file.relative_to(REPO).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_dvc_stage_deps_cover_every_module_the_stage_runs() -> None:
    """Editing any gist_core module a stage's command imports (transitively) must rerun that stage."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    graph = grimp.build_graph("gist_core", exclude_type_checking_imports=True, cache_dir=None)
    for name, stage in stages.items():
        entry = STAGE_ENTRIES.get(stage["cmd"])
        assert entry is not None, f"dvc.yaml stage {name}: command {stage['cmd']!r} has no entry module in this test"
        modules = {entry, *(m for m in graph.find_upstream_modules(entry) if m.startswith("gist_core"))}
        uncovered = []
        for module in sorted(modules):
            path = REPO / (module.replace(".", "/") + ".py")
            if not path.is_file():
                path = REPO / module.replace(".", "/") / "__init__.py"
            if not _dvc_path_covers([str(d) for d in stage["deps"]], path):
                uncovered.append(path.relative_to(REPO).as_posix())
        assert not uncovered, f"dvc.yaml stage {name}: its command runs {uncovered}, which are not in its deps"


def test_dvc_stage_deps_check_catches_a_missing_dep() -> None:
    deps = ["gist_core/data", "gist_core/config.py"]
    assert _dvc_path_covers(deps, REPO / "gist_core/data/mine.py")
    assert not _dvc_path_covers(deps, REPO / "gist_core/models.py")
    assert not _dvc_path_covers(deps, REPO / "gist_core/data_extra.py")


def _function_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    found.append(inner)
    return found


def _explained(lines: list[str], index: int) -> bool:
    """A comment on the import's line or on the lines of the import block above it."""
    while index >= 0:
        text = lines[index].strip()
        if "#" in text:
            return True
        if text and not text.startswith(("import ", "from ", ")")) and not text.endswith((",", "(")):
            return False
        index -= 1
    return False


def test_imports_inside_functions_are_heavy_and_say_so() -> None:
    """Imports sit at module top; one inside a function is a heavy library (or our module importing one)
    and carries a comment saying why."""
    problems = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for node in _function_level_imports(ast.parse("\n".join(lines))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES:
                    if name not in HEAVY_MODULES:
                        problems.append(f"{where}: {name} imported inside a function (move it to the top)")
                elif top not in HEAVY_LIBRARIES:
                    problems.append(f"{where}: {name} is light: import it at the top")
            if not _explained(lines, node.lineno - 1):
                problems.append(f"{where}: deferred import without a comment saying why")
    assert not problems, "\n".join(problems)


def test_no_module_is_over_600_lines() -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _modules()}
    assert not {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES}


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in tests/support (or conftest fixtures), never in a test module."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
                leaf = (node.module or "").rsplit(".", 1)[-1]
                if leaf.startswith("test_") or leaf == "conftest":
                    offenders.append(f"{path.relative_to(REPO)}: from {node.module} import ...")
    assert not offenders, offenders


def test_core_never_imports_the_orchestration() -> None:
    """A plain check beside import-linter's: no `prefect` or `flows` import anywhere in gist_core."""
    for path in (REPO / "gist_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("prefect", "flows") for n in names), path
