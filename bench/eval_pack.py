"""Time the offline MTEB task pack for one model: wall time per task, texts encoded, scores.

Each run uses a fresh result cache (a temporary folder unless --cache-dir is given), so every task
is really encoded and scored. Run from the project root:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/eval_pack.py --model models/all-MiniLM-L6-v2

Prints one line per task and a JSON record (also written to --json when given) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also runs from a checkout where the package is not installed
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from gist_core.catalogue import DEFAULT_DATA_DIR, LOCAL_TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--tasks", nargs="+", default=list(LOCAL_TASKS), help="local task names (default: all)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=None, help="default: the model's own")
    parser.add_argument("--cache-dir", type=Path, default=None, help="result cache (default: a fresh temp folder)")
    parser.add_argument("--no-dedup", action="store_true", help="encode every text, even repeated ones")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--json", type=Path, default=None, help="also write the record here")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import mteb
    import torch
    from sentence_transformers import SentenceTransformer

    from gist_core.evaluation.evaluate import evaluate_model
    from gist_core.evaluation.tasks import build_task
    from gist_core.models import fingerprint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    model = SentenceTransformer(str(args.model), device="cpu")
    if args.max_seq_length is not None:
        model.max_seq_length = args.max_seq_length
    revision = fingerprint(args.model) + (f"-len{args.max_seq_length}" if args.max_seq_length else "")
    revision += "-bf16" if args.precision == "bfloat16" else ""
    load_seconds = time.perf_counter() - started

    rows = []
    with tempfile.TemporaryDirectory(prefix="gist-bench-") as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        for name in args.tasks:
            task = build_task(name, args.data_dir)
            tick = time.perf_counter()
            scores = evaluate_model(
                model,
                model_name="gist-bench/" + args.model.name,
                model_revision=revision,
                tasks=[task],
                cache_dir=cache_dir,
                batch_size=args.batch_size,
                show_progress_bar=args.progress,
                deduplicate=not args.no_dedup,
                precision=args.precision,
            )
            seconds = time.perf_counter() - tick
            score = scores[name]
            stats = score.encoding or {}
            rows.append(
                {
                    "task": name,
                    "main_score_name": score.main_score_name,
                    "main_score": round(score.main_score, 4),
                    "seconds": round(seconds, 1),
                    "texts": stats.get("texts"),
                    "encoded": stats.get("encoded"),
                    "encode_seconds": round(stats.get("seconds", 0.0), 1),
                }
            )
            print(
                f"{name:42s} {score.main_score_name:16s} {score.main_score:.4f}  {seconds:7.1f} s  "
                f"texts {stats.get('texts')} encoded {stats.get('encoded')} in {stats.get('seconds', 0.0):.1f} s",
                flush=True,
            )
    total = time.perf_counter() - started
    record = {
        "model": str(args.model),
        "max_seq_length": model.max_seq_length,
        "batch_size": args.batch_size,
        "deduplicate": not args.no_dedup,
        "precision": args.precision,
        "tasks": rows,
        "model_load_seconds": round(load_seconds, 1),
        "total_seconds": round(total, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mteb": mteb.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"total {total:.1f} s (load average before {record['loadavg_before']}, after {record['loadavg_after']})")
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
