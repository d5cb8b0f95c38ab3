"""Reading a W&B offline run back: a ``.wandb`` file (or the files of one run's attempts) as a dict in the
``results.json`` format.

``opr.loggers.wandb.WandbLogger`` writes these runs; this reader uses the ``wandb`` package's own
transaction-log reader (``wandb-core leet inspect --json``) and the metric names the logger writes (its
``FINAL_PREFIX``, ``STATUS_KEY``, ``TASKS_KEY``, ``GENERAL_TASKS_KEY``, ``STAGE_KEY_RE``), so that
``opr.tools.report`` builds its table from W&B files alone (:func:`opr.tools.report.load.read_wandb_offline_runs`
finds them).
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from opr.loggers.wandb import FINAL_PREFIX, GENERAL_TASKS_KEY, INSTALL_HINT, STAGE_KEY_RE, STATUS_KEY, TASKS_KEY
from opr.results import Status


class WandbReadError(ValueError):
    """A ``.wandb`` file could not be read; the message names the file and the reason."""


def wandb_records(wandb_file: Path, timeout_s: float = 120.0) -> list[dict]:
    """The records of a ``.wandb`` transaction log as dicts (``{"num", "type", <type>: {...}}``), decoded by
    the wandb package's own reader, ``wandb-core leet inspect --json`` (one JSON object per record).

    A file cut short (a killed job) gives the records before the cut. Raises ``WandbReadError`` when the
    file cannot be opened or decoded at all, ``ImportError`` when ``wandb`` is not installed.
    """
    wandb_file = Path(wandb_file)
    if not wandb_file.is_file():
        raise WandbReadError(f"{wandb_file}: no such .wandb file")
    try:
        from wandb.util import get_core_path
    except ImportError as err:
        raise ImportError(f"reading {wandb_file} needs the wandb package: {INSTALL_HINT}") from err
    cmd = [
        get_core_path(),
        "leet",
        "inspect",
        "--no-observability",
        "--json",
        "--run-file",
        str(wandb_file),
        str(wandb_file.parent.parent),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise WandbReadError(f"{wandb_file}: wandb-core could not read it: {err}") from err
    records = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a record cut off by the end of the output
    if proc.returncode != 0 and not records:
        reason = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[
            -1
        ]
        raise WandbReadError(f"{wandb_file}: {reason}")
    return records


def _number(v: Any) -> Optional[float]:
    """``v`` as a float when it is a finite number (not a bool), else ``None``."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return None


