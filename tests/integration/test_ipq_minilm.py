"""`lowbit ipq` on the real all-MiniLM-L6-v2: staged iPQ of the encoder Linears without finetuning,
written as a lowbit folder that loads back (rebuilt from its header) with identical embeddings, and
whose tensor bytes equal the size report."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit import cli
from lowbit.eval.embeddings import sentence_embeddings
from lowbit.eval.sentences import SENTENCES
from lowbit.nn import PQLinear

from .conftest import MODEL

pytestmark = pytest.mark.integration

CONFIG = """
version: 1
seed: 0
n_iter: 2
groups:
  - name: ffn
    targets: ["re:encoder\\\\.layer\\\\.\\\\d+\\\\.(intermediate|output)\\\\.dense"]
    block_size: 8
    n_centroids: 256
  - name: attn
    targets: ["re:encoder\\\\.layer\\\\.\\\\d+\\\\.attention\\\\..*"]
    block_size: 8
    n_centroids: 256
"""
ENCODER_LINEARS = 36
LINEAR_RATIO_MIN = 16.0  # fp32 / stored bytes of the PQ layers; 28.8x by construction (1 bit + 4 KB)


def test_cli_ipq_writes_a_folder_that_loads_back(minilm_dir, tmp_path):
    cfg = tmp_path / "ipq.yaml"
    cfg.write_text(CONFIG)
    out_dir = tmp_path / "out"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["ipq", MODEL, "--config", str(cfg), "--out", str(out_dir)])
    assert code == 0, err.getvalue()
    assert "quantized layers" in out.getvalue() and "wrote" in out.getvalue()
    model = lowbit.load(out_dir)
    pq = [n for n, m in model.named_modules() if isinstance(m, PQLinear)]
    assert len(pq) == ENCODER_LINEARS
    report = lowbit.ipq.size_report(model)
    fq, sq = report.total("codebook")
    assert fq / sq >= LINEAR_RATIO_MIN
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()) \
            == report.stored_bytes
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    a = sentence_embeddings(model, tok, list(SENTENCES[:8]))
    b = sentence_embeddings(lowbit.load(out_dir), tok, list(SENTENCES[:8]))
    assert torch.equal(a, b)


def test_cli_ipq_bad_config_fails_before_loading(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("groups: [{name: x, targets: [Linear], block_size: 0}]\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["ipq", MODEL, "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert code == 2 and "block_size must be a positive integer" in err.getvalue()
