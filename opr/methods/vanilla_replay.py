"""``vanilla_replay``: mix budgeted gold (prompt, answer) pairs of past tasks into the current task."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opr.methods.base import SFT_TRAINING, StageContext, StageData, current_task_sft, train_sft
from opr.replay import gold_sft, sample_replay_prompts


@dataclass
class VanillaReplay:
    name: str = "vanilla_replay"

    @classmethod
    def uses_budget(cls, options: Mapping) -> bool:
        return True  # the budget sets how many gold examples are replayed

    def stage_data(self, ctx: StageContext) -> StageData:
        chosen = sample_replay_prompts(ctx.past, ctx.budget, len(ctx.task.train), ctx.seed, ctx.stage)
        replay = gold_sft(chosen, ctx.tasks_by_name)
        stats = {"replay": {"requested": len(chosen), "kept": len(replay), "mean_reward": None}}
        return StageData(current_task_sft(ctx.task) + replay, stats)

    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        return train_sft(ctx, data)

    def train_identity(self, ctx: StageContext) -> dict:
        return SFT_TRAINING