def results_from_records(records: Sequence[dict]) -> dict:
    """A ``results.json``-format dict from the records of one W&B run written by ``WandbLogger``.

    ``records`` may hold several attempts of the run one after the other (a requeued offline job writes one
    ``.wandb`` file per attempt; each starts with a ``header`` record), oldest first: per-stage scores of a
    later attempt replace earlier ones, while the config, the final results and the exit state are the last
    attempt's.

    Keys: ``config`` (the logged config), ``tasks``, ``matrix`` ((S+1) x T for the S+1 stages evaluated in
    order, S = T when complete), ``general`` (``tasks``, ``matrix``), ``metrics`` (``final/*`` of the
    summary), ``stages`` (``stage``, ``eval``, ``general``, ``empty_rate`` per evaluated stage), ``status``
    (``complete`` after ``log_final``; ``running`` while the last attempt has no exit record; ``failed`` when
    it exited without final results, with ``error``), ``run`` (``seed``) and ``wandb`` (id, project, group,
    job_type, tags, name, exit_code, attempts).
    """
    config: dict = {}
    summary: dict = {}
    per_stage: dict[int, dict[str, dict[str, float]]] = {}
    info: dict[str, Any] = {}
    exit_code: Optional[int] = None
    attempts = 0
    for rec in records:
        kind = rec.get("type")
        if kind == "header":  # a new attempt: its own config, final results and exit state
            attempts += 1
            config, exit_code = {}, None
            summary = {k: v for k, v in summary.items() if not k.startswith(FINAL_PREFIX)}
            continue
        body = rec.get(kind) if isinstance(kind, str) else None
        if not isinstance(body, dict):
            continue
        if kind == "run":
            config.update((body.get("config") or {}).get("update") or {})
            for key, out in (
                ("run_id", "id"),
                ("project", "project"),
                ("entity", "entity"),
                ("run_group", "group"),
                ("job_type", "job_type"),
                ("display_name", "name"),
            ):
                if body.get(key):
                    info[out] = body[key]
            if "tags" in body:
                info["tags"] = list(body.get("tags") or [])
        elif kind == "config":
            config.update(body.get("update") or {})
            for key in body.get("remove") or []:
                config.pop(key, None)
        elif kind == "history":
            for key, value in (body.get("item") or {}).items():
                m = STAGE_KEY_RE.match(key)
                num = _number(value)
                if m and num is not None:
                    per_stage.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = num
        elif kind == "summary":
            summary.update(body.get("update") or {})
            for key in body.get("remove") or []:
                summary.pop(key, None)
        elif kind == "exit":
            exit_code = int(body.get("exit_code", 0) or 0)
    config.pop("_wandb", None)
    stage0 = per_stage.get(0, {})
    tasks = summary.get(TASKS_KEY)
    if not isinstance(tasks, list) or not tasks:
        tasks = sorted(stage0.get("eval", {}))  # the stream order is unknown: alphabetical
    general_tasks = summary.get(GENERAL_TASKS_KEY)
    if not isinstance(general_tasks, list):
        general_tasks = sorted(stage0.get("general", {}))
    matrix: list[list[float]] = []
    general_matrix: list[list[float]] = []
    stages: list[dict] = []
    for s in range(len(per_stage)):  # consecutive stages 0, 1, ... with every task evaluated
        scores = per_stage.get(s, {})
        ev, gen = scores.get("eval", {}), scores.get("general", {})
        if not tasks or any(t not in ev for t in tasks) or any(g not in gen for g in general_tasks):
            break
        matrix.append([ev[t] for t in tasks])
        general_matrix.append([gen[g] for g in general_tasks])
        stages.append(
            {"stage": s, "eval": dict(ev), "general": dict(gen), "empty_rate": scores.get("empty_rate", {})}
        )
    # final/OP ...; the logged media's attributes (final/accuracy_heatmap.width ...) are no metrics
    metrics = {
        k[len(FINAL_PREFIX) :]: _number(v)
        for k, v in summary.items()
        if k.startswith(FINAL_PREFIX) and "." not in k and _number(v) is not None
    }
    info["exit_code"] = exit_code
    info["attempts"] = max(attempts, 1)
    out: dict[str, Any] = {
        "config": config,
        "run": {"seed": config.get("seed")},
        "tasks": list(tasks),
        "matrix": matrix,
        "general": {"tasks": list(general_tasks), "matrix": general_matrix},
        "metrics": metrics,
        "stages": stages,
        "wandb": info,
    }
    if summary.get(STATUS_KEY) == Status.COMPLETE:
        out["status"] = Status.COMPLETE.value
    elif exit_code is None:
        out["status"] = Status.RUNNING.value
    else:
        out["status"] = Status.FAILED.value
        out["error"] = f"the W&B run exited (code {exit_code}) before its final results were logged"
    return out


def read_offline_run(wandb_files: Path | Sequence[Path]) -> dict:
    """``results_from_records`` of one ``.wandb`` file, or of the files of one run's attempts (oldest
    first), plus ``_source`` (the newest file's run folder, e.g. ``<run_dir>/wandb/offline-run-<time>-<id>``)
    and ``_mtime`` (that file's modification time)."""
    files = [Path(wandb_files)] if isinstance(wandb_files, (str, Path)) else [Path(f) for f in wandb_files]
    if not files:
        raise WandbReadError("no .wandb file given")
    records: list[dict] = []
    for f in files:
        records.extend(wandb_records(f))
    out = results_from_records(records)
    newest = files[-1]
    out["wandb"]["file"] = str(newest)
    out["_source"] = str(newest.parent)
    out["_mtime"] = newest.stat().st_mtime
    return out
