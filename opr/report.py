"""Compare finished runs: a method x budget x backbone x benchmark table and plots.

    python -m opr.report PATH [PATH ...] [--out DIR]

Each PATH is a run directory, a multirun/sweep directory (searched recursively for ``results.json``) or a
``results.json`` file. Writes into DIR (default ``report``):

- ``report.md`` (also printed) and ``report.csv``: per cell (method, budget, backbone, benchmark) the number of
  seeds and OP / BWT / FWT as mean ± sample standard deviation over seeds (ddof=1; a single seed shows
  ``± 0.00`` with n=1). The CSV has every metric found in the runs' ``metrics`` as ``{name}_mean``/``{name}_std``.
- ``heatmap_<cell>.png``: the accuracy matrix averaged over seeds, cells annotated.
- ``tasks_<cell>.png``: each task's score across stages (one line per task).
- ``bwt_vs_budget_<backbone>_<benchmark>.png``: BWT against the replay budget per method, error bars = std.
- ``drift_<backbone>_<benchmark>.png``: drift numbers per stage (``stages[t]["drift"]``) when runs logged them.

Only runs with ``status == "complete"`` enter the table. Runs that are partial (``running``/``diverged``),
whose ``results.json`` is missing (a run directory with ``.hydra/`` or ``train.log`` but no results) or
unreadable, and seeds that other cells of the same backbone/benchmark have but a cell lacks, are listed under
"Missing / partial runs"; none of them stops the report. Methods that ignore the budget (``seq_sft``, ``sdft``, and
``grpo`` / ``self_distill`` without ``replay_budget``) have budget ``-``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from opr.config import run_budget
from opr.metrics.continual import continual_metrics

TABLE_METRICS: tuple[str, ...] = ("OP", "BWT", "FWT")
RUN_MARKERS: tuple[str, ...] = (".hydra", "train.log")
# A run's sub-folders that hold no run of their own: train_state/s*/ keeps a copy of results.json as it was
# when the state was taken, which must not count as a (partial) run.
PRUNE_DIRS: frozenset[str] = frozenset(
    {"checkpoints", "predictions", "replay", "train_state", "wandb", ".hydra", "__pycache__", ".git"}
)
DRIFT_KEYS: tuple[str, ...] = (
    "param/rel_fro/all",
    "spectral/inside_fraction/all",
    "spectral/angle_left_deg/all",
    "spectral/angle_right_deg/all",
    "spectral/sv_rel_change/all",
    "response/next_token_kl",
)
NO_BUDGET = "-"


# ------------------------------------------------------------------------------------------ loading
def _read_hydra_config(run_dir: Path) -> dict | None:
    """The run's composed config from ``.hydra/config.yaml`` when it exists and parses, else ``None``."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # a half-written or templated file: the run is still listed, just without its cell
        return None
    return cfg if isinstance(cfg, dict) else None


