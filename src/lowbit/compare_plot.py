"""The PNG of a `CompareReport`: left, the task metric against megabytes on disk, one labelled
point per scheme (fp32's value as a dashed line); right, latency as a multiple of fp32's at each
batch size (bars, 1.0 dashed, below 1 is faster). matplotlib with the Agg backend (no display)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'lowbit[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_report(report, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_q, ax_t) = plt.subplots(1, 2, figsize=(12, 5.4), gridspec_kw={"width_ratios": [1.15, 1]})
    _quality_panel(ax_q, report)
    _latency_panel(ax_t, report)
    fig.suptitle(f"{report.model}: {report.task} task, {report.cpu}, {report.threads} thread(s)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _quality_panel(ax, report) -> None:
    xs = [r.file_bytes / 1e6 for r in report.rows]
    ys = [r.quality.get(report.metric, float("nan")) for r in report.rows]
    ax.axhline(ys[0], color="0.6", linestyle="--", linewidth=1, label="fp32")
    ax.scatter(xs, ys, s=45, color=["0.3" if r.label == "fp32" else ("tab:red" if r.flags else "tab:blue")
                                    for r in report.rows], zorder=3)
    for x, y, r in zip(xs, ys, report.rows):
        ax.annotate(r.label, (x, y), textcoords="offset points", fontsize=9, xytext=(7, 3))
    ax.set_xlabel("size on disk (MB)")
    direction = "higher" if report.higher_is_better else "lower"
    ax.set_ylabel(f"{report.metric} ({direction} is better)")
    ax.set_title("quality vs size (red: slower than fp32 at some batch)")
    ax.margins(y=0.15)
    ax.set_xlim(0, max(xs) * 1.25)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _latency_panel(ax, report) -> None:
    labels = [r.label for r in report.rows]
    width = 0.8 / max(len(report.batches), 1)
    for j, b in enumerate(report.batches):
        base = report.fp32.ms(b)
        vals = [(r.ms(b) or float("nan")) / base if base else float("nan") for r in report.rows]
        ys = [i + (j - (len(report.batches) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.barh(ys, vals, height=width, label=f"batch {b} (fp32 {base:.1f} ms)" if base else f"batch {b}")
        for bar, v in zip(bars, vals):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}", va="center", fontsize=8)
    ax.axvline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(labels)), [lab + (" *" if r.flags else "") for lab, r in zip(labels, report.rows)])
    ax.invert_yaxis()
    ax.set_xlabel("latency, x fp32 (below 1 is faster; * = slower than fp32 here)")
    ax.set_title("latency (median of interleaved rounds)")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.12)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(report.batches), fontsize=8,
              frameon=False)
