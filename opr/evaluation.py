"""Evaluation: greedy answers for every example of every task, scored by the task's own reward.

Scores are keyed by example id (never by position), written one line per example to
``predictions/stage{t}/{task}.jsonl``, and summarised per task: mean score (0-100), the rate of empty
outputs, and the rate of outputs that break the task's answer format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opr.backbones import Backbone
from opr.generation import SamplingConfig, generate
from opr.types import Task


@dataclass
class TaskScore:
    task: str
    score: float  # mean over examples, 0-100
    n: int
    empty_rate: float
    format_error_rate: Optional[float]


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 32
    temperature: float = 0.0
    max_examples: Optional[int] = None  # cap per task (first N), for quick runs
    compute_dtype: str = "float32"
    max_prompt_length: Optional[int] = None  # tokens; longer prompts are cut on the left


def evaluate_task(
    backbone: Backbone, task: Task, settings: EvalSettings, out_file: Optional[Path] = None, seed: int = 0
) -> TaskScore:
    examples = task.eval[: settings.max_examples] if settings.max_examples else task.eval
    if not examples:
        raise ValueError(f"task {task.name!r} has no evaluation examples")
    prompts = [backbone.format_prompt(e.prompt, task.chat) for e in examples]
    sampling = SamplingConfig(
        max_new_tokens=task.max_new_tokens, temperature=settings.temperature, batch_size=settings.batch_size
    )
    gens = generate(backbone, prompts, sampling, seed=seed, compute_dtype=settings.compute_dtype,
                    desc=f"eval {task.name}", max_prompt_tokens=settings.max_prompt_length)
    rows = []
    for ex, g in zip(examples, gens):
        pred = g[0].text
        rows.append({"id": ex.id, "task": task.name, "prompt": ex.prompt, "reference": ex.answer,
                     "prediction": pred, "score": float(task.reward(pred, ex))})
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(out_file, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    fmt = None
    if task.format_ok is not None:
        fmt = sum(not task.format_ok(r["prediction"]) for r in rows) / len(rows)
    return TaskScore(
        task=task.name,
        score=sum(r["score"] for r in rows) / len(rows),
        n=len(rows),
        empty_rate=sum(r["prediction"].strip() == "" for r in rows) / len(rows),
        format_error_rate=fmt,
    )


def evaluate_all(
    backbone: Backbone, tasks: Sequence[Task], settings: EvalSettings, out_dir: Optional[Path], seed: int = 0
) -> list[TaskScore]:
    return [
        evaluate_task(backbone, t, settings, out_dir / f"{t.name}.jsonl" if out_dir else None, seed=seed)
        for t in tasks
    ]