def read_results_json_runs(root: Path) -> list[dict]:
    """Runs under ``root`` (a ``results.json`` file or a directory searched recursively).

    Every ``results.json`` gives its parsed dict plus ``_source`` (the run directory) and ``_mtime``; one that
    cannot be read gives ``{"_source", "status": "unreadable", "error"}``. A run directory (holding ``.hydra/`` or
    ``train.log``) without ``results.json`` gives ``{"_source", "status": "missing", "error", "config"?}`` with
    the config from ``.hydra/config.yaml`` when available.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"report input {str(root)!r} does not exist")
    files: list[Path] = []
    marked: list[Path] = []  # run directories by their markers
    if root.is_file():
        files.append(root)
    else:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in PRUNE_DIRS)  # a run's bulky sub-folders
            here = Path(dirpath)
            if "results.json" in filenames:
                files.append(here / "results.json")
            elif any((here / m).exists() for m in RUN_MARKERS):
                marked.append(here)
    runs: list[dict] = []
    for f in files:
        src = str(f.parent)
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"top level is {type(data).__name__}, not an object")
        except (OSError, ValueError) as err:
            runs.append({"_source": src, "status": "unreadable", "error": f"{f.name}: {err}"})
            continue
        data["_source"] = src
        data["_mtime"] = f.stat().st_mtime
        runs.append(data)
    have = [f.parent for f in files]
    for d in marked:
        if any(h.is_relative_to(d) for h in have):  # a parent of finished runs, e.g. a sweep root
            continue
        entry: dict = {"_source": str(d), "status": "missing", "error": "no results.json"}
        cfg = _read_hydra_config(d)
        if cfg is not None:
            entry["config"] = cfg
        runs.append(entry)
    return runs


_OFFLINE_RUN_RE = re.compile(r"^offline-run-(\d{8}_\d{6})-(.+)$")


def read_wandb_offline_runs(
    paths: str | Path | Iterable[str | Path], *, skip_runs_with_results: bool = False
) -> list[dict]:
    """Runs logged with ``logger=wandb`` in offline mode, read back from their ``.wandb`` files alone.

    Each path is a ``.wandb`` file, an ``offline-run-*`` folder, or a directory searched recursively (a
    ``wandb`` folder, a run directory, a sweep directory; ``checkpoints``/``predictions`` are not entered) for
    ``wandb/offline-run-*/run-*.wandb``. Each run gives one dict in the ``results.json`` format (``config``,
    ``tasks``, ``matrix``, ``general``, ``metrics``, ``stages``, ``status``; see
    ``opr.loggers_wandb.results_from_records``) plus ``_source`` (its offline-run folder) and ``_mtime``.
    Several offline-run folders of one run id in one ``wandb`` folder (the attempts of a requeued job) give
    one run: stage scores of later attempts replace earlier ones; status, config and final metrics are the
    newest attempt's. A file that cannot be read, or every file when the ``wandb`` package is missing, gives
    ``{"_source", "status": "unreadable", "error"}``.

    ``skip_runs_with_results``: leave out the W&B runs of a run directory (the parent of ``wandb/``) that
    holds a ``results.json`` the search passes through, so that ``load_runs`` does not count a run twice.
    """
    roots = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    found: dict[Path, Path] = {}  # resolved -> as found
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"report input {str(root)!r} does not exist")
        if root.is_file():
            if root.suffix == ".wandb":
                found.setdefault(root.resolve(), root)
            continue
        if _OFFLINE_RUN_RE.match(root.name):
            for f in sorted(root.glob("run-*.wandb")):
                found.setdefault(f.resolve(), f)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here.name == "wandb":
                for f in sorted(here.glob("offline-run-*/run-*.wandb")):
                    found.setdefault(f.resolve(), f)
                dirnames[:] = []
                continue
            skip = PRUNE_DIRS - {"wandb"}
            if skip_runs_with_results and "results.json" in filenames:
                skip = skip | {"wandb"}
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
    attempts: dict[tuple[Path, str], list[tuple[tuple[str, float], Path]]] = {}
    for f in found.values():
        m = _OFFLINE_RUN_RE.match(f.parent.name)
        key = (f.parent.parent, m.group(2)) if m else (f.parent, f.name)
        attempts.setdefault(key, []).append(((m.group(1) if m else "", f.stat().st_mtime), f))
    from opr.loggers_wandb import WandbReadError, read_offline_run

    runs: list[dict] = []
    for key in sorted(attempts, key=str):
        files = [f for _, f in sorted(attempts[key])]  # oldest first: a later attempt's values win
        try:
            runs.append(read_offline_run(files))
        except (WandbReadError, ImportError, OSError) as err:
            runs.append({"_source": str(files[-1].parent), "status": "unreadable", "error": str(err)})
    return runs


Reader = Callable[[Path], list[dict]]
# W&B offline runs are read only where no results.json covers them (read_results_json_runs has those).
WANDB_OFFLINE_READER: Reader = functools.partial(read_wandb_offline_runs, skip_runs_with_results=True)


def load_runs(
    paths: Iterable[str | Path], readers: Sequence[Reader] = (read_results_json_runs, WANDB_OFFLINE_READER)
) -> list[dict]:
    """Results dicts (the ``results.json`` format, plus ``_source``) of every run found under ``paths``.

    ``readers`` turn one path into runs; ``read_results_json_runs`` reads run folders. A reader of W&B offline
    run files (``wandb/offline-run-*``) can be added beside it, returning dicts of the same shape.
    Missing or unreadable runs come back too, with ``status`` "missing" / "unreadable" and an ``error``.
    """
    runs: list[dict] = []
    for p in paths:
        for reader in readers:
            runs.extend(reader(Path(p)))
    return runs


# ------------------------------------------------------------------------------------------ cells
@dataclass(frozen=True, order=True)
class Cell:
    """One row of the table. ``budget`` is ``None`` for methods that ignore it."""

    backbone: str
    benchmark: str
    method: str
    budget: float | None

    @property
    def budget_label(self) -> str:
        return NO_BUDGET if self.budget is None else f"{self.budget:g}"

    @property
    def label(self) -> str:
        return f"{self.method} budget={self.budget_label} {self.backbone} {self.benchmark}"

    @property
    def slug(self) -> str:
        raw = f"{self.method}_b{self.budget_label}_{self.backbone}_{self.benchmark}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw.replace(NO_BUDGET, "none"))

    def sort_key(self) -> tuple:
        return (self.backbone, self.benchmark, self.method, -1.0 if self.budget is None else self.budget)


def _name(cfg: dict, group: str) -> str:
    node = cfg.get(group)
    if isinstance(node, dict) and node.get("name") is not None:
        return str(node["name"])
    if isinstance(node, str):
        return node
    return "?"


def cell_of(config: dict) -> Cell:
    """The table cell of a run config (``method.name``, ``budget.ratio``, ``backbone.name``, ``benchmark.name``).

    Raises ``ValueError`` when the method name is missing or a budgeted method has no numeric ``budget.ratio``.
    """
    method = _name(config, "method")
    if method == "?":
        raise ValueError("config has no method.name")
    budget = run_budget(config)
    return Cell(_name(config, "backbone"), _name(config, "benchmark"), method, budget)


def seed_of(run: dict) -> int | None:
    cfg = run.get("config") or {}
    seed = cfg.get("seed", (run.get("run") or {}).get("seed"))
    return int(seed) if isinstance(seed, (int, float)) else None


def _matrix_problem(run: dict) -> str | None:
    tasks, matrix = run.get("tasks"), run.get("matrix")
    if not isinstance(tasks, list) or not tasks:
        return "no task list"
    if not isinstance(matrix, list):
        return "no accuracy matrix"
    T = len(tasks)
    if len(matrix) != T + 1 or any(not isinstance(r, list) or len(r) != T for r in matrix):
        return f"accuracy matrix is not {T + 1} x {T}"
    return None


def run_metrics(run: dict) -> dict[str, float | None]:
    """The run's ``metrics``, completed from its accuracy matrix for OP/BWT/FWT... when absent."""
    metrics = dict(run.get("metrics") or {})
    if any(m not in metrics for m in TABLE_METRICS) and _matrix_problem(run) is None:
        for key, value in continual_metrics(run["matrix"]).items():
            metrics.setdefault(key, value)
    return metrics


