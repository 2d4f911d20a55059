"""all-MiniLM-L6-v2 end to end: quantize -> save -> load, quality budgets against fp32, bytes, the
skipped output head, and WordSim-353.

Numbers were measured on this model (torch 2.13 CPU, RTN); each budget is a named constant with
the measured value beside it. Budgets from the issue: w8 mean cosine >= 0.9995, w4g32 >= 0.972,
file < 29.6 MB (torchao int4 g128: 29.7 MB, bitsandbytes nf4: 29.6 MB).
"""
from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit import FormatError, Recipe, Rule
from lowbit.nn import QEmbedding, QLinear

from .conftest import N_QUANTIZED_LINEARS, OUTPUT_HEAD

pytestmark = pytest.mark.integration

SCHEMES = ("w8", "w4g128", "w4g32")

# Mean / min cosine of sentence embeddings (64 SENTENCES) vs fp32.
COS_MEAN_BUDGET = {
    "w8": 0.9995,      # issue's figure; measured 0.99962
    "w4g32": 0.972,    # issue's figure; measured 0.97433
    "w4g128": 0.938,   # measured 0.94868
}
COS_MIN_BUDGET = {
    "w8": 0.9990,      # measured 0.99948
    "w4g32": 0.955,    # measured 0.96733
    "w4g128": 0.905,   # measured 0.91834
}

W4G128_LINEAR_BYTES_RATIO_MAX = 0.20   # quantized / fp32 bytes of the quantized Linear weights; measured 0.1328
MIXED_FILE_BYTES_MAX = 29.6e6          # bitsandbytes nf4 29.6 MB, torchao int4 g128 29.7 MB; measured 18.43e6
MIXED_RECIPE = Recipe((Rule(("Linear",), "w4g128"), Rule(("Embedding",), "w8r")))

WORDSIM_FP32_GOLDEN = 0.7289           # Spearman rho, fp32, WordSim-353 (353 pairs); measured 0.728898
WORDSIM_GOLDEN_TOL = 1e-3
WORDSIM_W8_MAX_DRIFT = 0.01            # |rho(w8) - rho(fp32)|; measured 0.0021 (w8: 0.731009)


def _outputs(model, batch):
    with torch.inference_mode():
        out = model(**batch)
    return out.last_hidden_state, out.pooler_output


def _bert_skeleton(path, device: str):
    import transformers
    config = transformers.AutoConfig.from_pretrained(str(path))
    with torch.device(device):
        return transformers.BertModel(config)


@pytest.fixture(scope="module", params=SCHEMES)
def saved(request, quantized, sentence_batch, tmp_path_factory):
    """(scheme, in-memory quantized model, its outputs on the fixed batch, folder it was saved to)."""
    scheme = request.param
    q = quantized(scheme)
    out_dir = tmp_path_factory.mktemp(f"minilm-{scheme}")
    lowbit.save(q, out_dir)
    return scheme, q, _outputs(q, sentence_batch), out_dir


def test_load_rebuilt_from_config_is_bit_identical(saved, sentence_batch):
    scheme, q, (hidden, pooled), out_dir = saved
    loaded = lowbit.load(out_dir)  # no skeleton: BertModel rebuilt from the config.json beside the file
    assert type(loaded).__name__ == "BertModel"
    qlinears = [n for n, m in loaded.named_modules() if isinstance(m, QLinear)]
    assert len(qlinears) == N_QUANTIZED_LINEARS
    assert {m.spec.name for m in loaded.modules() if isinstance(m, QLinear)} == {scheme}
    got_hidden, got_pooled = _outputs(loaded, sentence_batch)
    assert torch.equal(got_hidden, hidden)
    assert torch.equal(got_pooled, pooled)


def test_load_into_meta_skeleton_is_bit_identical(saved, sentence_batch):
    """BertModel's non-persistent buffers (position_ids, token_type_ids) travel in the file, so a
    skeleton built under torch.device('meta') is completed and gives identical outputs."""
    scheme, q, (hidden, pooled), out_dir = saved
    loaded = lowbit.load(out_dir, model=_bert_skeleton(out_dir, "meta"))
    assert not [n for n, t in loaded.state_dict().items() if t.is_meta]
    got_hidden, got_pooled = _outputs(loaded, sentence_batch)
    assert torch.equal(got_hidden, hidden)
    assert torch.equal(got_pooled, pooled)


