"""``sdft``: self-distillation fine-tuning (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in
Language Model Fine-Tuning").

Before training on task t, the current model rewrites each gold answer of task t in its own words: it is
shown the task prompt, the gold answer and an instruction to answer in that form (``template``). A rewrite
replaces the gold answer when the task's reward of the rewrite (``task.reward(rewrite, example)``, the metric
evaluation uses) reaches ``min_reward`` and the rewrite ended on its own (not cut at the token limit);
otherwise the gold answer is kept. The stage then trains on the (prompt, rewrite-or-gold) pairs with the
shared SFT step. The rewrite is trained after the *plain* task prompt, as the gold answer would be.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from opr.methods.base import SFT_TRAINING, StageContext, StageData, train_sft
from opr.rollout import Rollout, sample_rollouts
from opr.types import Example, SFTExample, Task

# Ours, not the paper's: a short instruction a 135M instruct model follows. Measured with
# ``python -m opr.analysis.sdft_rewrites --per-task 40`` (SmolLM2-135M-Instruct, mini_trace varied, the task's
# token limit): kept 100% / 95% / 100% of emotion / arithmetic / topic rewrites (20% / 7.5% / 5% identical to
# gold), where the previous "restate the reference answer in your own words" template kept 60% / 90% / 60%
# (40% of the label rewrites cut at the token limit) and Yang et al. 2024's own template 70% / 70% / 55%.
DEFAULT_REWRITE_TEMPLATE = (
    "{prompt}\n\nThe correct answer is: {answer}\n\nAnswer the request in the same form, in one short reply."
)


def keep_rewrite(text: str, reward: float, finished: bool, min_reward: float, require_finished: bool) -> bool:
    """Whether a rewrite replaces the gold answer: it is non-empty, its reward reaches ``min_reward`` and, with
    ``require_finished``, it ended on its own (EOS before the token limit)."""
    return bool(text) and reward >= min_reward and (finished or not require_finished)


@dataclass
class SDFT:
    """Options:

    - template: str.format template of the rewrite request, with fields ``{prompt}`` (the task prompt) and
      ``{answer}`` (the gold answer); chat-formatted like the task's prompts.
    - temperature, top_p: decoding of the rewrite (temperature 0 = greedy, the paper's setting).
    - min_reward: a rewrite is kept when its task reward (0-100) reaches this; else the gold answer is used.
    - require_finished: drop rewrites cut at the token limit (they would be trained with an EOS they never
      chose).
    - max_new_tokens: token limit of a rewrite; null = the task's answer length (``task.max_new_tokens``).
    """

    name: str = "sdft"
    template: str = DEFAULT_REWRITE_TEMPLATE
    temperature: float = 0.0
    top_p: float = 1.0
    min_reward: float = 50.0
    require_finished: bool = True
    max_new_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        if fields != {"prompt", "answer"}:
            raise ValueError(
                "method.template must contain exactly the fields {prompt} and {answer}; "
                f"got {sorted(fields)} in {self.template!r}"
            )
        if self.temperature < 0:
            raise ValueError(f"method.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"method.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"method.max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")

    @classmethod
    def uses_budget(cls, options: Mapping) -> bool:
        return False  # rewrites the current task only, whatever the budget

    def rewrite_requests(self, examples: list[Example]) -> list[Example]:
        """The rewrite prompts, as examples of the same task (same id, answer and source for the reward)."""
        return [
            Example(e.id, e.task, self.template.format(prompt=e.prompt, answer=e.answer), e.answer, e.source)
            for e in examples
        ]

    def judge(self, rollout: Rollout, task: Task, example: Example) -> tuple[str, float, bool]:
        """(text, reward, keep) of one rewrite: the text stripped of surrounding space, its task reward (scored
        as it will be trained, on the stripped text) and whether it replaces the gold answer
        (:func:`keep_rewrite` with this method's options)."""
        text = rollout.text.strip()
        reward = float(task.reward(text, example))
        return text, reward, keep_rewrite(text, reward, rollout.finished, self.min_reward, self.require_finished)

    def stage_data(self, ctx: StageContext) -> StageData:
        task = ctx.task
        examples = list(task.train)
        groups = sample_rollouts(
            ctx.backbone, self.rewrite_requests(examples), {task.name: task}, 1, self.temperature, self.top_p,
            ctx.rollout_batch_size, seed=ctx.seed * 1000 + ctx.stage, compute_dtype=ctx.compute_dtype,
            max_new_tokens=self.max_new_tokens, max_prompt_tokens=ctx.max_prompt_tokens, ranks=ctx.trainer,
            share_counts=ctx.prompts_per_rank.setdefault("rollouts", []),
        )
        data, rewards, kept_rewards, unfinished, identical = [], [], [], 0, 0
        for ex, group in zip(examples, groups):
            rollout = group[0]
            text, reward, keep = self.judge(rollout, task, ex)
            rewards.append(reward)
            unfinished += not rollout.finished
            if keep:
                kept_rewards.append(reward)
                identical += text == ex.answer.strip()
                data.append(SFTExample(ex.prompt, text, task.name, task.chat, "rewrite", ex.id))
            else:
                data.append(SFTExample(ex.prompt, ex.answer, task.name, task.chat, "gold", ex.id))
        n = len(examples)
        stats = {
            "sdft": {
                "rewrites": n,
                "kept": len(kept_rewards),
                "kept_fraction": len(kept_rewards) / n if n else 0.0,
                "mean_reward": sum(rewards) / n if n else None,
                "kept_mean_reward": sum(kept_rewards) / len(kept_rewards) if kept_rewards else None,
                "unfinished": unfinished,
                "kept_identical_to_gold": identical,
            },
            "replay": {"requested": 0, "kept": 0, "mean_reward": None},
        }
        return StageData(data, stats)

    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        return train_sft(ctx, data)

    def train_identity(self, ctx: StageContext) -> dict:
        return SFT_TRAINING
