"""Seconds per training step and peak memory of the guided losses, side by side on the same batches.

At each batch size, on identical task-homogeneous, duplicate-free batches of the prepared triplets:

- ``gist-live``: sentence-transformers' GISTEmbedLoss, the guide model run on every step;
- ``gist-cached``: GISTEmbedLoss guided by a GuideEmbeddingCache (gist_core.loss), only the student runs;
- ``mnrl``: MultipleNegativesRankingLoss, no guide;
- ``gist-cached-gc``: CachedGISTEmbedLoss (GradCache, ``--mini-batch`` rows per forward) with the cache;

plus the one-off cost of building the guide cache for the benchmark's texts (``--cache-all``: for
every text of the triplets file). Run from the project root when the machine is otherwise idle:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_loss_speed.py --json bench/train_loss_speed.json

Method. A step is what the trainer does per batch: the loss's forward and backward, an AdamW step and
zero_grad, student in train mode, inputs already tokenized; each loss has its own copy of the
student and its own optimizer. Time: for each batch size one subprocess steps the three losses on
the same batches in turn (rotating which goes first), so a burst of load from elsewhere hits all of
them alike; ``--warmup`` steps are not timed and the median of the ``--steps`` timed steps is
reported. Memory: each configuration alone in its own subprocess (fresh allocator), the process's
resident set (RSS, /proc/self/statm) sampled every 5 ms by a thread: ``peak_rss`` is the highest
value during the measured steps and ``step_mem`` that peak minus the RSS just before them, after
warm-up, so weights and optimizer state are in the baseline and ``step_mem`` is what a step itself
needs (activations, similarity matrices, gradients). glibc is told to give every block above 64 KiB
its own mapping (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the RSS instead of inflating the
baseline. tracemalloc is not used: it sees only Python's allocations, not torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also runs from a checkout where the package is not installed
    sys.path.insert(0, str(REPO))

LOSSES = ("gist-live", "gist-cached", "mnrl")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the process's RSS every 5 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def make_batches(triplets: Path, batch_size: int, count: int, seed: int) -> list[list[list[str]]]:
    """``count`` batches without a repeated text (like NO_DUPLICATES), each from one task when it has enough
    distinct triplets, else from all tasks (only the memory runs at the largest batch sizes need that)."""
    import numpy as np
    import pandas as pd

    frame = pd.read_parquet(triplets)
    rng = np.random.default_rng(seed)
    tasks = sorted(frame["task_name"].unique())

    def draw(rows: pd.DataFrame) -> list[list[str]] | None:
        seen: set[str] = set()
        columns: list[list[str]] = [[], [], []]
        for i in rng.permutation(len(rows)):
            texts = [str(rows.iloc[int(i)][c]) for c in ("anchor", "positive", "negative")]
            if len(set(texts)) < 3 or seen.intersection(texts):
                continue
            seen.update(texts)
            for column, text in zip(columns, texts, strict=True):
                column.append(text)
            if len(columns[0]) == batch_size:
                return columns
        return None

    batches = []
    for n in range(count):
        batch = draw(frame[frame["task_name"] == tasks[n % len(tasks)]]) or draw(frame)
        if batch is None:
            raise SystemExit(f"the triplets have too few distinct texts for a batch of {batch_size}")
        batches.append(batch)
    return batches


class Trainee:
    """One loss with its own copy of the student and its own optimizer, stepping like the trainer does."""

    def __init__(self, kind: str, spec: dict[str, Any], guide_model: Any, cache: Any) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from gist_core.config import TrainSettings
        from gist_core.training.loss import GuideEmbeddingCache, build_loss

        torch.manual_seed(0)
        self.kind = kind
        self.student = SentenceTransformer(spec["student"], device="cpu")
        self.student.max_seq_length = spec["max_seq_length"]
        settings = TrainSettings(
            loss="mnrl" if kind == "mnrl" else "gist",
            batch_size=spec["batch_size"],
            mini_batch_size=spec["mini_batch_size"] if kind == "gist-cached-gc" else None,
        )
        guide = None
        if kind == "gist-live":
            guide = guide_model
        elif kind.startswith("gist-cached"):
            guide = GuideEmbeddingCache(self.student, cache.keys, cache.embeddings, spec["max_seq_length"])
        self.loss = build_loss(settings, self.student, guide)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=2e-5)
        self.student.train()

    def features(self, batches: list) -> list:
        return [[self.student.preprocess(column) for column in batch] for batch in batches]

    def step(self, batch_features: list[dict]) -> float:
        value = self.loss([dict(f) for f in batch_features], None)
        value.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(value.detach())


def _load_shared(spec: dict[str, Any], kinds: list[str]) -> tuple[Any, Any]:
    from sentence_transformers import SentenceTransformer

    from gist_core.training.guide_cache import read_guide_cache

    guide = cache = None
    if "gist-live" in kinds:
        guide = SentenceTransformer(spec["guide"], device="cpu")
        guide.max_seq_length = spec["max_seq_length"]
        guide.eval()
        guide.requires_grad_(False)
    if any(k.startswith("gist-cached") for k in kinds):
        cache, _ = read_guide_cache(Path(spec["cache_dir"]))
    return guide, cache


def run_timing(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Seconds per step of several losses on the same batches, interleaved step by step.

    Interleaving makes a burst of load from elsewhere on the machine hit every loss alike; the
    median over steps discards the worst of it.
    """
    import numpy as np
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    guide, cache = _load_shared(spec, spec["kinds"])
    trainees = [Trainee(kind, spec, guide, cache) for kind in spec["kinds"]]
    batches = json.loads(Path(spec["batches"]).read_text())
    features = {t.kind: t.features(batches) for t in trainees}
    seconds: dict[str, list[float]] = {t.kind: [] for t in trainees}
    losses: dict[str, list[float]] = {t.kind: [] for t in trainees}
    for n in range(len(batches)):
        order = trainees[n % len(trainees) :] + trainees[: n % len(trainees)]  # rotate who goes first
        for trainee in order:
            started = time.perf_counter()
            value = trainee.step(features[trainee.kind][n])
            if n >= spec["warmup"]:
                seconds[trainee.kind].append(time.perf_counter() - started)
                losses[trainee.kind].append(value)
    return [
        {
            "loss": kind,
            "batch_size": spec["batch_size"],
            "mini_batch_size": None,
            "steps": len(seconds[kind]),
            "seconds_per_step": float(np.median(seconds[kind])),
            "seconds_min": float(np.min(seconds[kind])),
            "seconds_all": [round(x, 3) for x in seconds[kind]],
            "mean_loss": float(np.mean(losses[kind])),
        }
        for kind in spec["kinds"]
    ]


