"""``grpo``: on-policy RL with the task reward (GRPO, Shao et al. 2024), one stage per task.

Per rollout batch: ``prompts_per_step`` prompts of the stage's pool (the current task's training prompts,
plus budgeted replay prompts of past tasks with ``replay_budget: true``) get ``group_size`` sampled responses
each from the current model; each response is scored with its task's reward; advantages are normalised
within each prompt's group; then ``updates_per_batch`` optimizer steps minimise the PPO-clipped surrogate
(plus ``kl_coef`` × a KL penalty to the frozen stage-start model), normalised per token over the whole
batch (DAPO-style token-level normalisation: Σ over all response tokens / number of response tokens).

The stage loop is ``opr.methods.on_policy``'s (shared with ``self_distill``): one optimizer step covers the
whole rollout batch (prompts_per_step × group_size responses), ``engine.batch_size`` responses per
micro-batch; ``engine.grad_accum``, ``engine.epochs`` and ``engine.max_steps`` do not apply (``steps`` ×
``updates_per_batch`` is the stage). GRPO supplies the micro-batches (:meth:`GRPO.policy_batches`) and the
loss (:meth:`GRPO.loss_fn`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from opr.losses.policy import group_advantages, grpo_loss, token_entropy
from opr.losses.sft import PackedBatch, pack, target_logits, token_nll
from opr.methods import on_policy
from opr.methods.base import StageContext, StageData, own_objective
from opr.rollout import Rollout


@dataclass
class _PolicyBatch:
    """One micro-batch: packed (prompt, response) sequences, one advantage per sequence [S], and the
    behaviour / reference log-probs of its M response tokens ([M], filled at the first update)."""

    batch: PackedBatch
    advantages: torch.Tensor
    logp_old: Optional[torch.Tensor] = None
    logp_ref: Optional[torch.Tensor] = None
    num_targets = property(lambda self: self.batch.num_targets)  # the response tokens the trainer counts


@dataclass
class GRPO:
    """Options:

    - steps: rollout batches per stage; each gives ``updates_per_batch`` optimizer steps.
    - prompts_per_step: prompts per rollout batch (capped at the pool size).
    - group_size: G, sampled responses per prompt (>= 2: the group mean is the baseline).
    - updates_per_batch: policy updates on one rollout batch (PPO epochs); from the second on, the samples are
      stale and the clipped ratio π_θ/π_old does its job.
    - temperature, top_p: sampling of the rollouts. The log-probs in the ratio are those of the untempered
      policy, so keep temperature 1 and top_p 1 for an exactly on-policy ratio.
    - max_new_tokens: the rollouts' token limit (null: the task's answer limit).
    - clip_eps, clip_eps_high: PPO clip range [1 - clip_eps, 1 + clip_eps_high] (``clip_eps_high: null`` =
      clip_eps; a larger value is DAPO's clip-higher).
    - kl_coef: weight of the KL penalty to the stage-start model (``trainer.frozen_model``, made only when > 0:
      a full copy; under ZeRO-3 partitioned like the policy).
    - kl_estimator: k1 | k2 | k3 (Schulman's estimators of KL(π_θ ‖ π_ref) on the sampled tokens; k3 = GRPO's).
    - scale_advantages: true divides by the group's standard deviation (GRPO); false only centres
      (Dr. GRPO). Advantages are computed on reward / 100, so unscaled ones lie in [-1, 1].
    - drop_degenerate_groups: leave groups whose rewards are all equal (zero advantage) out of the batch, so
      they neither cost compute nor dilute the token normalisation (DAPO's filter, without resampling).
      A batch where every group is degenerate and ``kl_coef == 0`` has an exactly zero gradient; its update
      is skipped either way (Adam would otherwise keep moving on stale momentum).
    - min_reward: a rollout counts as a success when its reward reaches this (statistics only).
    - replay_budget: add the budgeted past-task prompts (the replay prompts of vanilla replay / OPR) to the
      pool, each scored with its own task's reward.
    - stop_on_collapse: null (off) or ``{min_finished, patience}``: end the stage when the finished fraction
      stays below ``min_finished`` for ``patience`` rollout batches (:class:`opr.methods.on_policy.CollapseGuard`).
    - lr: the policy updates' learning rate (null: ``engine.lr``; default 1e-5). RL is usually run far below
      SFT's learning rate; on the default stream GRPO at 1e-4 unlearnt arithmetic where 1e-5 learnt it, and
      G = 8 with 40 rollout batches at 1e-5 learnt every task (docs/studies/onpolicy_contrast.md).
    """

    name: str = "grpo"
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    updates_per_batch: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    scale_advantages: bool = True
    drop_degenerate_groups: bool = False
    min_reward: float = 50.0
    replay_budget: bool = False
    stop_on_collapse: Optional[on_policy.CollapseGuard] = None
    lr: Optional[float] = 1e-5

    def __post_init__(self) -> None:
        from opr.config import check_options  # the RANGES table's rule and message for lr

        on_policy.check_options(self, ("steps", "prompts_per_step", "updates_per_batch"))
        check_options("method", {"lr": self.lr})
        if self.group_size < 2:
            raise ValueError(f"method.group_size must be >= 2 (a group of 1 has no baseline), got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"method.temperature must be > 0 (GRPO samples its group), got {self.temperature}")
        if not 0 <= self.clip_eps < 1:
            raise ValueError(f"method.clip_eps must be in [0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high < 0:
            raise ValueError(f"method.clip_eps_high must be >= 0 or null, got {self.clip_eps_high}")
        if not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            raise ValueError(f"method.kl_coef must be a finite number >= 0, got {self.kl_coef}")
        on_policy.check_choice(self, "kl_estimator", ("k1", "k2", "k3"))

    # the stage's data is its prompt pool; the budget counts only for its replay prompts; its own objective
    stage_data = on_policy.stage_data
    uses_budget = classmethod(on_policy.uses_replay_budget)
    train_identity = own_objective

    # ------------------------------------------------------------------ the loss
    def loss_fn(self, reference: Optional[torch.nn.Module]) -> Callable[[torch.nn.Module, _PolicyBatch], tuple]:
        """``loss_fn(model, micro_batch) -> (Σ per-token loss, metrics)`` for ``trainer.optimizer_step``."""

        def fn(model: torch.nn.Module, mb: _PolicyBatch) -> tuple[torch.Tensor, dict]:
            device = next(model.parameters()).device
            batch = mb.batch.to(device)
            logits = target_logits(model, batch)  # [M, V]
            logp = -token_nll(logits, batch.targets)  # [M]
            if mb.logp_old is None:  # first update on these samples: the current policy sampled them
                mb.logp_old = logp.detach()
            if reference is not None and mb.logp_ref is None:
                with torch.no_grad():
                    mb.logp_ref = -token_nll(target_logits(reference, batch), batch.targets)
            # a resumed stage's saved batch comes back on the CPU
            mb.logp_old = mb.logp_old.to(device)
            mb.logp_ref = None if mb.logp_ref is None else mb.logp_ref.to(device)
            adv = mb.advantages.to(device)[batch.seq_of_target]  # [M]: each token gets its response's advantage
            mask = torch.ones(1, batch.num_targets, dtype=torch.bool, device=device)
            out = grpo_loss(
                logp[None], mb.logp_old[None], adv[None], mask,
                logp_ref=None if mb.logp_ref is None else mb.logp_ref[None], kl_coef=self.kl_coef,
                clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, kl_estimator=self.kl_estimator,
            )
            # grpo_loss is a mean over the M tokens; the trainer wants the sum (it divides by all tokens).
            metrics = {
                "policy_loss": float(out.policy_loss.detach()),
                "kl": float(out.kl.detach()),
                "clip_frac": float(out.clip_frac),
                "entropy": float(token_entropy(logits.detach()).mean()),
            }
            return out.loss * batch.num_targets, metrics

        return fn

    def policy_batches(self, ctx: StageContext, groups: Sequence[Sequence[Rollout]]) -> tuple[list[_PolicyBatch], dict]:
        """Group advantages and packed micro-batches (``trainer.batch_size`` responses each) of one batch."""
        rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float32) / 100.0  # [N, G]
        adv = group_advantages(rewards, self.group_size, scale=self.scale_advantages)  # [N, G]
        degenerate = rewards.amax(dim=1) == rewards.amin(dim=1)  # [N]
        seqs, seq_adv = [], []
        skip = (lambda i: bool(degenerate[i])) if self.drop_degenerate_groups else None
        for i, j, _, prompt, response in on_policy.encoded_rollouts(ctx, groups, skip):
            seqs.append((prompt, response))
            seq_adv.append(float(adv[i, j]))
        micro = [
            _PolicyBatch(pack([s for s, _ in chunk]), torch.tensor([a for _, a in chunk]))
            for chunk in on_policy.micro_batches(list(zip(seqs, seq_adv)), ctx.trainer.batch_size)
        ]
        stats = {"degenerate_fraction": float(degenerate.float().mean()), "sequences": len(seqs)}
        return micro, stats

    # ------------------------------------------------------------------ the stage
    def train_stage(self, ctx: StageContext, data: StageData, lr: Optional[float] = None,
                    carry: Optional[dict] = None) -> dict:
        """The stage (or the RL phase of ``sft_then_grpo``, which passes its learning rate ``lr`` and a record
        to ``carry`` in every mid-stage position: :func:`opr.methods.on_policy.train_on_policy`). The learning
        rate: ``lr`` when given, else the option ``lr``, else ``engine.lr``."""
        # the stage-start model, laid out like the policy (a full copy; ZeRO-3: partitioned like it)
        reference = ctx.trainer.frozen_model(ctx.backbone.model) if self.kl_coef > 0 else None

        def no_signal(micro: list[_PolicyBatch]) -> bool:  # every advantage 0 and no KL term: a zero gradient
            return all(float(mb.advantages.abs().max()) == 0.0 for mb in micro) and self.kl_coef == 0

        log = on_policy.train_on_policy(self, ctx, data, self.group_size, self.policy_batches,
                                        self.loss_fn(reference), skip=no_signal,
                                        keep={"reference": reference} if reference is not None else None,
                                        lr=lr if lr is not None else self.lr, carry=carry)
        kl = {"kl_per_step": log.per_step("kl")} if reference is not None else {}  # to the stage-start model
        return log.summary(
            skipped_steps=log.skipped,
            degenerate_fraction=on_policy.average([r["degenerate_fraction"] for r in log.batches if "degenerate_fraction" in r]),
            mean_clip_frac=on_policy.average([r["clip_frac"] for r in log.updates]),
            mean_kl=on_policy.average([r["kl"] for r in log.updates]),
            degenerate_fraction_per_step=log.per_step("degenerate_fraction"),
            **kl,
        )
