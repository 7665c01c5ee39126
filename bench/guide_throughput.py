"""The paper's guide, measured: encode throughput of a UAE-Large-V1-shaped model on this machine.

WhereIsAI/UAE-Large-V1 is a BERT-large (24 layers, hidden 1024, 16 heads, 335 M parameters, CLS
pooling). Offline, the script builds a model of exactly that shape with random weights (the compute
of a forward pass does not depend on the weights' values) and all-MiniLM-L6-v2's tokenizer (the same
bert-base-uncased vocabulary UAE uses); with ``--model`` it loads a real one instead (a local
folder, or a Hub id where the Hub is reachable). It encodes MEDI-like synthetic texts (a third
~10-word queries, two thirds ~35-word passages, as bench/scale.py writes them) at the training
cache's length (64 tokens) and the mining length (128), on CPU and, when CUDA is there, on the GPU
in bfloat16, and reports texts per second. BENCHMARKS.md's extrapolation of the paper's run uses it.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/guide_throughput.py --texts 512 --json bench/results/guide_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import _texts, _vocabulary, random_sentence_transformer  # noqa: E402  (bench/ is a folder of scripts, not a package)


def uae_shaped(folder: Path) -> Path:
    """A random BERT-large with CLS pooling and UAE-Large-V1's dimensions, saved as a sentence-transformers folder."""
    out = folder / "uae-shaped"
    if (out / "modules.json").is_file():
        return out
    shape = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
    return random_sentence_transformer(out, 0, pooling="cls", **shape)


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    queries = _texts(rng, vocab, n // 3, 10)
    passages = _texts(rng, vocab, n - len(queries), 35)
    return queries + passages


def measure(model_path: str, sample: list[str], device: str, max_seq_length: int, batch_size: int) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device)
    if device == "cuda":
        model.to(torch.bfloat16)  # the weights in bf16, as a GPU worker would run the guide
    model.max_seq_length = max_seq_length
    params = sum(p.numel() for p in model.parameters())
    model.encode(sample[: min(len(sample), batch_size)], batch_size=batch_size)  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    vectors = model.encode(sample, batch_size=batch_size, convert_to_numpy=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "device": device,
        "dtype": "bfloat16" if device == "cuda" else "float32",
        "threads": torch.get_num_threads(),
        "max_seq_length": max_seq_length,
        "batch_size": batch_size,
        "texts": len(sample),
        "seconds": round(seconds, 2),
        "texts_per_second": round(len(sample) / seconds, 1),
        "parameters": params,
        "dimension": int(vectors.shape[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a real guide (folder or Hub id); default: UAE-shaped, random")
    parser.add_argument("--texts", type=int, default=512, help="texts encoded per measurement on CPU")
    parser.add_argument("--gpu-texts", type=int, default=65_536, help="texts encoded per measurement on CUDA")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(uae_shaped(Path(tmp)))
        runs = []
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            sample = texts(args.gpu_texts if device == "cuda" else args.texts)
            for length in args.lengths:
                result = measure(model, sample, device, length, 256 if device == "cuda" else 32)
                print(json.dumps(result), flush=True)
                runs.append(result)
    report = {
        "model": args.model or "UAE-Large-V1-shaped BERT-large, random weights, CLS pooling",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "runs": runs,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
