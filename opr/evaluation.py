"""Evaluation: greedy answers for every example of every task, scored by the task's own reward.

Scores are keyed by example id (never by position), written one line per example to
``predictions/stage{t}/{task}.jsonl``, and summarised per task: mean score (0-100), the rate of empty
outputs, and the rate of outputs that break the task's answer format.

Prompts longer than ``eval.max_prompt_length`` tokens (when null: the model's context minus the task's
``max_new_tokens``) are cut on the left, where the instruction is and not the answer cue; how many were cut is
counted (``TaskScore.prompts_cut``) and logged as a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opr.backbones import Backbone
from opr.generation import SamplingConfig, generate
from opr.types import Task

log = logging.getLogger("opr")


@dataclass
class TaskScore:
    task: str
    score: float  # mean over examples, 0-100
    n: int
    empty_rate: float
    format_error_rate: Optional[float]
    prompts_cut: int = 0  # prompts longer than the prompt limit, cut on the left


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 32
    temperature: float = 0.0
    max_examples: Optional[int] = None  # cap per task (first N), for quick runs
    compute_dtype: str = "float32"
    max_prompt_length: Optional[int] = None  # tokens; longer prompts are cut on the left

    @classmethod
    def from_config(cls, eval_node, compute_dtype: str) -> EvalSettings:
        """The settings of the config's ``eval`` group (a mapping), with the engine's compute dtype."""
        return cls(batch_size=eval_node["batch_size"], temperature=eval_node["temperature"],
                   max_examples=eval_node["max_examples"], max_prompt_length=eval_node["max_prompt_length"],
                   compute_dtype=compute_dtype)


def context_length(backbone: Backbone) -> Optional[int]:
    """The model's context in tokens (``max_position_embeddings``), or None when its config does not say."""
    value = getattr(getattr(backbone.model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def prompt_limit(backbone: Backbone, task: Task, max_prompt_length: Optional[int]) -> Optional[int]:
    """Prompt tokens kept for ``task``: ``max_prompt_length`` when set, else the model's context minus the
    task's ``max_new_tokens`` (a longer prompt would not fit with its answer: a 40,000-character TRACE prompt
    would try to allocate gigabytes), or None when the context is unknown."""
    if max_prompt_length is not None:
        return max_prompt_length
    context = context_length(backbone)
    if context is None:
        return None
    if context <= task.max_new_tokens:
        raise ValueError(f"task {task.name!r}: max_new_tokens={task.max_new_tokens} leaves no room for a prompt in "
                         f"the model's context of {context} tokens")
    return context - task.max_new_tokens


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
    limit = prompt_limit(backbone, task, settings.max_prompt_length)
    cut = 0
    if limit is not None:  # tokenized as generate() does, to count what it cuts
        lengths = [len(ids) for ids in backbone.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        cut = sum(n > limit for n in lengths)
        if cut:
            log.warning("eval %s: %d of %d prompts are longer than %d tokens and were cut on the left (longest: "
                        "%d tokens)", task.name, cut, len(prompts), limit, max(lengths))
    gens = generate(backbone, prompts, sampling, seed=seed, compute_dtype=settings.compute_dtype,
                    desc=f"eval {task.name}", max_prompt_tokens=limit)
    rows = []
    for ex, g in zip(examples, gens):
        pred = g[0].text
        rows.append({"id": ex.id, "task": task.name, "prompt": ex.prompt, "reference": ex.answer,
                     "prediction": pred, "score": float(task.reward(pred, ex))})
    if out_file is not None:  # written aside and renamed: a full disk leaves no truncated predictions file
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_file.with_name(out_file.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(tmp, out_file)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, f"could not write the predictions {out_file}: {err.strerror or err}") from err
    fmt = None
    if task.format_ok is not None:
        fmt = sum(not task.format_ok(r["prediction"]) for r in rows) / len(rows)
    return TaskScore(
        task=task.name,
        score=sum(r["score"] for r in rows) / len(rows),
        n=len(rows),
        empty_rate=sum(r["prediction"].strip() == "" for r in rows) / len(rows),
        format_error_rate=fmt,
        prompts_cut=cut,
    )


def evaluate_all(
    backbone: Backbone, tasks: Sequence[Task], settings: EvalSettings, out_dir: Optional[Path], seed: int = 0
) -> list[TaskScore]:
    return [
        evaluate_task(backbone, t, settings, out_dir / f"{t.name}.jsonl" if out_dir else None, seed=seed)
        for t in tasks
    ]
