"""What a sweep cost and what the stage cache saved: per run and in total.

    python -m opr.tools.bench.sweep_cost multirun/compare/2026-12-02_05-00-00 [--out cost.json]

For each run (any folders holding run directories, as :mod:`opr.tools.bench.scaling` takes them): its method,
budget and seed, the wall seconds it spent (``seconds_total``; model loading and start-up excluded), the
stages it took from the stage cache, and the compute seconds those hits saved: the training, evaluation and
analysis seconds the run that computed each entry measured (``stages[t].stage_cache.seconds_saved``). The
totals give the sweep's cost with the cache, its cost without (spent + saved), their ratio, and the cost in
"single runs" (spent / the mean wall time of the runs that hit nothing). Saved seconds are measured by other
runs, so they are as comparable as the conditions those runs ran under (same machine and load: state both).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from opr.results import RunResults, plain_status
from opr.tools.bench.common import table, write_json
from opr.tools.bench.scaling import run_dirs


def run_cost(run_dir: Path) -> dict:
    """One run's cost row from its results.json."""
    record = RunResults.load(run_dir / "results.json")
    config = record.config or {}
    stages = record.stages or []
    hits = [e.stage for e in stages if e.cache_hit]
    saved = sum(e.stage_cache["seconds_saved"] for e in stages if e.cache_hit)
    spent = record.seconds_spent
    return {"run": run_dir.name, "method": (config.get("method") or {}).get("name"), "budget": config.get("budget"),
            "seed": config.get("seed"), "status": plain_status(record.status), "spent_s": spent,
            "cache_hits": ",".join(map(str, hits)) or "-", "saved_s": saved,
            "cache": "on" if (config.get("stage_cache") or {}).get("dir") else "off"}


def totals(rows: Sequence[dict]) -> dict:
    """Sweep totals: spent, saved, spent / (spent + saved), and spent in units of an uncached run."""
    done = [r for r in rows if r["spent_s"] is not None]
    spent = sum(r["spent_s"] for r in done)
    saved = sum(r["saved_s"] for r in done)
    full = [r["spent_s"] for r in done if r["cache_hits"] == "-"]
    single: Optional[float] = sum(full) / len(full) if full else None
    return {"runs": len(done), "spent_s": spent, "saved_s": saved, "without_cache_s": spent + saved,
            "ratio_to_uncached": spent / (spent + saved) if spent + saved else None,
            "mean_uncached_run_s": single, "cost_in_runs": spent / single if single else None,
            "uncached_cost_in_runs": (spent + saved) / single if single else None}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="sweep folders or run directories")
    parser.add_argument("--out", help="also write the rows and totals as JSON")
    args = parser.parse_args(argv)
    try:
        found = run_dirs(args.paths)
    except FileNotFoundError as err:  # nothing to count: one line, as the other tools say it
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    rows = []
    for run_dir in found:
        try:
            rows.append(run_cost(run_dir))
        except (OSError, ValueError) as err:  # a truncated or foreign results.json: named, the others counted
            print(f"skipped {run_dir / 'results.json'}: unreadable ({type(err).__name__}: {err})", file=sys.stderr)
    summary = totals(rows)
    print(table(rows, ["run", "method", "budget", "seed", "status", "cache", "spent_s", "cache_hits", "saved_s"]))
    print(table([summary]))
    payload = {"runs": rows, "totals": summary}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()  # its errors exit 2 with one line
