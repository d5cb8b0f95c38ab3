"""Re-score predictions offline with a benchmark's task metrics.

Usage::

    python -m opr.tools.score --benchmark trace INPUT.jsonl [--out FILE]
    python -m opr.tools.score --benchmark mini_trace predictions/stage3/summary.jsonl

Each input line is a JSON object with ``task``, ``prediction`` and ``reference`` (strings), plus
``source`` where the task's metric needs one (SARI: TRACE's 20Minuten). For ``--benchmark trace`` a line
without ``source`` but with ``prompt`` uses the prompt, which is exactly TRACE's SARI source, so the
``predictions/stage*/*.jsonl`` files of a run can be re-scored as they are. Other keys are kept.

Output: the same objects with ``score`` (0-100) added (replaced if present), one per line, to stdout or
``--out`` (its folder is created when missing); the number of lines and mean score per task go to stderr.
Blank lines are skipped. A malformed line or an unknown task is an error naming the line number; nothing is
written then.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from opr import jsonl
from opr.metrics import text as M
from opr.types import Example, Reward

__all__ = ["BENCHMARKS", "ScoreInputError", "TaskScorer", "main", "score_lines", "task_means", "task_scorers"]

BENCHMARKS: tuple[str, ...] = ("trace", "mini_trace")


class ScoreInputError(ValueError):
    """An input line cannot be scored; ``line`` is its 1-based number."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class TaskScorer:
    """How to score one task: its reward, and whether the metric needs a ``source`` text."""

    reward: Reward
    needs_source: bool
    # The prompt may stand in for a missing source (TRACE's SARI source is the prompt).
    prompt_is_source: bool = False


def task_scorers(benchmark: str) -> dict[str, TaskScorer]:
    """Task name -> :class:`TaskScorer` for ``benchmark`` (one of :data:`BENCHMARKS`).

    ``trace`` uses :data:`opr.benchmarks.trace.TASK_METRICS`. ``mini_trace`` is imported lazily and uses
    its ``TASK_METRICS`` (task -> metric name); a task whose metric is not one of
    :data:`opr.metrics.text.METRICS` (e.g. a task-specific one) is scored with the module's ``REWARDS``
    entry for it, and tasks only in ``REWARDS`` (its general set) are included too.
    """
    if benchmark == "trace":
        from opr.benchmarks import trace

        return {
            task: TaskScorer(
                M.make_reward(metric), M.needs_source(metric), prompt_is_source=M.needs_source(metric)
            )
            for task, metric in trace.TASK_METRICS.items()
        }
    if benchmark == "mini_trace":
        module = importlib.import_module("opr.benchmarks.mini_trace")
        metrics: dict[str, str] = getattr(module, "TASK_METRICS", None) or {}
        rewards: dict[str, Reward] = getattr(module, "REWARDS", None) or {}
        if not metrics and not rewards:
            raise RuntimeError("opr.benchmarks.mini_trace defines neither TASK_METRICS nor REWARDS")
        out: dict[str, TaskScorer] = {}
        for task, metric in metrics.items():
            if metric in M.METRICS:
                out[task] = TaskScorer(M.make_reward(metric), M.needs_source(metric))
            elif task in rewards:
                out[task] = TaskScorer(rewards[task], False)
            else:
                raise RuntimeError(
                    f"mini_trace task {task!r} has metric {metric!r}, which is neither in opr.metrics.text.METRICS "
                    "nor given by mini_trace.REWARDS"
                )
        for task, reward in rewards.items():
            out.setdefault(task, TaskScorer(reward, False))
        return out
    raise ValueError(f"unknown benchmark {benchmark!r}; allowed: {', '.join(BENCHMARKS)}")


def _string_field(record: dict, key: str, line: int) -> str:
    if key not in record:
        raise ScoreInputError(line, f"missing key {key!r} (keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise ScoreInputError(line, f"{key!r} must be a string, got {type(value).__name__}")
    return value


def score_lines(lines: Iterable[str], benchmark: str) -> list[dict]:
    """Score JSONL ``lines`` (see the module docstring) and return the objects with ``score`` added.

    Raises :class:`ScoreInputError` naming the 1-based line number on a malformed line, an unknown task
    or a missing source.
    """
    scorers = task_scorers(benchmark)
    out: list[dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScoreInputError(number, f"not valid JSON ({err})") from err
        if not isinstance(record, dict):
            raise ScoreInputError(number, f"expected a JSON object, got {type(record).__name__}")
        task = _string_field(record, "task", number)
        if task not in scorers:
            raise ScoreInputError(number, f"unknown {benchmark} task {task!r}; allowed: {', '.join(scorers)}")
        scorer = scorers[task]
        prediction = _string_field(record, "prediction", number)
        reference = _string_field(record, "reference", number)
        source = None
        if scorer.needs_source:
            if "source" in record:
                source = _string_field(record, "source", number)
            elif scorer.prompt_is_source and "prompt" in record:
                source = _string_field(record, "prompt", number)
            else:
                hint = " (or 'prompt', TRACE's source)" if scorer.prompt_is_source else ""
                raise ScoreInputError(number, f"task {task!r} needs a 'source' string{hint}")
        prompt = record.get("prompt", "")
        example = Example(
            id=str(record.get("id", f"line{number}")),
            task=task,
            prompt=prompt if isinstance(prompt, str) else "",
            answer=reference,
            source=source,
        )
        scored = dict(record)
        scored["score"] = float(scorer.reward(prediction, example))
        out.append(scored)
    return out


def task_means(records: Sequence[dict]) -> dict[str, tuple[int, float]]:
    """Task -> (number of lines, mean score), tasks in first-seen order."""
    sums: dict[str, list[float]] = {}
    for rec in records:
        sums.setdefault(rec["task"], []).append(rec["score"])
    return {task: (len(v), sum(v) / len(v)) for task, v in sums.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m opr.tools.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="whose task metrics to use")
    parser.add_argument(
        "input", help="JSONL file of {task, prediction, reference[, source]} lines; '-' = stdin"
    )
    parser.add_argument("--out", default=None, help="write the scored JSONL here instead of stdout")
    args = parser.parse_args(argv)

    shown = "<stdin>" if args.input == "-" else args.input
    try:
        if args.input == "-":
            records = score_lines(sys.stdin, args.benchmark)
        else:
            records = score_lines(jsonl.read_text(Path(args.input)).splitlines(), args.benchmark)  # or .jsonl.gz
    except ScoreInputError as err:
        print(f"error: {shown}: {err}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, EOFError) as err:
        print(f"error: cannot read {shown}: {err}", file=sys.stderr)
        return 2

    text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    if args.out:
        out = Path(args.out)
        try:  # a new folder for the output is made, as a run makes its own
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        except OSError as err:
            print(f"error: cannot write {args.out}: {err}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)

    means = task_means(records)
    width = max([len("task"), *(len(t) for t in means)])
    print(f"{'task':<{width}}  {'n':>6}  {'mean':>8}", file=sys.stderr)
    for task, (n, mean) in means.items():
        print(f"{task:<{width}}  {n:>6}  {mean:>8.2f}", file=sys.stderr)
    if not means:
        print("(no lines to score)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
