"""The speed guardrail's summary and warnings (`lowbit.guardrail`), on hand-made measurements."""
from __future__ import annotations

import torch

import lowbit
from lowbit.guardrail import SLOWER, SLOWER_MS, LayerSpeed, layer_speeds, summarize


def test_summary_groups_by_scheme_and_warns_once_per_path():
    speeds = [LayerSpeed(f"l{i}", "w8", ((1, "int8mm", 0.5, -0.1), (256, "bf16", 1.5, 2.0)))
              for i in range(5)]
    speeds.append(LayerSpeed("tiny", "w8", ((1, "int8mm", 1.4, SLOWER_MS / 2), (256, "bf16", 0.6, -1.0))))
    speeds.append(LayerSpeed("x", "w3g128", ((1, "ref", None, None), (256, "ref", None, None))))
    lines, warnings = summarize(speeds)
    assert "  w8 at 1 row(s): int8mm; 0.50-1.40x fp32" in lines
    assert "  w8 at 256 row(s): bf16; 0.60-1.50x fp32" in lines
    assert "  w3g128 at 1 row(s): ref; slower than fp32 (dequantized every call)" in lines
    assert len(warnings) == 2  # one for w8 at 256 rows (5 layers), one for w3g128; 'tiny' is noise
    assert warnings[0].startswith("w8 at 256 row(s): 5 layer(s) (l0, l1, l2 and 2 more) take path bf16")
    assert "up to 1.50x" in warnings[0]
    assert warnings[1].startswith("w3g128 has no fast kernel on this CPU: 1 layer(s) (x)")
    assert SLOWER > 1.0


def test_quantize_reports_paths_when_pinned():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    lowbit.quantize(m, "w4g32", verbose=False)
    assert [s.paths for s in layer_speeds(m)] == [((1, "int4mm", None, None), (256, "int4mm", None, None))]
    assert m.lowbit_report.speed == ["  w4g32 at 1 row(s): int4mm; pinned, not timed",
                                     "  w4g32 at 256 row(s): int4mm; pinned, not timed"]
