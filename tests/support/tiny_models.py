"""Tiny randomly initialised sentence-transformers models with a real model's tokenizer, built on the fly.

For tests where a model's quality does not matter but its vocabulary does (a guide whose vocabulary
differs from the student's makes the GIST losses decode and re-tokenize).
"""

from __future__ import annotations

from pathlib import Path


def tiny_model(tokenizer_dir: Path, out: Path, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    """A random ``layers``-layer model of the tokenizer's family (BERT, MPNet), as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = AutoConfig.from_pretrained(str(tokenizer_dir))
    config.update(
        {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden,
        }
    )
    hf_dir = out / "hf"
    AutoModel.from_config(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())])
    model.save(str(out / "st"))
    return out / "st"
