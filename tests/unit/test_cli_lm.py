"""`lowbit quantize --method gptq --calibration ... [--sequential]` and `lowbit eval --task lm` on a
tiny LlamaForCausalLM folder with a word-level tokenizer, both built in the test (no downloads)."""
from __future__ import annotations

import contextlib
import io
import math
import re

import pytest
import torch

import lowbit
from lowbit import cli
from lowbit.calibration import text_batches
from lowbit.eval.perplexity import perplexity

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the king queen castle night ghost sword crown speak hear wind rain stone river "
         "old young dark bright cold warm and of to in my his her").split()
CORPUS = "\n".join(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) + " ."
                   for i in range(200))
PPL_REL_TOL = 1e-6  # the CLI and the library compute the same float64 sum


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(["<unk>", "."] + WORDS)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", model_max_length=512)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    (d.parent / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    return d


def run_main(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_quantize_gptq_sequential_then_inspect_and_eval(model_dir, tmp_path):
    corpus, out = model_dir.parent / "corpus.txt", tmp_path / "q"
    code, stdout, stderr = run_main(["quantize", model_dir, "--scheme", "w4g32", "--method", "gptq",
                                     "--calibration", corpus, "--samples", 8, "--seq-len", 32,
                                     "--sequential", "--damp", "0.1", "--out", out])
    assert code == 0, stderr
    prov = lowbit.io.read_header(out)["provenance"]
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    expected = text_batches(tok, str(corpus), samples=8, seq_len=32, mode="windows")
    assert prov["calibration"]["sha256"] == lowbit.provenance.calibration_info(expected)["sha256"]
    assert prov["calibration"]["samples"] == 8 and prov["calibration"]["tokens"] == 8 * 32
    assert prov["sequential"] is True and prov["method_options"]["gptq"]["damp"] == 0.1
    code, shown, _ = run_main(["inspect", out])
    assert code == 0 and "sequential: True" in shown and "damp=0.1" in shown

    code, stdout, stderr = run_main(["eval", out, "--task", "lm", "--text", corpus,
                                     "--context", 64, "--stride", 32, "--tokens", 300])
    assert code == 0, stderr
    got = float(re.search(r"perplexity ([0-9.]+) on 299 scored tokens", stdout).group(1))
    assert "(lowbit)" in stdout and "window 64, stride 32" in stdout
    ids = torch.tensor(tok(CORPUS)["input_ids"])[:300]
    want = perplexity(lowbit.load(out), ids, 64, 32).perplexity
    assert math.isclose(got, want, rel_tol=1e-3)  # printed with 3 decimals


def test_eval_takes_a_float_model_folder(model_dir):
    corpus = model_dir.parent / "corpus.txt"
    code, stdout, stderr = run_main(["eval", model_dir, "--task", "lm", "--text", corpus,
                                     "--context", 64, "--stride", 64, "--skip", 10, "--tokens", 100])
    assert code == 0, stderr
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    want = perplexity(model, torch.tensor(tok(CORPUS)["input_ids"])[10:110], 64, 64)
    got = float(re.search(r"\(float\): perplexity ([0-9.]+)", stdout).group(1))
    assert math.isclose(got, want.perplexity, rel_tol=1e-3)


def test_gptq_without_calibration_and_bad_flags_are_errors(model_dir, tmp_path):
    code, _, stderr = run_main(["quantize", model_dir, "--method", "gptq", "--out", tmp_path / "x"])
    assert code == 2 and "--calibration" in stderr
    code, _, stderr = run_main(["quantize", model_dir, "--damp", "0.1", "--out", tmp_path / "x"])
    assert code == 2 and "--damp is a gptq option" in stderr
    code, _, stderr = run_main(["eval", model_dir, "--task", "lm", "--text", tmp_path / "missing.txt"])
    assert code == 2 and "missing.txt" in stderr


def test_gptq_with_rtn_embeddings_records_each_layers_method(model_dir, tmp_path):
    """Embeddings have no input Hessian: with --method gptq they take RTN, and the file, inspect
    and the CLI say which layers took which method (before, --embeddings dropped GPTQ entirely)."""
    corpus, out = model_dir.parent / "corpus.txt", tmp_path / "qe"
    code, _, stderr = run_main(["quantize", model_dir, "--scheme", "w4g32", "--embeddings", "w8r",
                                "--method", "gptq", "--calibration", corpus, "--samples", 8,
                                "--seq-len", 32, "--damp", "0.05", "--out", out])
    assert code == 0, stderr
    assert "embeddings are quantized with rtn" in stderr
    header = lowbit.io.read_header(out)
    methods = {name: e["method"] for name, e in header["layers"].items()}
    assert methods["model.embed_tokens"] == "rtn"
    linears = [m for n, m in methods.items() if n != "model.embed_tokens"]
    assert len(linears) == 14 and set(linears) == {"gptq"}  # 2 blocks x 7 Linears, head skipped
    prov = header["provenance"]
    assert prov["method"] == "gptq" and prov["methods"] == {"gptq": 14, "rtn": 1}
    assert prov["method_options"]["gptq"]["damp"] == 0.05 and prov["calibration"]["samples"] == 8
    code, shown, _ = run_main(["inspect", out])
    assert code == 0 and "method: gptq (gptq: 14 layers, rtn: 1 layer)" in shown
    assert lowbit.load(out).lowbit_source["methods"] == {"gptq": 14, "rtn": 1}


def test_a_method_next_to_a_recipe_is_an_error(model_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    recipe = lowbit.Recipe((lowbit.Rule(("Linear",), "w4g32"),))
    with pytest.raises(lowbit.errors.RecipeError, match="set each Rule's method inside the Recipe"):
        lowbit.quantize(model, recipe, method="gptq", data=[torch.ones(1, 4, dtype=torch.long)])