@dataclass
class CellSummary:
    """The complete runs of one cell (one per seed) and their metrics' mean, sample std and count."""

    cell: Cell
    runs: list[dict]
    stats: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int | None]:
        return [seed_of(r) for r in self.runs]


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 or 0.0 for a single value, n); ``values`` must not be empty."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, len(values)


@dataclass
class Collected:
    """Everything the report shows: cell summaries and the runs that did not make it, with reasons."""

    summaries: list[CellSummary]
    problems: list[dict]  # {"source", "cell" (label), "seed", "status", "detail"}
    missing_seeds: list[tuple[Cell, list[int]]]


def collect(runs: list[dict]) -> Collected:
    """Group complete runs by cell (newest per seed), compute the statistics and list what is missing."""
    problems: list[dict] = []
    by_cell: dict[Cell, dict] = {}
    known: list[tuple[Cell, int | None]] = []  # every run whose cell is known, complete or not
    for run in runs:
        src = run.get("_source", "?")
        cfg = run.get("config")
        cell: Cell | None = None
        detail = run.get("error")
        if isinstance(cfg, dict):
            try:
                cell = cell_of(cfg)
            except ValueError as err:
                detail = str(err)
        status = run.get("status", "?")
        if cell is not None:
            known.append((cell, seed_of(run)))
        bad = None
        if status != "complete":
            bad = detail or f"status {status!r}"
            if status in ("running", "diverged") and isinstance(run.get("matrix"), list) and run.get("tasks"):
                bad = f"{len(run['matrix']) - 1} of {len(run['tasks'])} stages evaluated" + (
                    f"; {run['error']}" if run.get("error") else ""
                )
        elif cell is None:
            bad = detail or "config missing"
        else:
            bad = _matrix_problem(run)
        if bad is not None:
            label = cell.label if cell else "?"
            problems.append(
                {
                    "source": src,
                    "cell": label,
                    "seed": seed_of(run),
                    "status": status,
                    "detail": bad,
                    "_cell": cell,
                }
            )
            continue
        assert cell is not None
        seeds = by_cell.setdefault(cell, {})
        seed = seed_of(run)
        key = seed if seed is not None else f"_{len(seeds)}"  # runs without a seed are never merged
        old = seeds.get(key)
        if old is not None:
            newer, older = (run, old) if run.get("_mtime", 0) >= old.get("_mtime", 0) else (old, run)
            seeds[key] = newer
            problems.append(
                {
                    "source": older.get("_source", "?"),
                    "cell": cell.label,
                    "seed": seed,
                    "status": "superseded",
                    "detail": f"same seed as {newer.get('_source', '?')}",
                }
            )
        else:
            seeds[key] = run

    summaries = []
    for cell in sorted(by_cell, key=Cell.sort_key):
        cell_runs = sorted(by_cell[cell].values(), key=lambda r: (seed_of(r) is None, seed_of(r) or 0))
        summary = CellSummary(cell, cell_runs)
        names: list[str] = []
        metrics_per_run = [run_metrics(r) for r in cell_runs]
        for m in metrics_per_run:
            names.extend(k for k in m if k not in names)
        for name in names:
            vals = [m[name] for m in metrics_per_run if isinstance(m.get(name), (int, float))]
            if vals:
                summary.stats[name] = mean_std([float(v) for v in vals])
        summaries.append(summary)

    # seeds that other cells of the same backbone/benchmark have (from any run, finished or not)
    expected: dict[tuple[str, str], set[int]] = {}
    for cell, seed in known:
        if seed is not None:
            expected.setdefault((cell.backbone, cell.benchmark), set()).add(seed)
    done = {s.cell: {seed_of(r) for r in s.runs} for s in summaries}
    for p in problems:  # an abandoned attempt whose cell and seed finished elsewhere is no hole in the sweep
        cell = p.pop("_cell", None)
        if cell is not None and p["seed"] is not None and p["seed"] in done.get(cell, set()):
            p["detail"] += "; a complete run of this cell and seed exists"
    missing_seeds = []
    for cell in sorted({c for c, _ in known}, key=Cell.sort_key):
        lack = sorted(expected.get((cell.backbone, cell.benchmark), set()) - done.get(cell, set()))
        if lack:
            missing_seeds.append((cell, lack))
    return Collected(summaries, problems, missing_seeds)


