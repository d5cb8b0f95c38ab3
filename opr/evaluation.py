"""Evaluation: greedy answers for every example of every task, scored by the task's own reward.

Scores are keyed by example id (never by position), written one line per example to
``predictions/stage{t}/{task}.jsonl``, and summarised per task: mean score (0-100), the rate of empty
outputs, and the rate of outputs that break the task's answer format.

Prompts longer than ``eval.max_prompt_length`` tokens (when null: the model's context minus the task's
``max_new_tokens``) are cut on the left, where the instruction is and not the answer cue; how many were cut is
counted (``TaskScore.prompts_cut``) and logged as a warning.

A row's tasks are generated in one length-sorted pass over all their prompts (each prompt with its own task's
token limit), so no task leaves a part-filled batch; prompts are formatted and tokenised once per run
(:class:`EvalPrompts`) and reused at every row.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opr.backbones import Backbone, keep_last
from opr.distributed import Ranks
from opr.generation import SamplingConfig, encode_prompts, generate_encoded
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


@dataclass(frozen=True)
class EvalPrompts:
    """One task list's evaluation prompts, chat-formatted, tokenised and cut once (every row of the matrix
    evaluates the same prompts): ``examples[k]`` and ``encoded[k]`` are task k's, ``cut[k]`` counts its
    prompts cut on the left."""

    tasks: tuple[Task, ...]
    examples: tuple[tuple, ...]
    encoded: tuple[tuple[list[int], ...], ...]
    cut: tuple[int, ...]
    max_examples: Optional[int]
    max_prompt_length: Optional[int]

    def matches(self, tasks: Sequence[Task], settings: EvalSettings) -> bool:
        """True when these prompts are the ones ``tasks`` under ``settings`` would encode to."""
        return (len(tasks) == len(self.tasks) and all(a is b for a, b in zip(tasks, self.tasks))
                and (settings.max_examples, settings.max_prompt_length) == (self.max_examples, self.max_prompt_length))


def encode_eval_prompts(backbone: Backbone, tasks: Sequence[Task], settings: EvalSettings) -> EvalPrompts:
    """Format, tokenise and cut every task's evaluation prompts (each task's prompt limit: :func:`prompt_limit`);
    prompts longer than the limit are counted and logged once here."""
    examples, encoded, cut = [], [], []
    for task in tasks:
        rows = task.eval[: settings.max_examples] if settings.max_examples else task.eval
        if not rows:
            raise ValueError(f"task {task.name!r} has no evaluation examples")
        full = encode_prompts(backbone, [backbone.format_prompt(e.prompt, task.chat) for e in rows])
        limit = prompt_limit(backbone, task, settings.max_prompt_length)
        n_cut = 0 if limit is None else sum(len(ids) > limit for ids in full)
        if n_cut:
            log.warning("eval %s: %d of %d prompts are longer than %d tokens and were cut on the left (longest: "
                        "%d tokens)", task.name, n_cut, len(full), limit, max(len(ids) for ids in full))
            full = [keep_last(backbone.tokenizer, ids, limit) for ids in full]
        examples.append(tuple(rows))
        encoded.append(tuple(full))
        cut.append(n_cut)
    return EvalPrompts(tuple(tasks), tuple(examples), tuple(encoded), tuple(cut), settings.max_examples,
                       settings.max_prompt_length)


def generate_answers(backbone: Backbone, tasks: Sequence[Task], settings: EvalSettings, seed: int = 0,
                     prompts: Optional[EvalPrompts] = None, ranks: Optional[Ranks] = None,
                     share_counts: Optional[list[int]] = None) -> tuple[EvalPrompts, list[list[str]]]:
    """Every task's answers in one length-sorted generation pass over all their prompts, each prompt with its
    own task's token limit: (the prompts, per task the answer texts in example order). ``prompts`` (from
    :func:`encode_eval_prompts`) skips the formatting and tokenising when it matches ``tasks`` and
    ``settings``. A prompt is seeded by its index in its own task (as when each task was generated alone), so
    sampled evaluation (``eval.temperature > 0``) does not depend on which tasks share the pass. ``ranks``
    (every rank together) shares the pass's batches across the ranks with the single-process answers;
    ``share_counts`` receives the prompts per rank (:func:`opr.generation.generate_encoded`)."""
    if prompts is None or not prompts.matches(tasks, settings):
        prompts = encode_eval_prompts(backbone, tasks, settings)
    if not tasks:
        return prompts, []
    flat = [ids for encoded in prompts.encoded for ids in encoded]
    limits = [t.max_new_tokens for t, encoded in zip(tasks, prompts.encoded) for _ in encoded]
    indices = [i for encoded in prompts.encoded for i in range(len(encoded))]
    sampling = SamplingConfig(max_new_tokens=max(limits), temperature=settings.temperature,
                              batch_size=settings.batch_size)
    gens = generate_encoded(backbone, flat, sampling, seed=seed, compute_dtype=settings.compute_dtype,
                            desc="eval " + ", ".join(t.name for t in tasks), prompt_indices=indices,
                            max_new_tokens=limits, ranks=ranks, share_counts=share_counts)
    answers, start = [], 0
    for encoded in prompts.encoded:
        answers.append([g[0].text for g in gens[start : start + len(encoded)]])
        start += len(encoded)
    return prompts, answers


def evaluate_all(
    backbone: Backbone, tasks: Sequence[Task], settings: EvalSettings, out_dir: Optional[Path], seed: int = 0,
    prompts: Optional[EvalPrompts] = None, ranks: Optional[Ranks] = None, share_counts: Optional[list[int]] = None,
) -> list[TaskScore]:
    """Score every task's answers (:func:`generate_answers`: one generation pass over all the tasks' prompts,
    shared across ``ranks`` when given) and write them to ``out_dir/{task}.jsonl`` when ``out_dir`` is given."""
    prompts, answers = generate_answers(backbone, tasks, settings, seed=seed, prompts=prompts, ranks=ranks,
                                        share_counts=share_counts)
    return [
        score_task(task, examples, texts, cut, out_dir / f"{task.name}.jsonl" if out_dir is not None else None)
        for task, examples, texts, cut in zip(tasks, prompts.examples, answers, prompts.cut)
    ]


def evaluate_task(
    backbone: Backbone, task: Task, settings: EvalSettings, out_file: Optional[Path] = None, seed: int = 0
) -> TaskScore:
    """One task's evaluation, its predictions written to ``out_file`` when given."""
    prompts, answers = generate_answers(backbone, [task], settings, seed=seed)
    return score_task(task, prompts.examples[0], answers[0], prompts.cut[0], out_file)


def score_task(task: Task, examples: Sequence, predictions: Sequence[str], prompts_cut: int,
               out_file: Optional[Path] = None) -> TaskScore:
    """Score one task's predictions (one per example, in order) with its reward and format check; write one
    JSON line per example to ``out_file`` when given (written aside and renamed: a full disk leaves no
    truncated predictions file)."""
    rows = [{"id": ex.id, "task": task.name, "prompt": ex.prompt, "reference": ex.answer, "prediction": pred,
             "score": float(task.reward(pred, ex))} for ex, pred in zip(examples, predictions)]
    if out_file is not None:
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
        prompts_cut=prompts_cut,
    )
