"""Replay examples for the replay family (vanilla, OPR, low-score).

The budget ρ gives the number of replay examples per stage: ``round(ρ × |train set of the current task|)``
(halves round up), split evenly over the past tasks with the remainder going to the earliest ones, and
sampled with the run's seed. The *same* prompts serve vanilla replay (gold answers), OPR and low-score
replay (model answers), so these methods differ only in the responses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from opr.backbones import Backbone
from opr.diagnostics import sample_rollouts
from opr.types import Example, SFTExample, Task


def replay_count(budget: float, current_train_size: int) -> int:
    """round(ρ × N) with halves rounded up (Python's round() would send 0.5 to 0)."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return int(math.floor(budget * current_train_size + 0.5))


def split_evenly(total: int, num_past: int) -> list[int]:
    """``total`` items over ``num_past`` tasks, the remainder to the earliest: split_evenly(7, 3) == [3, 2, 2]."""
    if num_past == 0:
        return []
    base, extra = divmod(total, num_past)
    return [base + (1 if i < extra else 0) for i in range(num_past)]


def sample_replay_prompts(past: Sequence[Task], budget: float, current_train_size: int, seed: int, stage: int) -> list[Example]:
    """Budgeted past-task training examples for ``stage``, identical for every method with the same seed.

    A past task with fewer training examples than its share gives all it has.
    """
    shares = split_evenly(replay_count(budget, current_train_size), len(past))
    chosen: list[Example] = []
    for task, k in zip(past, shares):
        rng = random.Random(f"replay/{seed}/{stage}/{task.name}")
        chosen.extend(rng.sample(task.train, min(k, len(task.train))))
    return chosen


@dataclass(frozen=True)
class ScoredRollout:
    example: Example
    text: str
    reward: float  # the task's reward, 0-100
    confidence: float  # mean token log-probability under the sampling distribution


def rollout_and_score(
    backbone: Backbone,
    examples: Sequence[Example],
    tasks: dict[str, Task],
    samples_per_prompt: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    compute_dtype: str = "float32",
    max_prompt_tokens: int | None = None,
) -> list[list[ScoredRollout]]:
    """Sample ``samples_per_prompt`` responses per example from the current model and score each with its
    task's reward (the shared sampler :func:`opr.diagnostics.sample_rollouts`), ranked later by reward or
    confidence. Returns one list per example, in order."""
    groups = sample_rollouts(backbone, examples, tasks, samples_per_prompt, temperature, top_p, batch_size,
                             seed=seed, compute_dtype=compute_dtype, max_prompt_tokens=max_prompt_tokens)
    return [[ScoredRollout(r.example, r.text, r.reward, r.mean_logprob) for r in g] for g in groups]


def select_rollouts(
    rollouts: Sequence[ScoredRollout],
    order: Literal["highest", "lowest"],
    key: Literal["reward", "confidence"] = "reward",
    rule: Literal["best", "threshold"] = "best",
    threshold: float | None = None,
    max_per_prompt: int = 1,
) -> list[ScoredRollout]:
    """Keep the rollouts of one prompt by rank.

    Rollouts are ranked by ``key`` (``highest`` or ``lowest`` first; ties keep sampling order) and identical
    texts are kept once. ``rule="best"`` keeps the first ``max_per_prompt``; with ``threshold`` set, only
    rollouts whose *reward* passes it (>= for ``highest``, <= for ``lowest``) are eligible. ``rule="threshold"``
    keeps every eligible rollout (up to ``max_per_prompt``) and requires a threshold.
    """
    if rule not in ("best", "threshold"):
        raise ValueError(f"unknown keep rule {rule!r}; allowed: best, threshold")
    if rule == "threshold" and threshold is None:
        raise ValueError("keep rule 'threshold' needs a threshold")
    if order not in ("highest", "lowest"):
        raise ValueError(f"order must be 'highest' or 'lowest', got {order!r}")
    sign = -1.0 if order == "highest" else 1.0
    ranked = sorted(enumerate(rollouts), key=lambda ir: (sign * getattr(ir[1], key), ir[0]))
    kept: list[ScoredRollout] = []
    seen: set[str] = set()
    for _, r in ranked:
        if threshold is not None and (r.reward < threshold if order == "highest" else r.reward > threshold):
            continue
        if r.text in seen:
            continue
        seen.add(r.text)
        kept.append(r)
        if len(kept) >= max_per_prompt:
            break
    return kept


def as_sft(kept: Sequence[ScoredRollout], tasks: dict[str, Task]) -> list[SFTExample]:
    return [SFTExample(r.example.prompt, r.text, r.example.task, tasks[r.example.task].chat, "rollout", r.example.id)
            for r in kept]


def gold_sft(examples: Sequence[Example], tasks: dict[str, Task]) -> list[SFTExample]:
    return [SFTExample(e.prompt, e.answer, e.task, tasks[e.task].chat, "gold", e.id) for e in examples]


def reward_histogram(values: Sequence[float], bins: int = 10) -> list[int]:
    """Counts of rewards in ``bins`` equal bins over [0, 100] (100 falls in the last bin)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins // 100)))] += 1
    return counts
