"""``seq_sft``: fine-tune on each task in turn, nothing else (the forgetting baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opr.methods.base import SFT_TRAINING, StageContext, StageData, current_task_sft, train_sft


@dataclass
class SequentialSFT:
    name: str = "seq_sft"

    @classmethod
    def uses_budget(cls, options: Mapping) -> bool:
        return False  # the current task only, whatever the budget

    def stage_data(self, ctx: StageContext) -> StageData:
        return StageData(current_task_sft(ctx.task), {"replay": {"requested": 0, "kept": 0, "mean_reward": None}})

    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        return train_sft(ctx, data)

    def train_identity(self, ctx: StageContext) -> dict:
        return SFT_TRAINING
