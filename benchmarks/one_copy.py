"""One copy of the codes (issue 6): each weight-only path of a QLinear that keeps its codes in a
kernel's layout (int4 pack / int8) against `BothCopies`, the layer as it was before (file layout
plus the kernel's copy and cached fp32 scale and offset), in one process, interleaved round
by round. Also prints the layer's tensor bytes (`report.model_tensor_bytes`) against its file bytes.

    python benchmarks/one_copy.py --threads 1 [--rounds 31]
"""
from __future__ import annotations

import argparse

import torch

from lowbit.eval.timing import cpu_name, interleaved
from lowbit.kernels import cpu, layout
from lowbit.nn import QLinear
from lowbit.primitives import quantize_weight
from lowbit.report import model_tensor_bytes
from lowbit.spec import parse_scheme

SHAPES = ((384, 1536), (1536, 384), (384, 384), (1024, 4096))  # (K, N): MiniLM's, one larger
ROWS = (1, 64)


class BothCopies(QLinear):
    """QLinear as it was before issue 6: the codes in the file layout, the kernel's packed copy
    and the fp32 scale/offset as derived attributes; bf16/f32 read the file layout."""

    def _derive(self) -> None:
        qw = self.qweight
        self._available = cpu.available_paths(qw)
        self._k_weight = self._k_scales = None
        if "int4mm" in self._available:
            self._k_weight, self._k_scales = cpu.prepare_int4(qw)
        elif "int8mm" in self._available:
            self._k_weight, self._k_scales = cpu.prepare_int8(qw)
        self._f32 = cpu.f32_params(qw)
        self._paths = {}

    @property
    def codes(self):
        return layout.codes_of(self.qweight)


def bench(k: int, n: int, scheme: str, rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(n, k, generator=gen) * 0.02, torch.randn(n, generator=gen)
    qw = quantize_weight(w, parse_scheme(scheme))
    layer, old = QLinear(qw, bias), BothCopies(qw, bias)
    file_bytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    print(f"\n{scheme} K={k} N={n}: kept layout {layer.layout}; tensors / file bytes: "
          f"{model_tensor_bytes(layer) / file_bytes:.3f}x (before: {model_tensor_bytes(old) / file_bytes:.3f}x)")
    print(f"  {'path':<8}{'M':>5}{'before ms':>11}{'after ms':>10}{'median x':>10}{'min x':>8}")
    for path in layer._available:
        layer.set_path(path)  # pinned once: nothing chosen or timed inside the calls
        old.set_path(path)
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            assert torch.equal(layer(x), old(x)), (scheme, path, m)
            t = interleaved({"before": lambda: old(x), "after": lambda: layer(x)},
                            rounds=rounds, budget_s=3.0)
            b, a = t["before"], t["after"]
            print(f"  {path:<8}{m:>5}{b.median_ms:>11.3f}{a.median_ms:>10.3f}"
                  f"{a.median_ms / b.median_ms:>10.2f}{a.min_ms / b.min_ms:>8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=31)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); "
          "outputs checked bit-identical before timing; x = after / before")
    for scheme in ("w4g128", "w8"):
        for k, n in SHAPES:
            bench(k, n, scheme, args.rounds)


if __name__ == "__main__":
    main()
