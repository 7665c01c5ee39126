# syntax=docker/dockerfile:1
# The image GPU flow runs execute in (Kubernetes work pool `gist-gpu`, compose profile `gpu`).
# CUDA torch, every dependency from pyproject.toml (pinned in infra/requirements-gpu.txt), the
# project and the two packaged default models are installed here, at build time: a run installs
# nothing. Build from the repository root:
#   docker build -f infra/gpu-worker.Dockerfile -t <registry>/gist-pipeline:<git sha> .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_VERSION=2.13.0
# CUDA 12.8 wheels carry their CUDA libraries; the node needs only a recent NVIDIA driver.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# git: DVC needs the repository, and each model version records its commit.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/gist

# 1. CUDA torch first, so the step below keeps it instead of resolving a CPU or another CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2. The pinned dependencies: a layer rebuilt only when the pins change.
COPY infra/requirements-gpu.txt /tmp/requirements-gpu.txt
RUN grep -v '^torch==' /tmp/requirements-gpu.txt > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

# 3. The project (code, params.yaml, dvc.yaml, dvc.lock, data/raw, .git) and the `gist` command.
COPY . /opt/gist
RUN pip install --no-deps -e ".[s3]" \
    && pip check \
    && gist models provision

# Flow runs are started by the worker (`prefect flow-run execute`); this is for a shell.
CMD ["gist", "--help"]
