"""What one run gives the report: its record, seed, metrics, the measures beside OP / BWT, and the standard
error of OP from its prediction files (the module docstring of ``opr.tools.report`` defines them)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from opr import jsonl
from opr.metrics.continual import continual_metrics, learning_accuracy
from opr.metrics.ngrams import amplified_ngrams
from opr.results import RunResults

TABLE_METRICS: tuple[str, ...] = ("OP", "BWT", "FWT")


EVAL_SE = "eval_SE_OP"  # the stats / CSV name of OP's evaluation standard error


# One number per run for what a method does beside its scores (the contrast of "Denser != Better": how far it
# specialises, how it forgets, how far it drifts, which artifacts it spreads), paired by seed like OP and BWT
# (:func:`run_measures`). Shown when some run has them.
MEASURES: tuple[str, ...] = ("LA", "inside_mean", "MaxDrop", "general_drift", "param_drift", "kl_base",
                             "base_logprob", "format_errors", "general_opening")


MEASURE_NOTES: dict[str, str] = {
    "LA": "learning accuracy: mean score of each task right after its own stage",
    "inside_mean": "mean score of each stage's own task at its in-stage evaluations after step 0 (stage end "
                   "included), averaged over stages: higher = learnt sooner or further (`eval.every_steps`)",
    "MaxDrop": "mean deepest fall of a task after its own stage",
    "general_drift": "general-set score after the last stage minus before training",
    "param_drift": "relative Frobenius distance of all weights to the base model after the last stage, in %",
    "kl_base": "KL(model || base) per token on the model's greedy answers to the probe prompts, last stage (nats)",
    "base_logprob": "the base model's log-probability per token of those answers, last stage (nats)",
    "format_errors": "answers that break their task's format after the last stage, mean over tasks, in %",
    "general_opening": "largest rise (points) in the share of general-set answers that open with the same three "
                       "words, before training -> last stage",
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_of(run: dict) -> RunResults:
    """The run record of one of the report's runs (a ``results.json`` dict plus the report's own ``_source``,
    ``_mtime``, ``_composed_config``, which land in ``extra``); a key the run lacks reads ``None``."""
    return RunResults.from_json(run)


def seed_of(run: dict) -> int | None:
    record = record_of(run)
    cfg = record.config or {}
    seed = cfg.get("seed", (record.run or {}).get("seed"))
    return int(seed) if isinstance(seed, (int, float)) else None


def _matrix_problem(run: dict) -> str | None:
    record = record_of(run)
    tasks, matrix = record.tasks, record.matrix
    if not isinstance(tasks, list) or not tasks:
        return "no task list"
    if not isinstance(matrix, list):
        return "no accuracy matrix"
    T = len(tasks)
    if len(matrix) != T + 1 or any(not isinstance(r, list) or len(r) != T for r in matrix):
        return f"accuracy matrix is not {T + 1} x {T}"
    return None


def _nonfinite_problem(run: dict) -> str | None:
    """What is not a finite number in a complete run's ``metrics`` or accuracy matrix (NaN / inf: the run
    diverged without saying so), or None. Such a run is left out of the statistics and listed."""
    record = record_of(run)
    bad = [f"{k}={v}" for k, v in (record.metrics or {}).items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        return f"non-finite metric(s) {', '.join(bad)}"
    cells = [v for row in record.matrix or [] for v in row]
    if any(isinstance(v, float) and not math.isfinite(v) for v in cells):
        return "non-finite value(s) in the accuracy matrix"
    return None


def run_metrics(run: dict) -> dict[str, float | None]:
    """The run's ``metrics``, completed from its accuracy matrix for OP/BWT/FWT... when absent."""
    record = record_of(run)
    metrics = dict(record.metrics or {})
    if any(m not in metrics for m in TABLE_METRICS) and _matrix_problem(run) is None:
        for key, value in continual_metrics(record.matrix).items():
            metrics.setdefault(key, value)
    for key, value in run_measures(run).items():
        metrics.setdefault(key, value)
    return metrics


def read_prediction_scores(path: Path) -> list[float] | None:
    """The ``score`` of every line of a predictions file (``predictions/stage{t}/{task}.jsonl``), or ``None``
    when the file is missing, unreadable, or has a line without a numeric score."""
    try:
        lines = jsonl.read_text(path).splitlines()  # x.jsonl or x.jsonl.gz
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    scores = []
    for line in lines:
        if not line.strip():
            continue
        try:
            score = json.loads(line).get("score")
        except (ValueError, AttributeError):
            return None
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            return None
        scores.append(float(score))
    return scores


def op_eval_standard_error(task_scores: Sequence[Sequence[float]]) -> float | None:
    """OP's standard error from evaluating a finite set of examples, given the final stage's per-example scores
    of each of the T tasks: SE_j = sample std (ddof=1) of task j's scores / sqrt(n_j); OP's SE =
    sqrt(sum_j SE_j^2) / T (OP is the mean of the T task scores). ``None`` when a task has fewer than 2 scores."""
    if not task_scores or any(len(scores) < 2 for scores in task_scores):
        return None
    variance_sum = sum(statistics.variance(scores) / len(scores) for scores in task_scores)
    return math.sqrt(variance_sum) / len(task_scores)


