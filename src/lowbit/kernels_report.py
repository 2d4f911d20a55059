"""`lowbit kernels`: this machine as the kernel choice sees it, and the choices measured so far."""
from __future__ import annotations

from .kernels import jit
from .kernels.select import KernelSelector, describe_host
from .textable import text_table


def kernels_table(refresh: bool = False, threads: int | None = None) -> str:
    """Host description (CPU model and flags, torch build, threads), the cache file, whether the
    compiled kernels of `kernels.jit` run here, and each cached decision (shape class, row bucket, path, ms per candidate incl. the float layer)."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    selector = KernelSelector()
    if refresh:
        selector.clear()
    host = describe_host()
    rows = [(c["shape"], c["bucket"],
             c["path"] + (f" (provisional: timed at load {c['load']})" if c.get("provisional") else ""),
             " ".join(f"{k} {v:.3f}" for k, v in sorted(c.get("ms", {}).items())))
            for c in selector.cached_choices()]
    head = (f"CPU: {host['cpu']} (capability {host['capability']}; flags {', '.join(host['flags']) or 'none'})\n"
            f"torch {host['torch']}, {host['threads']} thread(s); cache {selector.path()}"
            + (" (cleared)" if refresh else "")
            + f"\ncompiled kernels (int8 activation codes and epilogues): {jit.status()}")
    if not rows:
        return head + "\nno decisions cached yet: they are measured the first time a layer meets a row count"
    return head + "\n" + text_table(("shape class", "rows", "path", "ms (least of timed calls)"), rows,
                                     max_width=160)
