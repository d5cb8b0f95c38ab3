"""Time per stage against the number of tasks and against the replay budget, from a set of runs.

Run (any mix of run dirs, or folders searched for ``results.json``; e.g. a sweep's ``multirun/`` folder)::

    python -m opr.tools.bench.scaling multirun/default/2026-11-23_12-00-00 --out scaling.json --plot scaling.png

For each run: its method, budget and number of tasks, the total seconds per part (see
:mod:`opr.tools.bench.end_to_end`) and the mean seconds per trained stage of rollout (stage data), training,
evaluation and checkpointing. Two groupings are printed (and plotted): by number of tasks at a fixed budget,
and by budget at a fixed number of tasks (per method; runs with the same three values are averaged, the other
one is never averaged in). The plot draws the series that vary (two or more x values). For example::

    python train.py -m budget=0.01,0.05,0.1,0.2 benchmark.num_tasks=3
    python train.py -m benchmark.num_tasks=2,3,4,5 budget=0.1
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from opr.tools.bench.common import table, write_json
from opr.tools.bench.end_to_end import CATEGORIES, describe

PER_STAGE = ("rollout", "training", "evaluation", "checkpointing")


def collect(paths: Sequence[Path]) -> list[dict]:
    """Every run under ``paths`` (a run dir, a results.json, or a folder searched recursively)."""
    return [row(describe(d)) for d in run_dirs(paths)]


def run_dirs(paths: Sequence[Path]) -> list[Path]:
    """The run directories under ``paths`` (a run dir, a results.json, or a folder searched recursively)."""
    dirs: list[Path] = []
    for p in paths:
        if p.name == "results.json" or (p / "results.json").is_file():
            dirs.append(p.parent if p.name == "results.json" else p)
        elif p.is_dir():  # run dirs only: not the copies inside a run (train_state/, checkpoints/)
            found = sorted(f.parent for f in p.rglob("results.json"))
            dirs.extend(d for d in found if not any(a in found for a in d.parents))
        else:
            raise FileNotFoundError(f"{p} is neither a run directory nor a folder holding run directories")
    if not dirs:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, paths))}")
    return dirs


def row(run: dict) -> dict:
    """One table row: totals per part and means per trained stage."""
    s = run["seconds"]
    trained = [st for st in s["stages"] if st["stage"] not in (0, None)]
    out = {"method": run["method"], "budget": run["budget"], "num_tasks": len(run["tasks"]),
           "status": run["status"], "wall": s["wall"], "model_load": s["model_load"]}
    for name in CATEGORIES.values():
        out[name] = s[name]
    for name in PER_STAGE:
        out[f"{name}_per_stage"] = sum(st[name] for st in trained) / len(trained) if trained else 0.0
    out["run_dir"] = run["run_dir"]
    return out


def group(rows: Sequence[dict], key: str, fixed: str) -> list[dict]:
    """Mean of the per-stage columns and the wall time over the complete runs sharing (method, ``fixed``,
    ``key``): how time grows with ``key`` while ``fixed`` stays put. Unfinished runs (still running, stopped,
    diverged) are listed in the run table but left out here."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] != "complete":
            continue
        buckets[(r["method"], r.get(fixed), r[key])].append(r)
    out = []
    for (method, f, k), rs in sorted(buckets.items(),
                                     key=lambda kv: (str(kv[0][0]), kv[0][1] or 0, kv[0][2] or 0)):
        g = {"method": method, fixed: f, key: k, "runs": len(rs)}
        for col in ["wall", *(f"{n}_per_stage" for n in PER_STAGE)]:
            g[col] = sum(r[col] for r in rs) / len(rs)
        out.append(g)
    return out


def _series(rows: Sequence[dict], key: str, fixed: str) -> dict[tuple, list[dict]]:
    """(method, fixed value) -> its rows sorted by ``key``, for the series with two or more ``key`` values."""
    series: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r[key] is not None:
            series[(str(r["method"]), r.get(fixed))].append(r)
    return {name: sorted(rs, key=lambda r: r[key]) for name, rs in sorted(series.items(), key=lambda kv: str(kv[0]))
            if len(rs) > 1}


def plot(by_tasks: Sequence[dict], by_budget: Sequence[dict], path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, key, fixed, label, fixed_label in [
            (axes[0], by_tasks, "num_tasks", "budget", "number of tasks", "budget"),
            (axes[1], by_budget, "budget", "num_tasks", "replay budget ρ", "tasks")]:
        series = _series(rows, key, fixed)
        for (m, f), rs in series.items():
            xs = [r[key] for r in rs]
            for name, style in zip(PER_STAGE, ("-o", "-s", "--^", ":x")):
                ax.plot(xs, [r[f"{name}_per_stage"] for r in rs], style,
                        label=f"{name} ({m}, {fixed_label} {f})" if len(series) > 1 else name)
        if not series:
            ax.text(0.5, 0.5, f"no runs that vary only the {label}", ha="center", transform=ax.transAxes)
        elif len(series) == 1:
            ((m, f),) = series
            ax.set_title(f"{m}, {fixed_label} {f}", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per trained stage")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if by_budget and all((r["budget"] or 0) > 0 for r in by_budget):
        axes[1].set_xscale("log")  # budgets 0.01 .. 0.2 spread evenly on a log axis
    fig.suptitle("time per stage")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path, help="run dirs or folders holding them")
    p.add_argument("--out", help="write rows and groupings as JSON here")
    p.add_argument("--plot", help="write a PNG plot here")
    args = p.parse_args(argv)
    rows = collect(args.paths)
    cols = ["method", "budget", "num_tasks", "status", "wall", *(f"{n}_per_stage" for n in PER_STAGE)]
    print(table(rows, cols))
    by_tasks, by_budget = group(rows, "num_tasks", fixed="budget"), group(rows, "budget", fixed="num_tasks")
    print("\nby number of tasks\n" + table(by_tasks))
    print("\nby budget\n" + table(by_budget))
    if args.plot:
        plot(by_tasks, by_budget, args.plot)
    payload = {"benchmark": "scaling", "runs": rows, "by_num_tasks": by_tasks, "by_budget": by_budget}
    write_json(args.out, payload)
    return payload




if __name__ == "__main__":
    main()