def run_eval_standard_error(run: dict) -> float | None:
    """:func:`op_eval_standard_error` of a run from ``<_source>/predictions/stage{T}/{task}.jsonl`` (T = number
    of tasks); ``None`` when a task's file is missing or unreadable."""
    tasks, source = record_of(run).tasks, run.get("_source")
    if not isinstance(tasks, list) or not tasks or not source:
        return None
    folder = Path(source) / "predictions" / f"stage{len(tasks)}"
    per_task = []
    for task in tasks:
        scores = read_prediction_scores(folder / f"{task}.jsonl")
        if scores is None:
            return None
        per_task.append(scores)
    return op_eval_standard_error(per_task)


def own_task_curve(record: RunResults, stage: int) -> list[tuple[int, float]]:
    """(step inside the stage, score of the stage's own task) of stage ``stage``'s curve (``eval.every_steps``),
    the stage-end point placed at the stage's last step (its global step minus the stage's start), and step 0
    from the matrix's previous row (the task's score when the stage began) when the curve has no point there;
    [] when the stage has no curve or its curve does not score its task."""
    entry = next((e for e in record.stages or [] if e.stage == stage), None)
    if entry is None or not entry.curve:
        return []
    numeric = [p for p in entry.curve if isinstance(p.get("stage_step"), int)]
    start = numeric[0]["step"] - numeric[0]["stage_step"] if numeric else None
    points = []
    for p in entry.curve:
        score = (p.get("scores") or {}).get(entry.task)
        if score is None:
            continue
        if isinstance(p.get("stage_step"), int):
            points.append((p["stage_step"], float(score)))
        elif start is not None and isinstance(p.get("step"), int):  # the stage-end point
            x = p["step"] - start
            points = [q for q in points if q[0] != x] + [(x, float(score))]
    tasks, matrix = record.tasks or [], record.matrix or []
    if points and all(x != 0 for x, _ in points) and entry.task in tasks and len(matrix) >= stage:
        points.append((0, float(matrix[stage - 1][tasks.index(entry.task)])))
    return sorted(points)


def inside_mean(record: RunResults) -> float | None:
    """:data:`MEASURE_NOTES` ``inside_mean``: per stage with an own-task curve (:func:`own_task_curve`), the mean
    score over its points after step 0; then the mean over those stages. ``None`` without curves."""
    per_stage = []
    for entry in record.stages or []:
        if entry.stage:
            later = [score for step, score in own_task_curve(record, entry.stage) if step > 0]
            if later:
                per_stage.append(statistics.fmean(later))
    return statistics.fmean(per_stage) if per_stage else None


def last_stage_measures(record: RunResults) -> dict[str, float]:
    """``param_drift``, ``kl_base``, ``base_logprob`` and ``format_errors`` (:data:`MEASURE_NOTES`) from the last
    stage's record, each only when the run recorded it (``analysis.drift``, ``analysis.diagnostics``)."""
    last = max((e for e in record.stages or [] if e.stage), key=lambda e: e.stage, default=None)
    if last is None:
        return {}
    out: dict[str, float] = {}
    if _is_number((last.drift or {}).get("param/rel_fro/all")):
        out["param_drift"] = 100.0 * last.drift["param/rel_fro/all"]
    diagnostics = last.diagnostics or {}
    for key in ("kl_base", "base_logprob"):
        value = (diagnostics.get(key) or {}).get("mean")
        if _is_number(value):
            out[key] = float(value)
    rates = [v for v in (last.format_error_rate or {}).values() if _is_number(v)]
    if rates:
        out["format_errors"] = 100.0 * statistics.fmean(rates)
    return out


def general_opening_rise(run_dir: Path, stage: int, n: int = 3) -> float | None:
    """:data:`MEASURE_NOTES` ``general_opening``, from ``predictions/stage{0,stage}/general.jsonl`` (the answers
    to the same prompts, matched by id); 0 when no opening rose, ``None`` without both files."""
    from opr.tools.ngrams import read_answers

    folder = Path(run_dir) / "predictions"
    try:
        before = read_answers(folder / "stage0" / "general.jsonl")
        after = read_answers(folder / f"stage{stage}" / "general.jsonl")
    except (OSError, ValueError):
        return None
    ids = [i for i in after if i in before]
    if not ids:
        return None
    top = amplified_ngrams([before[i] for i in ids], [after[i] for i in ids], n=n, top=1, opening=True,
                           min_after=0.0)
    return 100.0 * top[0].rise if top else 0.0


def run_measures(run: dict) -> dict[str, float]:
    """The run's :data:`MEASURES` that it has data for (MaxDrop and general_drift come with its metrics)."""
    record = record_of(run)
    out: dict[str, float] = {}
    if _matrix_problem(run) is None and record.matrix:
        out["LA"] = learning_accuracy(record.matrix)
    value = inside_mean(record)
    if value is not None:
        out["inside_mean"] = value
    out.update(last_stage_measures(record))
    if run.get("_source") and isinstance(record.tasks, list) and record.tasks:
        rise = general_opening_rise(Path(run["_source"]), len(record.tasks))
        if rise is not None:
            out["general_opening"] = rise
    return out
