"""Where a run's wall time goes: model load, evaluation, rollout (stage data), training, checkpointing,
drift and diagnostics, read from a finished (or running) run's ``results.json``.

Run::

    python -m opr.tools.bench.end_to_end outputs/default/opr/budget0.1/seed0/<time> [more run dirs] --out e2e.json

``seconds_setup`` gives the model load (and benchmark build); each stage entry's ``seconds`` gives
``eval``, ``data`` (for OPR: rollouts, scoring and selection), ``train``, ``checkpoint``, ``drift`` and
``diagnostics``; ``other`` is what ``seconds_total`` holds beyond the stage parts (results writing,
training-state saves, the probe model copy). Peak RSS is read from ``peak_rss_mb`` at the top level, in
``run`` or per stage when the run recorded it; otherwise the report says it was not recorded.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from opr.config import run_budget
from opr.results import RunResults, plain_status
from opr.tools.bench.common import table, write_json

# results.json stage keys -> report categories, in report order
CATEGORIES = {"eval": "evaluation", "data": "rollout", "train": "training", "checkpoint": "checkpointing",
              "drift": "drift", "diagnostics": "diagnostics"}


def find_results(path: Path) -> Path:
    """``path`` itself when it is a results.json, else ``path/results.json``; a clear error otherwise."""
    f = path if path.name == "results.json" else path / "results.json"
    if not f.is_file():
        raise FileNotFoundError(f"no results.json at {f}: give a run directory (the Hydra run dir of train.py)")
    return f


def peak_rss(results: RunResults | Mapping) -> Optional[float]:
    """Peak RSS in MiB if the run recorded one (top level, ``run`` facts, or the max over stages)."""
    record = RunResults.coerce(results)
    # a top-level peak_rss_mb is no field of the record (the loop never wrote one): read from extra
    found = [record.extra.get("peak_rss_mb"), (record.run or {}).get("peak_rss_mb")]
    found += [s.peak_rss_mb for s in record.stages or []]
    found = [float(x) for x in found if x is not None]
    return max(found) if found else None


def breakdown(results: RunResults | Mapping) -> dict:
    """Seconds per category for one run (its record or results.json dict): {"model_load", "benchmark",
    <categories>, "other", "wall"}, plus the same per stage (``stages``: list of {stage, task, <categories>})."""
    record = RunResults.coerce(results)
    setup = record.seconds_setup or {}
    out: dict = {"model_load": float(setup.get("model_load", 0.0)), "benchmark": float(setup.get("benchmark", 0.0))}
    for name in CATEGORIES.values():
        out[name] = 0.0
    stages = []
    for s in record.stages or []:
        row = {"stage": s.stage, "task": s.task or "(base)"}
        for key, name in CATEGORIES.items():
            v = float((s.seconds or {}).get(key, 0.0))
            row[name] = v
            out[name] += v
        stages.append(row)
    loop_total = record.seconds_spent
    parts = sum(out[name] for name in CATEGORIES.values())
    out["other"] = max(0.0, float(loop_total) - parts) if loop_total is not None else 0.0
    out["wall"] = out["model_load"] + out["benchmark"] + parts + out["other"]
    out["stages"] = stages
    return out


def describe(run_dir: Path) -> dict:
    record = RunResults.load(find_results(run_dir))
    cfg = record.config or {}
    b = breakdown(record)
    return {
        "run_dir": str(run_dir), "status": plain_status(record.status),
        "method": (cfg.get("method") or {}).get("name"), "budget": run_budget(cfg),
        "backbone": (cfg.get("backbone") or {}).get("name"), "tasks": record.tasks or [],
        "train_steps": sum(s.train.get("steps", 0) for s in record.stages or [] if isinstance(s.train, dict)),
        "peak_rss_mb": peak_rss(record), "seconds": b,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", help="write the breakdown as JSON here")
    args = p.parse_args(argv)
    runs = [describe(d) for d in args.run_dirs]
    names = ["model_load", *CATEGORIES.values(), "other", "wall"]
    for r in runs:
        s = r["seconds"]
        print(f"\n{r['run_dir']}  ({r['method']}, budget {r['budget']}, {len(r['tasks'])} tasks, {r['status']})")
        print(table([{"part": n, "seconds": s[n], "share_%": 100 * s[n] / s["wall"] if s["wall"] else 0.0}
                     for n in names]))
        print(table(s["stages"]))
        rss = r["peak_rss_mb"]
        print(f"peak RSS: {rss:.0f} MiB" if rss is not None else
              "peak RSS: not recorded (the loop should store resource.getrusage(RUSAGE_SELF).ru_maxrss, in MiB, "
              "as stages[t].peak_rss_mb after each stage and seconds_setup-time as run.peak_rss_mb)")
    payload = {"benchmark": "end_to_end", "runs": runs}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
