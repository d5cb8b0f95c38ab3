"""``opr``: On-Policy Replay.

Before training on task t, roll out the latest model on prompts of tasks < t, score each rollout with its
task's reward, keep the good ones, and replay the (prompt, model response) pairs, on the model's own sampled
tokens, as ordinary SFT examples mixed into task t. No teacher, no extra loss.

Two selection rules (``selection``):

* ``budgeted_prompts`` (default): sample ``samples_per_prompt`` rollouts for each of the budgeted past prompts
  (the *same* prompts vanilla replay uses) and keep the best eligible rollout of each prompt. Cost: budget ×
  N × samples rollouts per stage.
* ``ranked_pool`` (the reference implementation's rule): roll out the *whole pool* of past training prompts
  (or a seeded sample of ``pool_size`` per past task), keep each prompt's best eligible rollout, rank these
  over the pool by reward (OPR-RU) or confidence (OPR-SC), and keep the top round(ρ·N) split over the past
  tasks as the budget is. Cost: ``|pool|`` × samples rollouts per past task per stage (the paper: one sample at
  T = 0.1), typically 5-10× the budgeted rule; the kept prompts are the ones the model answers best, not the
  budgeted sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from opr.methods.base import SFT_TRAINING, StageContext, StageData, current_task_sft, train_sft
from opr.replay import (
    SELECTIONS,
    as_sft,
    differs_from_gold,
    pool_prompts,
    replay_count,
    reward_histogram,
    sample_replay_prompts,
    split_evenly,
)
from opr.rollout import UNFINISHED, Rollout, rank_pool, sample_rollouts, select_rollouts


@dataclass
class OnPolicyReplay:
    """Options:

    - selection: ``budgeted_prompts`` or ``ranked_pool`` (module docstring); ``pool_size`` caps the pool per past
      task for ``ranked_pool`` (``null``: every training prompt).
    - samples_per_prompt, temperature, top_p: how rollouts are sampled.
    - keep: ``best`` (the top ``max_per_prompt`` rollouts of each prompt) or ``threshold`` (every rollout whose
      reward reaches ``min_reward``, up to ``max_per_prompt``).
    - min_reward: rollouts below it are never kept (0-100; ``null`` keeps the best whatever its reward).
    - accept: also require the task's stricter acceptance check (``Task.accept``: the right verdict, count or
      number; a simplification that changes the sentence), where the task has one.
    - unfinished: a rollout cut at the token limit is dropped (``drop``) or trained without EOS (``no_eos``).
    - score: ``reward`` ranks by the task reward; ``confidence`` ranks by the mean token log-probability of the
      rollout (no reward used for ranking or filtering: ``min_reward`` and ``accept`` are ignored).
    """

    name: str = "opr"
    selection: str = "budgeted_prompts"
    pool_size: Optional[int] = None
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 0.95
    keep: str = "best"
    min_reward: Optional[float] = 50.0
    max_per_prompt: int = 1
    accept: bool = True
    unfinished: str = "drop"
    score: str = "reward"
    # Which end of the ranking is kept; ``lowscore_replay`` is this method with "lowest".
    order: str = "highest"

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"method.selection must be one of {list(SELECTIONS)}, got {self.selection!r}")
        if self.pool_size is not None and self.pool_size < 1:
            raise ValueError(f"method.pool_size must be >= 1 or null, got {self.pool_size}")
        if self.score not in ("reward", "confidence"):
            raise ValueError(f"method.score must be 'reward' or 'confidence', got {self.score!r}")
        if self.keep not in ("best", "threshold"):
            raise ValueError(f"method.keep must be 'best' or 'threshold', got {self.keep!r}")
        if self.order not in ("highest", "lowest"):
            raise ValueError(f"method.order must be 'highest' or 'lowest', got {self.order!r}")
        if self.unfinished not in UNFINISHED:
            raise ValueError(f"method.unfinished must be one of {list(UNFINISHED)}, got {self.unfinished!r}")

    @classmethod
    def uses_budget(cls, options: Mapping) -> bool:
        return True  # the budget sets how many rollouts are replayed (both selections)

    def _select(self, group: list[Rollout], use_reward: bool) -> list[Rollout]:
        threshold = self.min_reward if use_reward else None
        return select_rollouts(group, self.order, self.score, self.keep, threshold, self.max_per_prompt,
                               use_accept=self.accept and use_reward, unfinished=self.unfinished)

    def stage_data(self, ctx: StageContext) -> StageData:
        tasks = ctx.tasks_by_name
        use_reward = self.score == "reward"
        if self.selection == "budgeted_prompts":
            chosen = sample_replay_prompts(ctx.past, ctx.budget, len(ctx.task.train), ctx.seed, ctx.stage)
        else:
            chosen = [e for t in ctx.past for e in pool_prompts(t, self.pool_size, ctx.seed, ctx.stage)]
        counts: list[int] = []  # every rank samples its share of the prompts and gets all rollouts
        rollouts = sample_rollouts(
            ctx.backbone, chosen, tasks, self.samples_per_prompt, self.temperature, self.top_p,
            ctx.rollout_batch_size, seed=ctx.seed * 1000 + ctx.stage, compute_dtype=ctx.compute_dtype,
            max_prompt_tokens=ctx.max_prompt_tokens, ranks=ctx.trainer, share_counts=counts,
        )
        ctx.prompts_per_rank["rollouts"] = counts
        per_prompt = [self._select(group, use_reward) for group in rollouts]
        if self.selection == "budgeted_prompts":
            kept = [r for sel in per_prompt for r in sel]
        else:
            shares = split_evenly(replay_count(ctx.budget, len(ctx.task.train)), len(ctx.past))
            kept = []
            for t, k in zip(ctx.past, shares):
                candidates = [r for sel in per_prompt for r in sel if r.example.task == t.name]
                kept.extend(rank_pool(candidates, k, self.order, self.score))
        return StageData(current_task_sft(ctx.task) + as_sft(kept, tasks), self._stats(ctx, chosen, rollouts, kept))

    def _stats(self, ctx: StageContext, chosen: list, rollouts: list[list[Rollout]], kept: list[Rollout]) -> dict:
        every = [r for group in rollouts for r in group]
        rewards = [r.reward for r in every]
        success = 50.0 if self.min_reward is None else self.min_reward
        per_task = {}
        for t in ctx.past:
            mine = [r for r in every if r.example.task == t.name]
            kept_t = [r for r in kept if r.example.task == t.name]
            judged = [r for r in mine if r.accepted is not None]
            per_task[t.name] = {
                "prompts": sum(1 for e in chosen if e.task == t.name),
                "rollouts": len(mine),
                "kept": len(kept_t),
                "mean_reward": sum(r.reward for r in mine) / len(mine) if mine else None,
                "unfinished": sum(not r.finished for r in mine),
                # rollouts that reach min_reward but fail the stricter acceptance check (None: the task has none)
                "reward_pass_accept_fail": (sum(r.reward >= success and r.accepted is False for r in mine)
                                            if judged else None),
                "accept_rate": sum(bool(r.accepted) for r in judged) / len(judged) if judged else None,
                # the fraction of kept replays that are not their prompt's gold answer (whitespace normalised)
                "differs_from_gold": sum(differs_from_gold(r) for r in kept_t) / len(kept_t) if kept_t else None,
            }
        return {"replay": {
            "selection": self.selection,
            "requested": len(chosen),
            "rollouts": len(rewards),
            "kept": len(kept),
            "unfinished": sum(not r.finished for r in every),
            "kept_unfinished": sum(not r.finished for r in kept),
            "mean_reward": sum(rewards) / len(rewards) if rewards else None,
            "kept_mean_reward": sum(r.reward for r in kept) / len(kept) if kept else None,
            # a rollout "succeeds" at min_reward, or at 50 (half marks) where no minimum is set (lowscore_replay)
            "prompts_with_success": sum(any(r.reward >= success for r in g) for g in rollouts),
            "differs_from_gold": sum(differs_from_gold(r) for r in kept) / len(kept) if kept else None,
            "reward_histogram": reward_histogram(rewards),
            "per_task": per_task,
        }}

    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        return train_sft(ctx, data)

    def train_identity(self, ctx: StageContext) -> dict:
        return SFT_TRAINING
