"""Replay examples for the replay family (vanilla, OPR, low-score).

The budget ρ gives the number of replay examples per stage: ``round(ρ × |train set of the current task|)``
(halves round up), split evenly over the past tasks with the remainder going to the earliest ones, and
sampled with the run's seed. The *same* prompts serve vanilla replay (gold answers), OPR and low-score
replay (model answers), so these methods differ only in the responses. Which rollouts are kept is
``opr.rollout``'s (``select_rollouts``, ``rank_pool``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from opr.rollout import Rollout
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


SELECTIONS = ("budgeted_prompts", "ranked_pool")
def pool_prompts(task: Task, pool_size: int | None, seed: int, stage: int) -> list[Example]:
    """The past task's training prompts that ``selection=ranked_pool`` rolls out: all of them, or a seeded
    sample of ``pool_size`` (the same for every method with the same seed)."""
    if pool_size is None or pool_size >= len(task.train):
        return list(task.train)
    if pool_size < 1:
        raise ValueError(f"method.pool_size must be >= 1 or null, got {pool_size}")
    return random.Random(f"pool/{seed}/{stage}/{task.name}").sample(task.train, pool_size)


def normalise_ws(text: str) -> str:
    return " ".join(text.split())


def differs_from_gold(r: Rollout) -> bool:
    """Whether a replayed response is not the gold answer of its prompt (after whitespace normalisation)."""
    return normalise_ws(r.text) != normalise_ws(r.example.answer)


def as_sft(kept: Sequence[Rollout], tasks: dict[str, Task]) -> list[SFTExample]:
    """Kept rollouts as SFT examples trained on their own sampled tokens (``response_ids``), with EOS only
    when the rollout finished."""
    return [SFTExample(r.example.prompt, r.text, r.example.task, tasks[r.example.task].chat, "rollout",
                       r.example.id, response_ids=tuple(r.token_ids) if r.token_ids else None,
                       finished=r.finished)
            for r in kept]


def gold_sft(examples: Sequence[Example], tasks: dict[str, Task]) -> list[SFTExample]:
    return [SFTExample(e.prompt, e.answer, e.task, tasks[e.task].chat, "gold", e.id) for e in examples]


def reward_histogram(values: Sequence[float], bins: int = 10) -> list[int]:
    """Counts of rewards in ``bins`` equal bins over [0, 100] (100 falls in the last bin)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins // 100)))] += 1
    return counts
