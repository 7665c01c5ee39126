"""The paper's scale, measured: MEDI-shaped data through `gist data`, the guide cache and 50 training steps.

For each size (records of synthetic MEDI in the original ``medi-data.json`` shape) it writes a
project (params.yaml pointing at the file, tiny models), then runs each stage in a fresh process
and records wall time and peak RSS (``ru_maxrss`` of that process):

- ``data``: `gist data` (MEDI streamed, contamination, dedup, caps, write; no guide verdicts);
- ``encode``: the guide's raw ``encode`` of the distinct texts (the yardstick of the cache build);
- ``guide_cache``: `gist guide-cache` (the DVC stage), with an empty embedding store;
- ``train``: `gist train` for ``--steps`` steps: start-up (process start to the first step) and the
  median seconds per step over the full-batch steps after the first ``--warmup`` (``step_seconds``:
  the same step at every size; at 10k most synthetic tasks are smaller than one batch and give
  partial batches, whose median is ``step_seconds_all``). The data loader fetches one batch ahead,
  so a step's interval holds the next batch's reading and tokenizing: a full-batch step is one whose
  own batch and the next are full;
- ``torchrun``: the same training with two processes on this host: the ranks' peak RSS and their
  proportional set size (PSS: a shared page counts once across the ranks) at the end.

``--passes`` adds the guide-pass accounting of issue 13 item 4 at the smallest size: mining (a
synthetic classification source), the audit's verdicts (MEDI's texts) and the training cache,
each pass's texts, encoded texts and seconds, sharing one embedding store.

``--stages train`` measures training again on the data and guide cache a previous run left in
``--work`` (each size's ``records-N`` folder), without regenerating them.

Models: a 1-layer BERT (hidden 64) as student and another as guide, random, with all-MiniLM-L6-v2's
tokenizer (from ``models/``), built by the script. Prints a Markdown table and writes JSON.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/scale.py --sizes 10000 100000 200000 1000000 \
        --json bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
STARTED = time.perf_counter()
TASKS = 330
REPEAT_SHARE = 0.10
BATCH_SIZE = 32
MAX_SEQ_LENGTH = 64


# ---------------------------------------------------------------- synthetic data


def _vocabulary(rng: np.random.Generator, size: int = 8000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 10, size=size)
    return np.array(["".join(rng.choice(letters, n)) for n in lengths], dtype=object)


def _texts(rng: np.random.Generator, vocab: np.ndarray, n: int, mean_words: int) -> list[str]:
    counts = np.maximum(3, rng.poisson(mean_words, size=n))
    words = vocab[rng.zipf(1.3, size=int(counts.sum())) % len(vocab)]
    ends = np.cumsum(counts)
    out = [" ".join(words[e - c : e]) for e, c in zip(ends, counts, strict=True)]
    return [t[:1].upper() + t[1:] + "." for t in out]


def write_medi(path: Path, records: int, seed: int = 0) -> dict[str, Any]:
    """MEDI-shaped records in the original JSON-list shape: ~330 tasks (skewed sizes), ~10% repeated texts.

    Lengths follow MEDI: queries ~10 words, positives and negatives ~35 (MEDI mixes sentence pairs
    and passages; training cuts texts to 64 tokens anyway).
    """
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    weights = 1.0 / np.arange(1, TASKS + 1) ** 0.8
    task_of = rng.choice(TASKS, size=records, p=weights / weights.sum())
    instructions = [f"Represent the {w} sentence for retrieving supporting documents:" for w in vocab[:TASKS]]
    pool: dict[int, list[str]] = {}
    repeated = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        out.write("[")
        chunk = 20_000
        for begin in range(0, records, chunk):
            n = min(chunk, records - begin)
            queries = _texts(rng, vocab, n, 10)
            positives = _texts(rng, vocab, n, 35)
            negatives = _texts(rng, vocab, n, 35)
            parts = []
            for i in range(n):
                task = int(task_of[begin + i])
                texts = [queries[i], positives[i], negatives[i]]
                seen = pool.setdefault(task, [])
                for k in range(3):
                    if seen and rng.random() < REPEAT_SHARE:
                        texts[k] = seen[int(rng.integers(len(seen)))]
                        repeated += 1
                    elif len(seen) < 200:
                        seen.append(texts[k])
                instruction = instructions[task]
                record = {
                    "query": [instruction, texts[0]],
                    "pos": [instruction, texts[1]],
                    "neg": [instruction, texts[2]],
                    "task_name": f"task_{task:03d}",
                }
                parts.append(json.dumps(record))
            out.write(("," if begin else "") + ",".join(parts))
        out.write("]")
    return {"records": records, "tasks": int(len(np.unique(task_of))), "repeated_texts": repeated}


def write_classification(path: Path, rows: int, seed: int = 1) -> None:
    """A synthetic labelled split (20 labels) for the guide-pass accounting's mining pass."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    texts = _texts(rng, vocab, rows, 12)
    labels = rng.integers(0, 20, size=rows)
    lines = ["text\tlabel", *(f"{t}\tlabel{lab}" for t, lab in zip(texts, labels, strict=True))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- tiny models and projects


def random_sentence_transformer(
    out: Path, seed: int, pooling: str = "mean", max_seq_length: int = 512, **config: int
) -> Path:
    """A random BERT of the given shape with all-MiniLM-L6-v2's tokenizer, saved as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "models" / "all-MiniLM-L6-v2"))
    torch.manual_seed(seed)
    hf = out.parent / f"hf-{out.name}"
    BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **config)).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    transformer = Transformer(str(hf), max_seq_length=max_seq_length)
    pooled = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    SentenceTransformer(modules=[transformer, pooled]).save(str(out))
    return out


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """A 1-layer random BERT student and guide (hidden 64) with all-MiniLM-L6-v2's tokenizer."""
    student, guide = folder / "student", folder / "guide"
    if (student / "modules.json").is_file() and (guide / "modules.json").is_file():
        return student, guide
    shape = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 256}
    for seed, out in ((0, student), (1, guide)):
        random_sentence_transformer(out, seed, max_seq_length=MAX_SEQ_LENGTH, **shape)
    return student, guide


