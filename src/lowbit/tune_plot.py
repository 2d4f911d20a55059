"""PNGs of a `SensitivityReport` and a `TuneReport` (matplotlib, Agg backend, like
`compare_plot`).

Sensitivity: one horizontal bar per unit, most sensitive at the top (the report's ranking), its
length the task drop with only that unit quantized (grey where the metric moved the good way),
labelled with the unit's output SQNR.
Tune: left, each layer's bytes under the chosen mix, coloured by its choice, in model order;
right, total weight bytes of the mix beside float and each candidate used on every layer.
"""
from __future__ import annotations

from pathlib import Path

from .compare_plot import _pyplot

MAX_UNITS = 40  # bars drawn at most (the most sensitive); the report itself keeps them all


def plot_sensitivity(report, path: str | Path) -> Path:
    plt = _pyplot()
    units = report.units[:MAX_UNITS]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * max(len(units), 1)))
    ys = range(len(units))[::-1]  # rank 1 at the top
    ax.barh(list(ys), [u.drop for u in units], height=0.7,  # grey: the metric moved the good way
            color=["tab:red" if u.drop > 0 else "0.65" for u in units])
    ax.set_yticks(list(ys), [u.name for u in units], fontsize=8)
    for y, u in zip(ys, units):
        ax.annotate(f"{u.sqnr_db:.1f} dB", (max(u.drop, 0.0), y), textcoords="offset points",
                    xytext=(4, -3), fontsize=7, color="0.3")
    ax.axvline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel(f"drop in {report.metric} with only this {'block' if report.blocks else 'layer'} "
                  f"quantized (positive = worse)")
    shown = "" if len(units) == len(report.units) else f" (top {len(units)} of {len(report.units)})"
    ax.set_title(f"sensitivity to {report.scheme} ({report.method}), task {report.task}{shown}",
                 fontsize=10)
    return _save(plt, fig, Path(path))


def plot_tune(report, path: str | Path) -> Path:
    plt = _pyplot()
    fig, (ax_l, ax_t) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1.6, 1]})
    names = list(report.choice)
    schemes = sorted(set(report.choice.values()))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(schemes)}
    ax_l.bar(range(len(names)), [report.chosen(n).bytes / 1e3 for n in names],
             color=[colors[report.choice[n]] for n in names])
    ax_l.set_xticks([])
    ax_l.set_xlabel(f"{len(names)} layers, in model order")
    ax_l.set_ylabel("KB under the chosen mix")
    ax_l.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in schemes],
                labels=[f"{s} x{report.mix()[s]}" for s in schemes], fontsize=8)
    ax_l.set_title("chosen scheme per layer", fontsize=10)
    rows = [("mix", report.total("bytes")), ("float", report.total("bytes", "float"))]
    rows += [(s, report.total("bytes", s)) for s in report.candidates()]
    ax_t.barh(range(len(rows))[::-1], [b / 1e6 for _, b in rows],
              color=["tab:green"] + ["0.6"] * (len(rows) - 1))
    ax_t.set_yticks(list(range(len(rows))[::-1]), [w if w in ("mix", "float") else f"uniform {w}"
                                                   for w, _ in rows], fontsize=8)
    ax_t.set_xlabel("weight MB")
    ax_t.set_title("total weight bytes", fontsize=10)
    ok = "within" if report.within_budget() else "OVER"
    fig.suptitle(f"tune ({report.objective}) on {report.task}: verified drop "
                 f"{report.verified_drop:+.4f} ({ok} budget {report.max_drop:.4f})", fontsize=11)
    return _save(plt, fig, Path(path))


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
