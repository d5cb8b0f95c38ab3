"""The report's plots, drawn on matplotlib's Agg canvas (no pyplot, no global backend change): the seed-mean
accuracy-matrix heatmap and task curves per cell, BWT against the budget, drift per stage, paired differences
and learning inside each stage."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from opr.tools.report.cells import CellSummary, PairedComparison, series_name
from opr.tools.report.runs import _is_number, record_of
from opr.tools.report.stats import mean_std

DRIFT_KEYS: tuple[str, ...] = (
    "param/rel_fro/all",
    "response/kl_base",
    "response/base_logprob",
    "spectral/inside_fraction/all",
    "spectral/angle_left_deg/all",
    "spectral/angle_right_deg/all",
    "spectral/sv_rel_change/all",
    "response/next_token_kl",
)


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _mean_matrix(summary: CellSummary) -> tuple[list[str], list[list[float]], int]:
    """Tasks, the seed-mean accuracy matrix ((T+1) x T) and how many runs it averages (those with the first
    run's task list)."""
    import numpy as np

    records = [record_of(r) for r in summary.runs]
    tasks = records[0].tasks
    same = [r for r in records if r.tasks == tasks]
    mean = np.mean(np.array([r.matrix for r in same], dtype=float), axis=0)
    return tasks, mean.tolist(), len(same)


def plot_heatmap(summary: CellSummary, path: Path) -> None:
    """Seed-mean accuracy matrix: rows = stages (0 = before training), columns = tasks, values annotated."""
    import numpy as np

    tasks, mat, n = _mean_matrix(summary)
    M = np.array(mat)
    T = len(tasks)
    fig = _figure(1.2 + 0.9 * T, 1.0 + 0.55 * (T + 1))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(M, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    for i in range(T + 1):
        for j in range(T):
            ax.text(
                j,
                i,
                f"{M[i, j]:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if M[i, j] < 55 else "black",
            )
    ax.set_xticks(range(T), tasks, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(
        range(T + 1), ["0 (before)"] + [f"{t + 1} {name}" for t, name in enumerate(tasks)], fontsize=8
    )
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training stage")
    ax.set_title(f"{summary.label} (n={n})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="score")
    fig.tight_layout()
    fig.savefig(path)


def plot_task_curves(summary: CellSummary, path: Path) -> None:
    """Each task's seed-mean score across stages 0..T (one line per task; its own stage marked by a dot)."""
    import numpy as np

    tasks, mat, n = _mean_matrix(summary)
    M = np.array(mat)
    same = [r for r in map(record_of, summary.runs) if r.tasks == tasks]
    std = np.std(np.array([r.matrix for r in same], dtype=float), axis=0, ddof=1) if n > 1 else None
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(tasks) + 1)
    for j, name in enumerate(tasks):
        (line,) = ax.plot(x, M[:, j], marker=".", label=name)
        if std is not None:
            ax.fill_between(x, M[:, j] - std[:, j], M[:, j] + std[:, j], color=line.get_color(), alpha=0.15)
        ax.plot([j + 1], [M[j + 1, j]], "o", color=line.get_color(), markersize=8)
    ax.set_xticks(x, ["0"] + [str(t) for t in range(1, len(tasks) + 1)])
    ax.set_xlabel("stage (dot: the task's own training stage)")
    ax.set_ylabel("score")
    ax.set_title(f"{summary.label} (n={n})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_inside_stage(rows: Sequence[dict], path: Path, title: str) -> None:
    """One panel per stage: the stage's own task's score against the step inside the stage, one line per cell
    (seed mean, band = min..max over seeds)."""
    stages = sorted({r["stage"] for r in rows})
    fig = _figure(4.0 * len(stages), 3.6)
    colors: dict[str, str] = {}
    for i, stage in enumerate(stages):
        ax = fig.add_subplot(1, len(stages), i + 1)
        for r in (r for r in rows if r["stage"] == stage):
            end = r.get("end")
            xs, mean, lo, hi = list(r["steps"]), list(r["mean"]), list(r["min"]), list(r["max"])
            if end:  # the stage ends at different steps: its end drawn mid-range, a bar spanning them
                xs.append(sum(end["steps"]) / 2)
                mean, lo, hi = mean + [end["mean"]], lo + [end["min"]], hi + [end["max"]]
            (line,) = ax.plot(xs, mean, marker=".", label=f"{r['method']} (n={r['n']})",
                              color=colors.get(r["cell"]))
            colors[r["cell"]] = line.get_color()
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
            if end:
                ax.errorbar([xs[-1]], [end["mean"]], xerr=[[xs[-1] - end["steps"][0]], [end["steps"][1] - xs[-1]]],
                            fmt="none", color=line.get_color(), capsize=2)
        task = next(r["task"] for r in rows if r["stage"] == stage)
        ax.set_title(f"stage {stage}: {task}", fontsize=9)
        ax.set_xlabel("optimizer step inside the stage")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel("score on the stage's task")
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_bwt_vs_budget(summaries: Sequence[CellSummary], path: Path, title: str) -> None:
    """BWT (mean ± std over seeds) against budget, one line per method and setting (:func:`series_name`; n =
    seeds in its legend entry; the lines' points are shifted sideways by up to ±2% of the largest budget so
    that error bars at the same budget stay apart); budget-less ones as a dashed level with a ±std band. The x
    axis starts at 0."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import rcParams

    palette = rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted({series_name(s) for s in summaries})
    budgets = [s.cell.budget for s in summaries if s.cell.budget is not None]
    top = max(budgets, default=1.0)
    budgeted = [m for m in names if any(series_name(s) == m and s.cell.budget is not None for s in summaries)]
    for i, name in enumerate(names):
        color = palette[i % len(palette)]
        pts = sorted(
            (s.cell.budget, *s.stats["BWT"])
            for s in summaries
            if series_name(s) == name and s.cell.budget is not None and "BWT" in s.stats
        )
        if pts:
            xs, ys, es, ns = zip(*pts)
            shift = (budgeted.index(name) - (len(budgeted) - 1) / 2) * 0.04 * top / max(1, len(budgeted) - 1)
            n = f"n={min(ns)}" if min(ns) == max(ns) else f"n={min(ns)}-{max(ns)}"
            ax.errorbar([x + shift for x in xs], ys, yerr=es, marker="o", capsize=3, label=f"{name} ({n})",
                        color=color)
        for s in summaries:
            if series_name(s) == name and s.cell.budget is None and "BWT" in s.stats:
                mean, std, n = s.stats["BWT"]
                ax.axhline(mean, linestyle="--", color=color, label=f"{name} (no budget, n={n})")
                if std > 0:
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlim(0.0, top * 1.15)
    ax.set_xlabel("replay budget ρ")
    ax.set_ylabel("BWT")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _paired_plot_label(comparison: PairedComparison, comparisons: Sequence[PairedComparison]) -> str:
    """A row label of :func:`plot_paired`: method, budget and distinguishing settings, with backbone and
    benchmark only when the rows do not all share them, the reference cell's when the cell has several, and
    n pairs."""
    cell = comparison.summary.cell
    parts = [cell.method, f"budget={cell.budget_label}"]
    if len({(c.summary.cell.backbone, c.summary.cell.benchmark) for c in comparisons}) > 1:
        parts += [cell.backbone, cell.benchmark]
    settings = cell.settings_text(comparison.summary.shown_keys)
    parts += [settings] if settings else []
    if sum(c.summary is comparison.summary for c in comparisons) > 1:
        parts.append(f"(vs {comparison.reference_summary.label})")
    return " ".join(parts) + f" (n={len(comparison.seeds)})"


def plot_paired(comparisons: Sequence[PairedComparison], path: Path, title: str, metric: str = "BWT") -> None:
    """One row per comparison: the mean paired difference in ``metric`` (cell − reference) as a point with its
    95% paired-t interval as a horizontal error bar (an open point without bar for n < 2; rows without pairs
    stay empty), n pairs in the row label, a vertical line at 0; the backbone and benchmark join the title when
    all rows share them."""
    rows = list(comparisons)
    labels = [_paired_plot_label(c, rows) for c in rows]
    longest = max((len(label) for label in labels), default=10)
    fig = _figure(min(18.0, 4.5 + 0.065 * longest), 1.5 + 0.32 * max(len(rows), 1))
    ax = fig.add_subplot(1, 1, 1)
    for y, c in enumerate(rows):
        d = c.diffs.get(metric)
        if d is None or d.mean is None:
            continue
        if d.low is not None and d.high is not None:
            ax.errorbar([d.mean], [y], xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", capsize=3, color="C0")
        else:
            ax.plot([d.mean], [y], "o", color="C0", markerfacecolor="none")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first cell on top, as in the table
    ax.set_xlabel(f"{metric}: cell − reference, mean and 95% paired-t CI\n(open circle: n < 2, no interval)", fontsize=8)
    places = {(c.summary.cell.backbone, c.summary.cell.benchmark) for c in rows}
    ax.set_title(f"{title}: {' on '.join(next(iter(places)))}" if len(places) == 1 else title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)


def stage_drift(entry) -> dict[str, float]:
    """A stage's drift numbers (``stages[t].drift``) and its response drift from ``stages[t].diagnostics``:
    ``response/kl_base`` (KL to the base model) and ``response/base_logprob`` (the base model's log-prob of the
    answers), nats per token of the model's greedy answers to the probe prompts."""
    out = dict(entry.drift or {})
    for key in ("kl_base", "base_logprob"):
        value = ((entry.diagnostics or {}).get(key) or {}).get("mean")
        if _is_number(value):
            out[f"response/{key}"] = float(value)
    return out


def drift_keys(summaries: Sequence[CellSummary]) -> list[str]:
    """The drift keys to plot: the preferred DRIFT_KEYS present in any stage, else the first six found."""
    found: list[str] = []
    for s in summaries:
        for r in s.runs:
            for st in record_of(r).stages or []:
                for k in stage_drift(st):
                    if k not in found:
                        found.append(k)
    preferred = [k for k in DRIFT_KEYS if k in found]
    return preferred or sorted(found)[:6]


def plot_drift(summaries: Sequence[CellSummary], path: Path, keys: Sequence[str], title: str) -> None:
    """One panel per drift key: value per stage (mean ± std over seeds), one line per cell."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.2 * min(len(keys), 3), 3.2 * math.ceil(len(keys) / 3))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(math.ceil(len(keys) / 3), min(len(keys), 3), i + 1)
        for s in summaries:
            per_stage: dict[int, list[float]] = {}
            for r in s.runs:
                for st in record_of(r).stages or []:
                    v = stage_drift(st).get(key)
                    if isinstance(v, (int, float)) and isinstance(st.stage, int):
                        per_stage.setdefault(st.stage, []).append(float(v))
            if not per_stage:
                continue
            xs = sorted(per_stage)
            stats = [mean_std(per_stage[x]) for x in xs]
            ax.errorbar(
                xs,
                [m for m, _, _ in stats],
                yerr=[e for _, e, _ in stats],
                marker="o",
                capsize=2,
                label=f"{series_name(s)} {s.cell.budget_label}",
            )
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("stage")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