def write_project(root: Path, medi: Path, student: Path, guide: Path, steps: int, **extra: Any) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"].update({"student": str(student), "guide": str(guide), "models_dir": str(REPO / "models")})
    params["data"].update(
        {
            "classification": extra.get("classification", []),
            "medi": {"path": str(medi)},
            "max_per_task": None,  # the paper's scale: every triplet
        }
    )
    params["data"]["audit"]["guide_verdicts"] = extra.get("verdicts", False)
    params["data"]["mining"].update(
        {"cache_dir": str(root / "store"), "max_seq_length": MAX_SEQ_LENGTH, "max_texts_per_task": None}
    )
    params["evaluate"]["data_dir"] = str(REPO / "data" / "raw")
    params["train"].update(
        {
            "max_steps": steps,
            "batch_size": BATCH_SIZE,
            "max_seq_length": MAX_SEQ_LENGTH,
            "save_steps": None,
            "logging_steps": 10,
            "batch_sampler": extra.get("sampler", "no_duplicates"),
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


# ---------------------------------------------------------------- one stage in its own process


def _pss_kb() -> int:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _rss_split_mb() -> dict[str, float]:
    """Resident memory now, split: anonymous (this process's own) and file-backed (memory-mapped
    files: the page cache, shared between processes and reclaimable)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0].lower().replace("rss", "rss_") + "_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def child(stage: str, root: Path, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """Run one stage in this process; returns its measurements (printed as JSON by ``main``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from gist_core.config import load_settings

    settings = load_settings(root)
    out: dict[str, Any] = {"stage": stage}
    began = time.perf_counter()
    if stage == "data":
        from gist_core.stages import run_data_stage

        report = run_data_stage(settings)
        out["kept"] = report.totals["kept"]
        out["input_rows"] = report.totals["input_rows"]
    elif stage == "passes":
        from gist_core.stages import run_embed_stage

        manifest = run_embed_stage(settings)
        out["passes"] = manifest.get("passes", {})
    elif stage == "encode":
        from sentence_transformers import SentenceTransformer

        from gist_core.training.guide_cache import triplet_texts

        texts = triplet_texts(settings.path(settings.data.output)).unique().to_pylist()
        guide = SentenceTransformer(settings.base.guide, device="cpu")
        guide.max_seq_length = settings.train.max_seq_length
        tick = time.perf_counter()
        guide.encode(texts, batch_size=64, show_progress_bar=False, convert_to_numpy=True)
        out["encode_seconds"] = round(time.perf_counter() - tick, 2)
        out["distinct_texts"] = len(texts)
    elif stage == "guide_cache":
        from gist_core.stages import run_guide_cache

        manifest = run_guide_cache(settings)
        out.update({k: manifest.get(k) for k in ("texts", "distinct_texts", "entries", "embedded", "from_store")})
        out.update({k: manifest.get(k) for k in ("tokenize_seconds", "embed_seconds", "seconds", "dtype", "dim")})
    elif stage == "train":
        from transformers import TrainerCallback

        from gist_core.training.trainer import train

        marks: list[float] = []
        rows: list[int] = []  # each step's anchors (a task smaller than a batch gives a partial one)
        tokens: list[int] = []  # each step's padded token count over its columns (the model's work)

        def count_rows(module: Any, inputs: tuple[Any, ...]) -> None:
            if not (rows and inputs and isinstance(inputs[0], dict) and "input_ids" in inputs[0]):
                return
            shape = inputs[0]["input_ids"].shape
            if not rows[-1]:
                rows[-1] = int(shape[0])
            tokens[-1] += int(shape[0] * shape[1])

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
                model.register_forward_pre_hook(count_rows)  # the first forward of a step: its anchors

            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                marks.append(time.perf_counter())
                rows.append(0)
                tokens.append(0)

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                marks.append(time.perf_counter())

        result = train(settings, settings.path(settings.data.output), callbacks=[StepTimer()])
        steps_seconds = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
        # accelerate's data loader fetches one batch ahead: a step's interval trains its batch and
        # fetches (reads, tokenizes) the next, so a full step is one whose batch and the next are full
        size = settings.train.batch_size
        ahead = [*rows[1:], 0]
        timed = list(zip(steps_seconds, rows, ahead, tokens, strict=False))[warmup:]
        full_steps = [(seconds, t) for seconds, n, following, t in timed if n == following == size]
        full = [seconds for seconds, _ in full_steps]
        out["full_batch_tokens"] = round(statistics.mean(t for _, t in full_steps)) if full_steps else None
        out["startup_seconds"] = round(marks[0] - STARTED, 2) if marks else None
        # the same step at every size: a full batch (at 10k most tasks are smaller than one batch)
        out["step_seconds"] = round(statistics.median(full), 4) if full else None
        out["full_batch_steps"] = len(full)
        out["full_step_seconds"] = [round(x, 5) for x in full]
        out["step_seconds_all"] = round(statistics.median(t[0] for t in timed), 4) if timed else None
        out["mean_rows_per_step"] = round(statistics.mean(t[1] for t in timed), 1) if timed else None
        out["steps"] = result.steps
        out["world_size"] = result.world_size
        out["skipped_tasks"] = len(result.skipped_tasks)
        out["pss_mb"] = round(_pss_kb() / 1024, 1)
        out |= _rss_split_mb()
    out["seconds"] = round(time.perf_counter() - began, 2)
    out["process_seconds"] = round(time.perf_counter() - STARTED, 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


THREADS = 0  # torch threads per process (0: torch's default); set by --threads


def run_stage(stage: str, root: Path, steps: int, warmup: int, ranks: int = 1) -> list[dict[str, Any]]:
    """Run a stage in a fresh process (or ``ranks`` torchrun processes); returns each process's measurements."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    args = [str(Path(__file__).resolve()), "--child", stage, "--root", str(root), "--steps", str(steps)]
    args += ["--warmup", str(warmup), "--threads", str(THREADS)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), *args]
    else:
        cmd = [sys.executable, *args]
    tick = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    wall = time.perf_counter() - tick
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise SystemExit(f"{stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    for result in results:
        result["wall_seconds"] = round(wall, 2)
    return results


# ---------------------------------------------------------------- the series


def measure(size: int, work: Path, models: tuple[Path, Path], steps: int, warmup: int, args: Any) -> dict[str, Any]:
    root = work / f"records-{size}"
    row: dict[str, Any] = {"records": size}
    if "data" in args.stages:
        if root.exists():
            shutil.rmtree(root)
        medi = root / "medi-data.json"
        tick = time.perf_counter()
        row["medi"] = write_medi(medi, size)
        row["medi"]["file_mb"] = round(medi.stat().st_size / 2**20, 1)
        row["medi"]["generate_seconds"] = round(time.perf_counter() - tick, 1)
        write_project(root, medi, *models, steps, sampler=args.sampler)
        print(f"[{size}] data ...", file=sys.stderr, flush=True)
        (row["data"],) = run_stage("data", root, steps, warmup)
        if args.data_only:
            shutil.rmtree(root)
            return row
    elif not (root / "data" / "prepared" / "triplets.parquet").is_file():
        raise SystemExit(f"{root}: no data from an earlier run to reuse (run with the data stage first)")
    else:
        write_project(root, root / "medi-data.json", *models, steps, sampler=args.sampler)
    if "guide_cache" in args.stages:
        if size <= args.encode_max:
            print(f"[{size}] raw encode ...", file=sys.stderr, flush=True)
            (row["encode"],) = run_stage("encode", root, steps, warmup)
        print(f"[{size}] guide cache ...", file=sys.stderr, flush=True)
        (row["guide_cache"],) = run_stage("guide_cache", root, steps, warmup)
    if "train" not in args.stages:
        return row
    shutil.rmtree(root / "outputs", ignore_errors=True)  # no checkpoint to resume from, no kept model to reuse
    print(f"[{size}] train ...", file=sys.stderr, flush=True)
    (row["train"],) = run_stage("train", root, steps, warmup)
    if size in args.torchrun_sizes:
        print(f"[{size}] torchrun x2 ...", file=sys.stderr, flush=True)
        ranks = run_stage("train", root, steps, warmup, ranks=2)
        row["torchrun"] = {
            "ranks": ranks,
            "sum_peak_rss_mb": round(sum(r["peak_rss_mb"] for r in ranks), 1),
            "sum_pss_mb": round(sum(r["pss_mb"] for r in ranks), 1),
        }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def repeat_training(rows: list[dict[str, Any]], work: Path, steps: int, warmup: int, repeats: int) -> None:
    """Train ``repeats - 1`` more times at every size, alternating sizes, so that a per-step ratio between
    sizes is not one noisy pair (single steps on a shared 2-vCPU VM vary by +-20%): ``step_seconds``
    becomes the median of every full-batch step of every repeat, ``repeats`` each run's median."""
    for _ in range(repeats - 1):
        for row in rows:
            if "train" not in row:
                continue
            root = work / f"records-{row['records']}"
            shutil.rmtree(root / "outputs", ignore_errors=True)
            (again,) = run_stage("train", root, steps, warmup)
            first = row["train"]
            first.setdefault("repeats", [first["step_seconds"]]).append(again["step_seconds"])
            first["full_step_seconds"] = first.get("full_step_seconds", []) + again["full_step_seconds"]
            first.setdefault("repeat_peak_rss_mb", [first["peak_rss_mb"]]).append(again["peak_rss_mb"])
            first.setdefault("repeat_startup_seconds", [first["startup_seconds"]]).append(again["startup_seconds"])
    for row in rows:
        pooled = (row.get("train") or {}).get("full_step_seconds")
        if pooled:
            row["train"]["step_seconds"] = round(statistics.median(pooled), 4)
            row["train"]["full_batch_steps"] = len(pooled)


def clean(work: Path, size: int) -> None:
    """Drop what a size's run left that only a rerun needs (the MEDI file, the embedding store, the Arrow cache)."""
    for name in ("medi-data.json", "store", ".cache"):
        path = work / f"records-{size}" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def guide_passes(work: Path, models: tuple[Path, Path], size: int) -> dict[str, Any]:
    """Mining, verdicts and the training cache over one store: each pass's texts, encoded texts and seconds."""
    root = work / "passes"
    if root.exists():
        shutil.rmtree(root)
    medi = root / "medi-data.json"
    write_medi(medi, size, seed=3)
    write_classification(root / "labelled.tsv", 5000)
    source = {"name": "SyntheticIntent", "path": str(root / "labelled.tsv"), "format": "tsv"}
    write_project(root, medi, *models, 10, classification=[source], verdicts=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["mining"]["max_texts_per_task"] = 2000
    params["evaluate"]["tasks"] = ["STSBenchmark"]
    params["gate"]["required_tasks"] = ["STSBenchmark"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = run_stage("passes", root, 10, 1)[0]
    again = run_stage("passes", root, 10, 1)[0]  # a rerun: everything comes from the store
    run_stage("data", root, 10, 1)
    cache = run_stage("guide_cache", root, 10, 1)[0]
    return {"records": size, "embed_stage": first["passes"], "embed_stage_rerun": again["passes"], "guide_cache": cache}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, from the measured rows."""
    by = {r["records"]: r for r in rows}
    out: dict[str, Any] = {}
    if 100_000 in by and 1_000_000 in by:
        small, big = by[100_000], by[1_000_000]
        growth = {}
        for stage in ("data", "guide_cache", "train"):
            if stage not in big or stage not in small:
                continue
            for metric in ("seconds", "peak_rss_mb"):
                growth[f"{stage}.{metric}"] = _ratio(big[stage][metric], 10 * small[stage][metric])
        out["growth_1m_vs_10x_100k"] = growth
    if 200_000 in by:
        r = by[200_000]
        cache, train = r.get("guide_cache") or {}, r.get("train") or {}
        out["at_200k"] = {
            "guide_cache_peak_rss_mb": cache.get("peak_rss_mb"),
            "guide_cache_build_vs_raw_encode": _ratio(
                cache.get("seconds"), (r.get("encode") or {}).get("encode_seconds")
            ),
            "train_startup_seconds": max(train.get("repeat_startup_seconds") or [train.get("startup_seconds") or 0]),
            "train_peak_rss_mb": max(train.get("repeat_peak_rss_mb") or [train.get("peak_rss_mb") or 0]),
        }
    if 1_000_000 in by:
        r = by[1_000_000]
        out["at_1m"] = {"data_peak_rss_mb": (r.get("data") or {}).get("peak_rss_mb")}
        if "train" in r:
            out["at_1m"] |= {
                "step_vs_10k": _ratio(
                    r["train"]["step_seconds"], (by.get(10_000) or {}).get("train", {}).get("step_seconds")
                ),
            }
        if "torchrun" in r:
            out["at_1m"]["two_ranks_pss_vs_one_rank_rss"] = _ratio(
                r["torchrun"]["sum_pss_mb"], r["train"]["peak_rss_mb"]
            )
            out["at_1m"]["two_ranks_rss_vs_one_rank_rss"] = _ratio(
                r["torchrun"]["sum_peak_rss_mb"], r["train"]["peak_rss_mb"]
            )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| records | data s | data MB | raw encode s | guide cache s | cache MB | cache/encode | train start-up s "
        "| s/step (full batches) | s/step (all) | train MB | 2 ranks: sum RSS / sum PSS MB |"
    )
    lines = [head, "|" + "---:|" * 12]

    def cell(r: dict[str, Any], stage: str, key: str, fmt: str = "{}") -> str:
        value = (r.get(stage) or {}).get(key)
        return "-" if value is None else fmt.format(value)

    for r in rows:
        enc = (r.get("encode") or {}).get("encode_seconds")
        tr = r.get("torchrun")
        ranks = f"{tr['sum_peak_rss_mb']:.0f} / {tr['sum_pss_mb']:.0f}" if tr else "-"
        ratio = _ratio((r.get("guide_cache") or {}).get("seconds"), enc)
        lines.append(
            f"| {r['records']:,} | {cell(r, 'data', 'seconds')} | {cell(r, 'data', 'peak_rss_mb', '{:.0f}')} "
            f"| {enc or '-'} | {cell(r, 'guide_cache', 'seconds')} | {cell(r, 'guide_cache', 'peak_rss_mb', '{:.0f}')} "
            f"| {ratio or '-'} | {cell(r, 'train', 'startup_seconds')} | {cell(r, 'train', 'step_seconds')} "
            f"| {cell(r, 'train', 'step_seconds_all')} | {cell(r, 'train', 'peak_rss_mb', '{:.0f}')} | {ranks} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the per-step median")
    parser.add_argument("--encode-max", type=int, default=200_000, help="largest size whose raw encode is timed")
    parser.add_argument("--torchrun-sizes", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--sampler", default="no_duplicates", choices=["no_duplicates", "no_duplicates_hashed"])
    parser.add_argument("--passes", type=int, default=0, help="records for the guide-pass accounting (0: skip)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (0: default; 1 is faster on a loaded machine)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/gist-scale"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep each size's data and caches")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="training runs per size, alternating sizes (s/step: median of all their full-batch steps)",
    )
    parser.add_argument("--data-only", action="store_true", help="measure only the data stage")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["data", "guide_cache", "train"],
        choices=["data", "guide_cache", "train"],
        help="stages to run (without data: reuse each size's data and cache from an earlier run in --work)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.root, args.steps, args.warmup, args.threads)), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    models = tiny_models(args.work / "models")
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/scale.py " + " ".join(sys.argv[1:]),
        "niceness": os.nice(0),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "torch_threads": args.threads or "default",
        "load_average_start": os.getloadavg(),
        "rows": rows,
    }

    def save() -> None:  # after every size: a run cut short keeps what it measured
        result["targets"] = summary(rows)
        result["load_average_end"] = os.getloadavg()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    if args.passes:
        result["guide_passes"] = guide_passes(args.work, models, args.passes)
        save()
    for size in args.sizes:
        rows.append(measure(size, args.work, models, args.steps, args.warmup, args))
        save()
    if args.repeats > 1:
        repeat_training(rows, args.work, args.steps, args.warmup, args.repeats)
        save()
    if not args.keep:
        for size in args.sizes:
            clean(args.work, size)
    print(markdown(rows))
    print(json.dumps(result["targets"], indent=2))
    if "guide_passes" in result:
        print(json.dumps(result["guide_passes"], indent=2))


if __name__ == "__main__":
    main()
