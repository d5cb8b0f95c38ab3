"""``opr``: On-Policy Replay.

Before training on task t, roll out the latest model on the budgeted prompts of tasks < t (the same prompts
vanilla replay would use), score each rollout with its task's reward, keep the good ones, and replay the
(prompt, model response) pairs as ordinary SFT examples mixed into task t. No teacher, no extra loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from opr.methods.base import StageContext, StageData, current_task_sft, train_sft
from opr.replay import as_sft, reward_histogram, rollout_and_score, sample_replay_prompts, select_rollouts


@dataclass
class OnPolicyReplay:
    """Options:

    samples_per_prompt, temperature, top_p: how rollouts are sampled.
    keep: ``best`` (the top ``max_per_prompt`` rollouts of each prompt) or ``threshold`` (every rollout whose
      reward reaches ``min_reward``, up to ``max_per_prompt``).
    min_reward: rollouts below it are never kept (0-100; ``null`` keeps the best whatever its reward).
    score: ``reward`` ranks by the task reward; ``confidence`` ranks by the mean token log-probability of the
      rollout (no reward used for ranking or filtering: ``min_reward`` is ignored).
    """

    name: str = "opr"
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 0.95
    keep: str = "best"
    min_reward: Optional[float] = 50.0
    max_per_prompt: int = 1
    score: str = "reward"
    # Which end of the ranking is kept; ``lowscore_replay`` is this method with "lowest".
    order: str = "highest"

    def __post_init__(self) -> None:
        if self.score not in ("reward", "confidence"):
            raise ValueError(f"method.score must be 'reward' or 'confidence', got {self.score!r}")
        if self.keep not in ("best", "threshold"):
            raise ValueError(f"method.keep must be 'best' or 'threshold', got {self.keep!r}")
        if self.order not in ("highest", "lowest"):
            raise ValueError(f"method.order must be 'highest' or 'lowest', got {self.order!r}")

    def stage_data(self, ctx: StageContext) -> StageData:
        chosen = sample_replay_prompts(ctx.past, ctx.budget, len(ctx.task.train), ctx.seed, ctx.stage)
        tasks = ctx.tasks_by_name
        rollouts = rollout_and_score(
            ctx.backbone, chosen, tasks, self.samples_per_prompt, self.temperature, self.top_p,
            ctx.rollout_batch_size, seed=ctx.seed * 1000 + ctx.stage, compute_dtype=ctx.compute_dtype,
            max_prompt_tokens=ctx.max_prompt_tokens,
        )
        threshold = None if self.score == "confidence" else self.min_reward
        kept = [
            r for group in rollouts
            for r in select_rollouts(group, self.order, self.score, self.keep, threshold, self.max_per_prompt)
        ]
        rewards = [r.reward for group in rollouts for r in group]
        per_task = {}
        for t in ctx.past:
            mine = [r.reward for group in rollouts for r in group if r.example.task == t.name]
            per_task[t.name] = {
                "prompts": sum(1 for e in chosen if e.task == t.name),
                "kept": sum(1 for r in kept if r.example.task == t.name),
                "mean_reward": sum(mine) / len(mine) if mine else None,
            }
        stats = {"replay": {
            "requested": len(chosen),
            "rollouts": len(rewards),
            "kept": len(kept),
            "mean_reward": sum(rewards) / len(rewards) if rewards else None,
            "kept_mean_reward": sum(r.reward for r in kept) / len(kept) if kept else None,
            # a rollout "succeeds" at min_reward, or at 50 (half marks) where no minimum is set (lowscore_replay)
            "prompts_with_success": sum(any(r.reward >= (50.0 if self.min_reward is None else self.min_reward)
                                            for r in g) for g in rollouts),
            "reward_histogram": reward_histogram(rewards),
            "per_task": per_task,
        }}
        return StageData(current_task_sft(ctx.task) + as_sft(kept, tasks), stats)

    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        return train_sft(ctx, data)