def test_load_into_cpu_skeleton_is_bit_identical(saved, sentence_batch):
    scheme, q, (hidden, pooled), out_dir = saved
    loaded = lowbit.load(out_dir, model=_bert_skeleton(out_dir, "cpu"))
    got_hidden, got_pooled = _outputs(loaded, sentence_batch)
    assert torch.equal(got_hidden, hidden)
    assert torch.equal(got_pooled, pooled)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sentence_embedding_quality_budget(scheme, quantized, fp32_embeddings, embed):
    q = quantized(scheme)
    cos = (embed(q) * fp32_embeddings).sum(-1)  # both L2-normalised: cosine per sentence
    assert cos.mean().item() >= COS_MEAN_BUDGET[scheme], f"{scheme}: mean cosine {cos.mean().item():.5f}"
    assert cos.min().item() >= COS_MIN_BUDGET[scheme], f"{scheme}: min cosine {cos.min().item():.5f}"


def test_w4g128_linear_bytes_ratio(minilm, quantized):
    expected_float = sum(m.weight.numel() * 4 for n, m in minilm.model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n != OUTPUT_HEAD)
    report = quantized("w4g128").lowbit_report
    assert len(report.layers) == N_QUANTIZED_LINEARS
    assert report.float_bytes == expected_float
    ratio = report.quant_bytes / report.float_bytes
    assert ratio <= W4G128_LINEAR_BYTES_RATIO_MAX, f"w4g128 Linear bytes ratio {ratio:.4f}"
    assert all(math.isfinite(r.sqnr_db) for r in report.layers)


def test_w4g128_plus_w8r_embeddings_file_is_smaller_than_nf4(fp32_model, embed, tmp_path):
    q = lowbit.quantize(fp32_model, MIXED_RECIPE, verbose=False)
    qemb = sorted(n for n, m in q.named_modules() if isinstance(m, QEmbedding))
    assert qemb == ["embeddings.position_embeddings", "embeddings.token_type_embeddings",
                    "embeddings.word_embeddings"]
    path = lowbit.save(q, tmp_path)
    size = path.stat().st_size
    assert size < MIXED_FILE_BYTES_MAX, f"file is {size / 1e6:.2f} MB"
    assert torch.equal(embed(lowbit.load(tmp_path)), embed(q))


def test_output_head_is_skipped_with_reason_and_stays_float(minilm, quantized, tmp_path):
    head_weight = minilm.model.get_submodule(OUTPUT_HEAD).weight
    q = quantized("w4g128")
    assert list(q.lowbit_report.skipped) == [OUTPUT_HEAD]
    assert "output head" in q.lowbit_report.skipped[OUTPUT_HEAD]
    for model in (q, lowbit.load(lowbit.save(q, tmp_path))):
        head = model.get_submodule(OUTPUT_HEAD)
        assert type(head) is torch.nn.Linear
        assert torch.equal(head.weight, head_weight)
        linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
        assert linears == [OUTPUT_HEAD]


def test_wordsim353_fp32_golden(fp32_wordsim, wordsim_pairs):
    assert len(wordsim_pairs) == 353
    assert abs(fp32_wordsim - WORDSIM_FP32_GOLDEN) < WORDSIM_GOLDEN_TOL, f"rho = {fp32_wordsim:.6f}"


def test_wordsim353_w8_close_to_fp32(quantized, fp32_wordsim, wordsim_pairs, minilm):
    from lowbit.eval.embeddings import wordsim_spearman
    rho = wordsim_spearman(quantized("w8"), minilm.tokenizer, wordsim_pairs)
    assert abs(rho - fp32_wordsim) < WORDSIM_W8_MAX_DRIFT, f"w8 rho {rho:.6f} vs fp32 {fp32_wordsim:.6f}"
