"""Where training runs: the device, this process's rank and the number of processes.

Under ``torchrun`` / ``accelerate launch`` accelerate's ``PartialState`` knows the rank and world size
(it reads the launcher's environment); outside a launcher it is one process.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from gist_core.config import Settings
from gist_core.models import ModelRef, ensure_available, resolve_model


@cache
def _state() -> Any:
    # deferred: accelerate and torch take seconds to import
    import torch
    from accelerate import PartialState

    # The state is a process-wide singleton the trainer shares: set it up as the trainer will
    # (``use_cpu`` without CUDA), or accelerate sees one process on a multi-process CPU run.
    return PartialState(cpu=not torch.cuda.is_available())


def world_size() -> int:
    """Processes in this training run; 1 when not distributed."""
    if "WORLD_SIZE" not in os.environ:  # no launcher: do not start accelerate's state for nothing
        return 1
    return int(_state().num_processes)


def process_rank() -> int:
    if "WORLD_SIZE" not in os.environ:
        return 0
    return int(_state().process_index)


def is_main_process() -> bool:
    """Rank 0, the process that saves the model and talks to MLflow (True when not distributed)."""
    return process_rank() == 0


def pick_device() -> str:
    """CUDA (this process's GPU under torchrun), then Apple MPS, then CPU."""
    # deferred: torch takes seconds to import
    import torch

    if torch.cuda.is_available():
        local_rank = os.environ.get("LOCAL_RANK")
        return f"cuda:{local_rank}" if local_rank is not None and world_size() > 1 else "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cuda_bf16() -> bool:
    """Whether this machine's GPU trains in bfloat16."""
    # deferred: torch takes seconds to import
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (transformers' own ``set_seed``)."""
    # deferred: transformers takes seconds to import
    from transformers import set_seed as transformers_set_seed

    transformers_set_seed(seed)


def resolve_models(settings: Settings) -> tuple[ModelRef, ModelRef]:
    """The student and the guide, resolved (and provisioned, for packaged short names)."""
    models_dir = settings.path(settings.base.models_dir)
    student = ensure_available(resolve_model(settings.base.student, models_dir, settings.root))
    guide = ensure_available(resolve_model(settings.base.guide, models_dir, settings.root))
    return student, guide
