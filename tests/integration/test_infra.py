"""infra/: what can be checked without Docker or Kubernetes.

The files parse; prefect.yaml is valid for `prefect deploy` and agrees with the code (entrypoint,
deployment names, schedule); the Kubernetes template requests GPUs and defines every placeholder;
the compose file keeps secrets in env vars listed in .env.example (and validates with a docker
client's compose when one is installed); the image's pinned dependencies match pyproject.toml.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flows.deployments import ON_DEMAND, SCHEDULED
from gist_core.config import OrchestrationSettings, load_settings
from tests.support import services
from tests.support.projects import REPO

INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _yaml(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def test_prefect_yaml_is_valid_and_matches_the_code() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = _yaml("prefect.yaml")
    model = PrefectYamlModel.model_validate(raw)
    deployments = {d.name: d for d in model.deployments}
    assert set(deployments) == {ON_DEMAND, SCHEDULED, f"{ON_DEMAND}-gpu", f"{SCHEDULED}-gpu"}
    cron = load_settings(REPO).orchestration.schedule_cron
    assert cron == OrchestrationSettings().schedule_cron
    for name, deployment in deployments.items():
        path, _, function = deployment.entrypoint.partition(":")
        assert (REPO / path).is_file() and f"def {function}(" in (REPO / path).read_text()
        scheduled = name.startswith(SCHEDULED)
        gpu = name.endswith("-gpu")
        # the local scheduled retrain pulls the latest commit first; the GPU image is the project as built
        pulls = {"params": {"update_checkout": True}} if scheduled and not gpu else {}
        assert (deployment.parameters or {}) == pulls, "the project is the pull step's folder, not a parameter"
        assert [s.cron for s in deployment.schedules or []] == ([cron] if scheduled else [])
        assert deployment.work_pool.name == ("gist-gpu" if gpu else "gist-local")
        raw_deployment = next(d for d in raw["deployments"] if d["name"] == name)
        # local deployments run in the checkout: no image build; GPU ones build and use the image
        assert bool(raw_deployment.get("build")) is gpu and bool(raw_deployment.get("push")) is gpu
        (pull,) = raw_deployment["pull"]
        directory = pull["prefect.deployments.steps.set_working_directory"]["directory"]
        assert directory == ("/opt/gist" if gpu else "{{ $GIST_PROJECT_DIR }}")
        if gpu:
            assert deployment.work_pool.job_variables["image"] == "{{ build-image.image }}"
            build = raw_deployment["build"][0]["prefect_docker.deployments.steps.build_docker_image"]
            assert (REPO / build["dockerfile"]).is_file()
    assert not (model.build or model.push or model.pull), "no top-level steps: each deployment says its own"


def test_kubernetes_template_requests_gpus_and_defines_its_placeholders() -> None:
    template = json.loads((INFRA / "k8s" / "gpu-base-job-template.json").read_text())
    manifest = template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["name"] == "prefect-job" and container["args"] == "{{ command }}"
    variables = template["variables"]["properties"]
    placeholders = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables), placeholders - set(variables)
    assert variables["gpu_count"]["minimum"] == 1


def _env_references(text: str) -> set[str]:
    """${VAR}, ${VAR:-default} and ${VAR:?message} references ($$ escapes excluded)."""
    return set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))


def test_compose_keeps_secrets_in_env_vars_and_validates() -> None:
    text = (INFRA / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    assert {"postgres", "s3", "s3-buckets", "prefect-server", "mlflow", "worker"} <= set(compose["services"])
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line)
    referenced = _env_references(text)
    assert {"POSTGRES_PASSWORD", "S3_SECRET_ACCESS_KEY"} <= referenced
    documented = set(example) | {"GIST_WORK_POOL", "PREFECT_UI_API_URL"}
    assert referenced <= documented, "every variable is documented"
    for service in compose["services"].values():
        env = service.get("environment") or {}
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key) or "@" in str(value):
                assert "${" in str(value), f"{key} must come from an environment variable"
    assert not (INFRA / ".env").exists(), "infra/.env holds real secrets: never in the repository"
    gpu = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    prefect_image = compose["services"]["prefect-server"]["image"]
    assert _pins()["prefect"] == Version(prefect_image.split(":")[1].split("-")[0]), "server and client versions"

    # The one check that needs a compose implementation; everything above runs regardless.
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cmd = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose"]
    else:
        warnings.warn("no docker compose: compose.yaml not validated by compose itself", stacklevel=1)
        return
    proc = subprocess.run(
        [*cmd, "-f", str(INFRA / "compose.yaml"), "--env-file", str(INFRA / ".env.example"), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (INFRA / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: the image pins exact versions"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _declared() -> dict[str, Requirement]:
    deps = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["s3"]]
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in deps}


def test_image_dependencies_match_pyproject() -> None:
    pins, declared = _pins(), _declared()
    assert set(pins) == set(declared), {
        "not pinned": set(declared) - set(pins),
        "not declared": set(pins) - set(declared),
    }
    for name, requirement in declared.items():
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"
    extras = {
        canonicalize_name(Requirement(line).name): Requirement(line).extras
        for line in (INFRA / "requirements-gpu.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert extras["sentence-transformers"] == declared["sentence-transformers"].extras

    dockerfile = (INFRA / "gpu-worker.Dockerfile").read_text()
    torch_arg = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert Version(torch_arg) == pins["torch"]
    python_arg = re.search(r"^ARG PYTHON_VERSION=(\S+)$", dockerfile, re.M).group(1)
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python_arg + ".0")
    assert "COPY infra/requirements-gpu.txt" in dockerfile and "pip install -r /tmp/requirements.txt" in dockerfile
    assert 'pip install --no-deps -e ".[s3]"' in dockerfile and "pip check" in dockerfile
    assert "gist models provision" in dockerfile, "default models are baked in, not fetched at run time"
    mlflow_image = (INFRA / "mlflow.Dockerfile").read_text()
    assert f"mlflow:v{pins['mlflow']}" in mlflow_image, "tracking server and client on the same MLflow"


def test_compose_describes_what_the_shared_services_test_runs() -> None:
    """Service names, buckets, server flags, the worker's command and environment: compose and the test agree."""
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line)
    assert (example["MLFLOW_BUCKET"], example["DVC_BUCKET"]) == (services.MLFLOW_BUCKET, services.DVC_BUCKET)
    mlflow = compose["mlflow"]["command"]
    assert any(a.startswith("--backend-store-uri=postgresql+psycopg2://") for a in mlflow)
    assert "--artifacts-destination=s3://${MLFLOW_BUCKET:-gist-mlflow}/artifacts" in mlflow and "--workers=1" in mlflow
    assert compose["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert compose["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == "${PREFECT_UI_API_URL:-/api}"
    assert "postgresql+asyncpg://" in compose["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    worker = compose["worker"]
    pool = services.POOL
    assert worker["command"] == ["prefect", "worker", "start", "--pool", f"${{GIST_WORK_POOL:-{pool}}}"]
    client_env = services.SharedServices(Path("/nonexistent")).client_env()
    shared = {k for k in client_env if k.startswith(("PREFECT_API", "MLFLOW_", "AWS_"))}
    assert shared <= set(worker["environment"]) | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    assert "GIST_PROJECT_DIR" in worker["environment"]
    readme = (INFRA / "README.md").read_text()
    for needle in (f"prefect worker start --pool {pool}", "GIST_PROJECT_DIR", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"):
        assert needle in readme, needle


@pytest.mark.parametrize("name", ["README.md"])
def test_infra_readme_names_the_settings_that_change(name: str) -> None:
    text = (INFRA / name).read_text()
    for needle in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "dvc remote", "work-pool", "gist serve", "torchrun"):
        assert needle in text, needle


def test_no_secrets_in_infra_files() -> None:
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not re.search(
                r"(?i)(password|secret)[\"']?\s*[:=]\s*[\"']?(?!\$|change-me|\{\{)[A-Za-z0-9/+]{8,}", text
            ), path
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
    assert "/infra/.env" in (REPO / ".gitignore").read_text().splitlines()
