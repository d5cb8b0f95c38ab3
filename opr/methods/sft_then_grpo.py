"""``sft_then_grpo``: each stage is two phases on the same task, SFT on its gold answers, then GRPO on its
prompts (as in "RL Fine-Tuning Heals OOD Forgetting in SFT", 2025: an SFT run, then an RL run from its end).

Composed from the existing pieces, with no loop of its own: the SFT phase is ``trainer.fit_sft`` on
``seq_sft``'s data (the current task's gold answers) for ``sft_steps`` optimizer steps (cycling the examples
epoch after epoch; null: the task's epochs, as ``seq_sft``), and the RL phase is :class:`opr.methods.grpo.GRPO`'s
``train_stage`` for ``rl_steps`` rollout batches, with GRPO's options under ``rl`` (the names of
``conf/method/grpo.yaml``, except ``steps``, which is ``rl_steps``) and GRPO's prompt pool (the current task's
prompts, plus the budgeted replay prompts with ``rl.replay_budget``).

Across the phase boundary: the RL phase starts a fresh AdamW and its own schedule (``engine.schedule``,
``engine.warmup_ratio``) over ``rl_steps`` x ``rl.updates_per_batch`` steps, peaking at ``rl_lr`` (null:
``engine.lr``), as the separate RL run of the paper would; GRPO's KL reference (``rl.kl_coef > 0``) is the
model at the end of the SFT phase. The stage's steps count on across both phases (the curve of
``eval.every_steps``, ``checkpoint.every_steps``); with ``checkpoint.save`` the model at the end of the SFT phase
is saved as ``checkpoints/stage{t}_sft`` (``stages[t].phase_checkpoints``).

``stages[t].train``: ``steps`` and ``supervised_tokens`` of the whole stage, ``sft`` (the SFT phase's
``fit_sft`` statistics) and ``rl`` (GRPO's). Resume: a stage killed in the SFT phase continues from
``fit_sft``'s position; one killed in the RL phase from GRPO's, which carries the SFT phase's statistics
(the SFT phase is not run again).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from opr.methods import on_policy
from opr.methods.base import StageContext, StageData, current_task_sft, own_objective
from opr.methods.grpo import GRPO

# GRPO's options but ``name``, ``steps`` (``rl_steps``) and ``lr`` (``rl_lr``): the node ``method.rl``, made from
# GRPO's fields (same names, types and defaults), so that a new GRPO option is an option of the RL phase too.
# One default differs: the RL phase keeps G = 4, with which experiment=rl_heals_sft was measured (grpo's own
# default became G = 8 later, for stages that start from the base model).
_RL_FIELDS = [f for f in dataclasses.fields(GRPO) if f.init and f.name not in ("name", "steps", "lr")]
_RL_DEFAULTS = {"group_size": 4}
RLOptions = dataclasses.make_dataclass(
    "RLOptions",
    [(f.name, typing.get_type_hints(GRPO)[f.name], field(default=_RL_DEFAULTS.get(f.name, f.default)))
     for f in _RL_FIELDS],
)
RLOptions.__module__ = __name__
RLOptions.__doc__ = "``method.rl`` of ``sft_then_grpo``: the RL phase's GRPO options (see :class:`GRPO`)."


@dataclass
class SFTThenGRPO:
    """Options:

    - sft_steps: optimizer steps of the SFT phase (cycling the task's examples); null: the task's epochs
      (``engine.epochs`` / ``engine.epochs_per_task``, capped at ``engine.max_steps``), as ``seq_sft``.
    - rl_steps: rollout batches of the RL phase (GRPO's ``steps``); each gives ``rl.updates_per_batch``
      optimizer steps.
    - rl_lr: the RL phase's learning rate (null: ``engine.lr``); the SFT phase trains at ``engine.lr``.
    - rl: GRPO's options for the RL phase (``group_size``, ``prompts_per_step``, ``temperature``,
      ``max_new_tokens``, ``kl_coef``, ...; see :class:`opr.methods.grpo.GRPO`).
    """

    name: str = "sft_then_grpo"
    sft_steps: Optional[int] = None
    rl_steps: int = 20
    rl_lr: Optional[float] = None
    rl: RLOptions = field(default_factory=RLOptions)

    def __post_init__(self) -> None:
        from opr.config import check_options  # the RANGES table's rules and messages for these options

        check_options("method", {"sft_steps": self.sft_steps, "rl_steps": self.rl_steps, "rl_lr": self.rl_lr})
        if isinstance(self.rl, Mapping):  # as Hydra passes it
            allowed = [f.name for f in _RL_FIELDS]
            unknown = sorted(set(self.rl) - set(allowed))
            if unknown:
                hint = " (the RL phase's steps are method.rl_steps)" if "steps" in unknown else ""
                raise ValueError(f"method.rl has no option(s) {unknown}{hint}; allowed: {', '.join(allowed)}")
            self.rl = RLOptions(**self.rl)
        options = {f.name: getattr(self.rl, f.name) for f in _RL_FIELDS}
        try:  # GRPO's own checks (group_size >= 2, temperature > 0, ...), named as options of method.rl
            self.grpo = GRPO(name="grpo", steps=self.rl_steps, **options)
        except ValueError as err:
            raise ValueError(str(err).replace("method.", "method.rl.")) from err

    @classmethod
    def uses_budget(cls, options: Mapping) -> bool:
        """Only ``rl.replay_budget`` reads the budget (replay prompts in the RL phase's pool)."""
        rl = options.get("rl") or {}
        replay = rl.get("replay_budget", False) if isinstance(rl, Mapping) else getattr(rl, "replay_budget", False)
        return bool(replay)

    train_identity = own_objective  # its options (both phases'), and the budget when rl.replay_budget reads it

    def stage_data(self, ctx: StageContext) -> on_policy.OnPolicyData:
        """The SFT phase's examples (``seq_sft``'s) and the RL phase's prompt pool (``grpo``'s)."""
        pool = on_policy.prompt_pool(ctx, self.rl.replay_budget)
        return on_policy.OnPolicyData(current_task_sft(ctx.task), pool.stats, prompts=pool.prompts)

    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        trainer = ctx.trainer
        pending = trainer.pending_resume
        if pending is not None and "on_policy" in pending:  # resumed inside the RL phase: SFT is done
            sft = pending["carry"]["sft"]
        else:  # a fresh stage, or one resumed inside the SFT phase (fit_sft takes the position)
            ctx.start_phase("sft", 0)
            sft = trainer.fit_sft(data.examples, desc=f"stage {ctx.stage} {ctx.task.name} sft", task=ctx.task.name,
                                  steps=self.sft_steps).as_dict()
            ctx.end_phase("sft", sft["steps"])
        ctx.start_phase("rl", sft["steps"])
        if not isinstance(data, on_policy.OnPolicyData):  # a stage resumed mid-way gets its SFT examples back
            data = on_policy.prompt_pool(ctx, self.rl.replay_budget)  # the same pool (seeded by seed, stage)
        rl = self.grpo.train_stage(ctx, data, lr=self.rl_lr, carry={"sft": sft})
        return {"steps": sft["steps"] + rl["steps"],
                "supervised_tokens": sft["supervised_tokens"] + rl["supervised_tokens"],
                "sft": sft, "rl": rl}
