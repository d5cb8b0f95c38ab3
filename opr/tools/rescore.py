"""Re-score finished runs' predictions with the benchmark's current rewards.

Usage::

    python -m opr.tools.rescore RUNS_ROOT --out RESCORED_ROOT
    python -m opr.tools.report RESCORED_ROOT                      # paired statistics on the re-scored runs

A run keeps every stage's greedy answers (``predictions/stage{t}/{task}.jsonl``, keyed by example id). When a
reward changes (as the varied stream's ``general`` reward did on 2026-12-02, from exact match to
:func:`opr.benchmarks.mini_trace.reward_general_named`), the runs need not be repeated: this tool rebuilds
each run's benchmark from its own ``results.json`` config (so each task gets the reward of the run's stream
and answer style), scores every stored answer again, and writes per run ``RESCORED_ROOT/<run>/results.json``:
the run's record with the accuracy matrix, the general-ability matrix and the metrics recomputed, and a
``rescored`` entry saying from where, with which code, and which cells changed (old -> new). The run's own
``results.json`` is never modified. ``.hydra/`` is copied along so the report groups runs as before.

Every stage's predictions must be present (a run copied with only its last stage, as under
``docs/results/``, cannot be re-scored: the error names the missing file). A prediction whose example id is
not in the rebuilt benchmark is an error (the stream changed, not only its reward). A run that cannot be
re-scored (not complete, an unreadable or truncated ``results.json`` or predictions file, a missing stage) is
skipped and named; the others are re-scored. The copies of ``results.json`` in a run's ``train_state/``
folders are not runs and are not listed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from opr import jsonl
from opr.config import build
from opr.metrics.continual import continual_metrics, general_drift
from opr.provenance import git_commit
from opr.results import RunResults
from opr.types import Task

__all__ = ["RescoreError", "rescore_run", "main"]


class RescoreError(ValueError):
    """A run cannot be re-scored; the message names the run and the file or example."""


def _score_file(path: Path, task: Task, examples: dict) -> float:
    """Mean score of one predictions file; ``examples``: the task's examples by id."""
    if not jsonl.exists(path):
        raise RescoreError(f"{path} is missing: every stage's predictions are needed to re-score a run")
    scores = []
    for number, line in enumerate(jsonl.read_text(path).splitlines(), 1):  # x.jsonl or x.jsonl.gz
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise RescoreError(f"{path}:{number}: not a JSON line ({err})") from err
        example = examples.get(row["id"])
        if example is None:
            raise RescoreError(f"{path}:{number}: example {row['id']!r} is not in the rebuilt {task.name!r} task "
                               "(the run's stream differs from what its config builds now)")
        scores.append(float(task.reward(row["prediction"], example)))
    if not scores:
        raise RescoreError(f"{path} holds no predictions")
    return sum(scores) / len(scores)


def _matrix(run_dir: Path, tasks: list[Task], rows: int) -> list[list[float]]:
    by_id = [{e.id: e for e in list(task.eval) + list(task.train) + list(task.test)} for task in tasks]
    return [[_score_file(run_dir / "predictions" / f"stage{t}" / f"{task.name}.jsonl", task, ids)
             for task, ids in zip(tasks, by_id)]
            for t in range(rows)]


def _changes(old: list[list[float]], new: list[list[float]], names: list[str]) -> dict[str, list[float]]:
    """``"stage{t}/{task}": [old, new]`` for every cell that moved."""
    return {f"stage{t}/{name}": [old[t][j], new[t][j]]
            for t in range(len(new)) for j, name in enumerate(names) if abs(old[t][j] - new[t][j]) > 1e-9}


def rescore_run(run_dir: Path) -> dict:
    """The re-scored record of one complete run directory (a JSON-ready dict)."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"top level is {type(data).__name__}, not an object")
        record = RunResults.from_json(data)
    except (OSError, ValueError) as err:  # truncated by a full disk or a killed copy, not a run record
        raise RescoreError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if record.status != "complete":
        raise RescoreError(f"{run_dir}: status {record.status!r}; only complete runs are re-scored")
    benchmark = build(OmegaConf.create(record.config["benchmark"]))
    tasks = {t.name: t for t in list(benchmark.tasks) + list(benchmark.general)}
    missing = [n for n in list(record.tasks) + list(record.general.tasks) if n not in tasks]
    if missing:
        raise RescoreError(f"{run_dir}: tasks {missing} are not in the benchmark its config builds now")
    rows = len(record.matrix)
    matrix = _matrix(run_dir, [tasks[n] for n in record.tasks], rows)
    general = _matrix(run_dir, [tasks[n] for n in record.general.tasks], rows) if record.general.tasks else []
    changed = _changes(record.matrix, matrix, list(record.tasks))
    changed |= _changes(record.general.matrix, general, list(record.general.tasks)) if general else {}
    metrics = continual_metrics(matrix)
    drift = general_drift(general)
    if drift is not None:
        metrics["general_drift"] = drift
    data["matrix"] = matrix
    data["general"] = {**data["general"], "matrix": general}
    data["metrics"] = metrics
    commit, dirty = git_commit(Path(__file__).resolve().parents[2])
    data["rescored"] = {"from": str(run_dir.resolve()), "git_commit": commit, "git_dirty": dirty, "changed": changed}
    return data


def find_runs(root: Path) -> list[Path]:
    """The run directories under ``root`` (those holding a ``results.json``), without the copies of
    ``results.json`` inside a run's own sub-folders (``train_state/s*/`` keeps one as it was when the training
    state was taken: no run of its own), as the report reads them (:data:`opr.tools.report.PRUNE_DIRS`)."""
    from opr.tools.report import PRUNE_DIRS

    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in PRUNE_DIRS)
        if "results.json" in filenames:
            found.append(Path(dirpath))
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opr.tools.rescore", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="a run directory, or a folder searched for complete runs")
    parser.add_argument("--out", type=Path, required=True, help="where the re-scored run folders are written")
    args = parser.parse_args(argv)
    if not args.runs.exists():
        parser.error(f"{args.runs} does not exist")
    found = find_runs(args.runs) if args.runs.is_dir() else []
    if not found:
        parser.error(f"no results.json under {args.runs}")
    done, skipped = 0, []
    for run_dir in found:
        try:
            data = rescore_run(run_dir)
        except RescoreError as err:
            skipped.append(str(err))
            continue
        name = run_dir.relative_to(args.runs) if run_dir != args.runs else Path(run_dir.name)
        dest = args.out / name
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / "results.json.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(dest / "results.json")
        if (run_dir / ".hydra").is_dir():
            shutil.copytree(run_dir / ".hydra", dest / ".hydra", dirs_exist_ok=True)
        done += 1
        moved = data["rescored"]["changed"]
        print(f"{name}: {len(moved)} cells changed" + (f" ({', '.join(list(moved)[:4])}...)" if moved else ""))
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    print(f"re-scored {done} runs into {args.out}; skipped {len(skipped)}", file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