# ------------------------------------------------------------------------------------------ table
def _fmt(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "n/a"
    mean, std, _ = stat
    return f"{mean:.2f} ± {std:.2f}"


def markdown_table(summaries: Sequence[CellSummary], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """The Markdown table: one row per cell, ``mean ± std`` per metric, n = number of seeds."""
    head = ["method", "budget", "backbone", "benchmark", "n", "seeds", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for s in summaries:
        seeds = ",".join("?" if x is None else str(x) for x in s.seeds)
        row = [s.cell.method, s.cell.budget_label, s.cell.backbone, s.cell.benchmark, str(len(s.runs)), seeds]
        row += [_fmt(s.stats.get(m)) for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def csv_rows(summaries: Sequence[CellSummary]) -> tuple[list[str], list[dict]]:
    """CSV header and rows: cell columns, n, seeds (``;``-joined), ``{metric}_mean``/``{metric}_std``/``{metric}_n``
    for every metric (OP, BWT, FWT first); an absent metric is an empty field."""
    names: list[str] = list(TABLE_METRICS)
    for s in summaries:
        names.extend(k for k in s.stats if k not in names)
    header = ["method", "budget", "backbone", "benchmark", "n", "seeds"]
    for name in names:
        header += [f"{name}_mean", f"{name}_std", f"{name}_n"]
    rows = []
    for s in summaries:
        row: dict = {
            "method": s.cell.method,
            "budget": s.cell.budget_label,
            "backbone": s.cell.backbone,
            "benchmark": s.cell.benchmark,
            "n": len(s.runs),
            "seeds": ";".join("?" if x is None else str(x) for x in s.seeds),
        }
        for name in names:
            stat = s.stats.get(name)
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_n"] = stat if stat else ("", "", 0)
        rows.append(row)
    return header, rows


def write_csv(summaries: Sequence[CellSummary], path: Path) -> None:
    header, rows = csv_rows(summaries)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def missing_section(collected: Collected) -> str:
    """Markdown list of partial / missing / unreadable / superseded runs and of cells lacking seeds."""
    lines = []
    for p in collected.problems:
        seed = "" if p["seed"] is None else f" seed={p['seed']}"
        lines.append(f"- `{p['source']}` ({p['cell']}{seed}): {p['status']}, {p['detail']}")
    for cell, seeds in collected.missing_seeds:
        lines.append(f"- {cell.label}: no complete run for seed(s) {', '.join(map(str, seeds))}")
    return "\n".join(lines) if lines else "(none)"


# ------------------------------------------------------------------------------------------ plots
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

    tasks = summary.runs[0]["tasks"]
    same = [r for r in summary.runs if r["tasks"] == tasks]
    mean = np.mean(np.array([r["matrix"] for r in same], dtype=float), axis=0)
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
    ax.set_title(f"{summary.cell.label} (n={n})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="score")
    fig.tight_layout()
    fig.savefig(path)


def plot_task_curves(summary: CellSummary, path: Path) -> None:
    """Each task's seed-mean score across stages 0..T (one line per task; its own stage marked by a dot)."""
    import numpy as np

    tasks, mat, n = _mean_matrix(summary)
    M = np.array(mat)
    same = [r for r in summary.runs if r["tasks"] == tasks]
    std = np.std(np.array([r["matrix"] for r in same], dtype=float), axis=0, ddof=1) if n > 1 else None
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
    ax.set_title(f"{summary.cell.label} (n={n})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_bwt_vs_budget(summaries: Sequence[CellSummary], path: Path, title: str) -> None:
    """BWT (mean ± std over seeds) against budget, one line per method (n = seeds in its legend entry; the
    methods' points are shifted sideways by up to ±2% of the largest budget so that error bars at the same
    budget stay apart); budget-less methods as a dashed level with a ±std band. The x axis starts at 0."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import rcParams

    palette = rcParams["axes.prop_cycle"].by_key()["color"]
    methods = sorted({s.cell.method for s in summaries})
    budgets = [s.cell.budget for s in summaries if s.cell.budget is not None]
    top = max(budgets, default=1.0)
    budgeted = [m for m in methods if any(s.cell.method == m and s.cell.budget is not None for s in summaries)]
    for i, method in enumerate(methods):
        color = palette[i % len(palette)]
        pts = sorted(
            (s.cell.budget, *s.stats["BWT"])
            for s in summaries
            if s.cell.method == method and s.cell.budget is not None and "BWT" in s.stats
        )
        if pts:
            xs, ys, es, ns = zip(*pts)
            shift = (budgeted.index(method) - (len(budgeted) - 1) / 2) * 0.04 * top / max(1, len(budgeted) - 1)
            n = f"n={min(ns)}" if min(ns) == max(ns) else f"n={min(ns)}-{max(ns)}"
            ax.errorbar([x + shift for x in xs], ys, yerr=es, marker="o", capsize=3, label=f"{method} ({n})",
                        color=color)
        for s in summaries:
            if s.cell.method == method and s.cell.budget is None and "BWT" in s.stats:
                mean, std, n = s.stats["BWT"]
                ax.axhline(mean, linestyle="--", color=color, label=f"{method} (no budget, n={n})")
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


def drift_keys(summaries: Sequence[CellSummary]) -> list[str]:
    """The drift keys to plot: the preferred DRIFT_KEYS present in any stage, else the first six found."""
    found: list[str] = []
    for s in summaries:
        for r in s.runs:
            for st in r.get("stages") or []:
                for k in (st.get("drift") or {}) if isinstance(st, dict) else {}:
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
                for st in r.get("stages") or []:
                    v = (st.get("drift") or {}).get(key)
                    if isinstance(v, (int, float)) and isinstance(st.get("stage"), int):
                        per_stage.setdefault(st["stage"], []).append(float(v))
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
                label=f"{s.cell.method} {s.cell.budget_label}",
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


# ------------------------------------------------------------------------------------------ report
def build_report(paths: Sequence[str | Path], out_dir: Path) -> tuple[str, Collected]:
    """Load, summarise, write report.md / report.csv / PNGs into ``out_dir``; returns the Markdown and data."""
    runs = load_runs(paths)
    if not runs:
        raise ValueError(f"no results.json and no run directory under {', '.join(map(str, paths))}")
    collected = collect(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(collected.summaries, out_dir / "report.csv")
    plots: list[str] = []
    for s in collected.summaries:
        for prefix, fn in (("heatmap", plot_heatmap), ("tasks", plot_task_curves)):
            name = f"{prefix}_{s.cell.slug}.png"
            fn(s, out_dir / name)
            plots.append(name)
    groups: dict[tuple[str, str], list[CellSummary]] = {}
    for s in collected.summaries:
        groups.setdefault((s.cell.backbone, s.cell.benchmark), []).append(s)
    for (backbone, bench), group in groups.items():
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{backbone}_{bench}")
        if any("BWT" in s.stats for s in group):
            name = f"bwt_vs_budget_{slug}.png"
            plot_bwt_vs_budget(group, out_dir / name, f"BWT vs budget: {backbone} on {bench}")
            plots.append(name)
        keys = drift_keys(group)
        if keys:
            name = f"drift_{slug}.png"
            plot_drift(group, out_dir / name, keys, f"drift per stage: {backbone} on {bench}")
            plots.append(name)
    n_complete = sum(len(s.runs) for s in collected.summaries)
    md = (
        "\n\n".join(
            [
                "# Run comparison",
                f"{n_complete} complete run(s) in {len(collected.summaries)} cell(s) from {', '.join(map(str, paths))}. "
                "Values: mean ± sample std (ddof=1) over seeds, 0-100 scale; n = seeds. More metrics in report.csv.",
                markdown_table(collected.summaries),
                "## Missing / partial runs",
                missing_section(collected),
                "## Plots",
                "\n".join(f"- [{p}]({p})" for p in plots) if plots else "(none)",
            ]
        )
        + "\n"
    )
    (out_dir / "report.md").write_text(md, encoding="utf-8")
    return md, collected


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opr.report", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths", nargs="+", type=Path, help="run directories, sweep directories or results.json files"
    )
    ap.add_argument("--out", type=Path, default=Path("report"), help="output directory (default: report)")
    args = ap.parse_args(argv)
    try:
        md, collected = build_report(args.paths, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(md)
    print(f"wrote {os.path.join(args.out, 'report.md')}, report.csv and plots", file=sys.stderr)
    return 0 if collected.summaries else 1


if __name__ == "__main__":
    sys.exit(main())