def run_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """One loss alone in this process: warm up, then the RSS peak of the measured steps (and their time)."""
    import resource

    import numpy as np
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kind = spec["kinds"][0]
    guide, cache = _load_shared(spec, [kind])
    trainee = Trainee(kind, spec, guide, cache)
    features = trainee.features(json.loads(Path(spec["batches"]).read_text()))
    for batch_features in features[: spec["warmup"]]:
        trainee.step(batch_features)
    baseline = _rss()
    seconds = []
    with PeakRSS() as peak:
        for batch_features in features[spec["warmup"] :]:
            started = time.perf_counter()
            trainee.step(batch_features)
            seconds.append(time.perf_counter() - started)
    return {
        "loss": kind,
        "batch_size": spec["batch_size"],
        "mini_batch_size": spec["mini_batch_size"] if kind == "gist-cached-gc" else None,
        "seconds_per_step": float(np.median(seconds)),
        "peak_rss_mb": peak.peak / 2**20,
        "step_mem_mb": (peak.peak - baseline) / 2**20,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def build_cache(student_dir: Path, guide_dir: Path, texts: list[str], max_seq_length: int, out: Path) -> dict:
    """Embed ``texts`` with the guide as the loss would, write the cache, and time it."""
    from sentence_transformers import SentenceTransformer

    from gist_core.training.guide_cache import CacheIdentity, embed_like_gist_loss, write_guide_cache

    student = SentenceTransformer(str(student_dir), device="cpu")
    student.max_seq_length = max_seq_length
    started = time.perf_counter()
    guide = SentenceTransformer(str(guide_dir), device="cpu")
    guide.max_seq_length = max_seq_length
    loaded = time.perf_counter()
    cached = embed_like_gist_loss(student, guide, texts)
    seconds = time.perf_counter() - loaded
    write_guide_cache(out, cached, CacheIdentity("bench", "bench", "bench", max_seq_length, "bench"), {})
    return {
        "texts": len(texts),
        "entries": len(cached.keys),
        "guide_load_seconds": loaded - started,
        "embed_seconds": seconds,
        "entries_per_second": len(cached.keys) / seconds,
        "retokenized": cached.retokenized,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=REPO / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--guide", type=Path, default=REPO / "models" / "all-mpnet-base-v2")
    parser.add_argument("--triplets", type=Path, default=REPO / "data" / "prepared" / "triplets.parquet")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--gradcache-batch-sizes", type=int, nargs="*", default=[32, 512])
    parser.add_argument("--mini-batch", type=int, default=32, help="GradCache mini-batch")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--gradcache-steps", type=int, default=1, help="timed steps per GradCache configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--cache-all", action="store_true", help="also time the guide cache of every triplet text")
    parser.add_argument("--phases", nargs="+", choices=["timing", "memory"], default=["timing", "memory"])
    parser.add_argument("--json", type=Path, default=None, help="also write the record here")
    parser.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)  # a child's spec
    args = parser.parse_args(argv)

    if args.config is not None:
        spec = json.loads(args.config.read_text())
        result = run_timing(spec) if spec["mode"] == "timing" else run_memory(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import pandas as pd

    record: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        "student": args.student.name,
        "guide": args.guide.name,
        "max_seq_length": args.max_seq_length,
    }
    memory_plan = [(kind, bs) for bs in args.batch_sizes for kind in LOSSES]
    memory_plan += [("gist-cached-gc", bs) for bs in args.gradcache_batch_sizes]
    record["timing"], record["memory"] = [], []
    with tempfile.TemporaryDirectory(prefix="gist-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        batch_files: dict[int, Path] = {}
        texts: list[str] = []
        for bs in sorted({*args.batch_sizes, *args.gradcache_batch_sizes}):
            count = args.warmup + (args.steps if bs in args.batch_sizes else args.gradcache_steps)
            batches = make_batches(args.triplets, bs, count, seed=bs)
            batch_files[bs] = tmp / f"batches-{bs}.json"
            batch_files[bs].write_text(json.dumps(batches))
            texts += [t for batch in batches for column in batch for t in column]
        if args.cache_all:
            frame = pd.read_parquet(args.triplets)
            texts += [t for column in ("anchor", "positive", "negative") for t in frame[column].astype(str)]
        cache_dir = tmp / "guide_cache"
        record["guide_cache"] = build_cache(args.student, args.guide, texts, args.max_seq_length, cache_dir)
        print(f"guide cache: {json.dumps(record['guide_cache'])}", flush=True)

        def child(mode: str, kinds: list[str], bs: int) -> Any:
            spec = {
                "mode": mode,
                "kinds": kinds,
                "batch_size": bs,
                "mini_batch_size": args.mini_batch,
                "student": str(args.student),
                "guide": str(args.guide),
                "max_seq_length": args.max_seq_length,
                "cache_dir": str(cache_dir),
                "batches": str(batch_files[bs]),
                "warmup": args.warmup,
                "threads": args.threads,
            }
            spec_file = tmp / f"spec-{mode}-{'-'.join(kinds)}-{bs}.json"
            spec_file.write_text(json.dumps(spec))
            env = dict(os.environ)
            if mode == "memory":
                # Every allocation above 64 KiB gets its own mapping, returned to the OS when freed, so RSS
                # follows the memory in use instead of what glibc keeps from earlier steps.
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--config", str(spec_file)],
                capture_output=True,
                text=True,
                env=env,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{mode} {kinds} at batch {bs} failed:\n{proc.stderr[-3000:]}")
            return json.loads(lines[-1][len("RESULT ") :])

        for bs in args.batch_sizes if "timing" in args.phases else []:
            for result in child("timing", list(LOSSES), bs):
                record["timing"].append(result)
                print(
                    f"time   {result['loss']:<15} batch {bs:>4}: {result['seconds_per_step']:7.2f} s/step "
                    f"(median of {result['steps']}: {result['seconds_all']})",
                    flush=True,
                )
        for kind, bs in memory_plan if "memory" in args.phases else []:
            result = child("memory", [kind], bs)
            record["memory"].append(result)
            print(
                f"memory {kind:<15} batch {bs:>4} mini {result['mini_batch_size'] or '-':>4}: "
                f"step memory {result['step_mem_mb']:6.0f} MB, peak RSS {result['peak_rss_mb']:6.0f} MB, "
                f"{result['seconds_per_step']:.2f} s/step",
                flush=True,
            )
    record["machine"]["load_after"] = os.getloadavg()
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
