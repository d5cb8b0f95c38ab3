"""What a method sees of the run (StageContext), what it returns (StageData), and the shared SFT step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from opr.backbones import Backbone
from opr.engine.base import Trainer
from opr.types import SFTExample, Task


def _no_base_model():
    raise RuntimeError("this StageContext has no load_base_model (the loop passes one; a context made by hand "
                       "must set it to use the base model)")


@dataclass
class StageContext:
    """Everything a method may use at stage ``stage`` (1-based) of the stream."""

    stage: int
    task: Task
    past: list[Task]
    backbone: Backbone
    trainer: Trainer  # fit_sft(), or begin_stage() + optimizer_step(); see opr.engine.base for the contract
    budget: float
    seed: int
    rollout_batch_size: int = 32
    compute_dtype: str = "float32"
    # eval.max_prompt_length: rollouts cut longer prompts on the left, as evaluation does (None: no cut)
    max_prompt_tokens: Optional[int] = None
    # A stage trained in phases (sft_then_grpo: SFT, then GRPO) tells the loop where they start and end; the
    # loop sets both while the stage trains (no-ops elsewhere, e.g. a context made by hand in a test).
    # ``start_phase(name, steps_before)``: phase ``name`` begins (or a resumed stage continues inside it) after
    # ``steps_before`` optimizer steps of the stage's earlier phases: the loop counts the stage's steps on from
    # there (``stage_step`` of the step hook, the curve, mid-stage states) and labels the curve's points.
    start_phase: Callable[[str, int], None] = field(default=lambda name, steps_before: None, repr=False)
    # ``end_phase(name, stage_step)``: phase ``name`` (not the stage's last) ended after ``stage_step`` steps of
    # the stage: with ``checkpoint.save`` the model is saved as ``checkpoints/stage{t}_{name}``.
    end_phase: Callable[[str, int], None] = field(default=lambda name, stage_step: None, repr=False)
    # ``load_base_model()``: a fresh copy of the backbone's model as the run loaded it before any training (the
    # run rebuilds it from ``cfg.backbone``; a resumed run gets the base, not its restored weights). For methods
    # that need the base model (``self_distill``'s ``teacher: base``); costs one model's load and memory.
    load_base_model: Callable[[], Any] = field(default=_no_base_model, repr=False)
    # Prompts each rank generated while building the stage's data, by kind (``rollouts``): a method that
    # shares its generation across the ranks (``ranks=ctx.trainer``) records its ``share_counts`` here, and the
    # loop writes them to ``stages[t].prompts_per_rank`` when there are several ranks.
    prompts_per_rank: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tasks_by_name(self) -> dict[str, Task]:
        return {t.name: t for t in self.past + [self.task]}


@dataclass
class StageData:
    """The stage's SFT mixture and what building it measured (logged under ``stages[t]``)."""

    examples: list[SFTExample]
    stats: dict = field(default_factory=dict)


class Method(Protocol):
    name: str

    def stage_data(self, ctx: StageContext) -> StageData: ...

    def train_stage(self, ctx: StageContext, data: StageData) -> dict: ...

    @classmethod
    def uses_budget(cls, options: Mapping) -> bool:
        """Whether a run with these method options reads ``budget`` (``opr.config.budget_applies``, the report)."""
        ...

    def train_identity(self, ctx: StageContext) -> dict:
        """Everything ``train_stage`` reads besides the stage's data, the trainer and the run config: part of
        the stage cache's key (``opr.stage_cache``). SFT methods return :data:`SFT_TRAINING`; a method with
        its own objective returns its options."""
        ...


# What ``train_sft`` reads besides the data and the trainer: nothing. Methods that train this way share
# cached stages whenever their data is the same (stage 1 of every replay method at one seed).
SFT_TRAINING = {"train_stage": "sft"}


def own_objective(method, ctx: StageContext) -> dict:
    """``train_identity`` of a method with its own objective: its name, its options and, when its options read
    it (``uses_budget``: ``grpo`` / ``self_distill`` with ``replay_budget``), the budget. A run that ignores
    the budget computes the same stages at every budget, so they share cached stages, as ``seq_sft``'s do."""
    import dataclasses

    options = dataclasses.asdict(method)
    identity = {"train_stage": type(method).__qualname__, "options": options}
    if type(method).uses_budget(options):
        identity["budget"] = ctx.budget
    return identity


def current_task_sft(task: Task) -> list[SFTExample]:
    return [SFTExample(e.prompt, e.answer, task.name, task.chat, "gold", e.id) for e in task.train]


def train_sft(ctx: StageContext, data: StageData) -> dict:
    """The default ``train_stage``: completion-only SFT on the stage's mixture."""
    return ctx.trainer.fit_sft(data.examples, desc=f"stage {ctx.stage} {ctx.task.name}", task=ctx.task.name).as_dict()
