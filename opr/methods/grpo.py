"""``grpo``: on-policy RL with the task reward (GRPO, Shao et al. 2024), one stage per task.

Per rollout batch: ``prompts_per_step`` prompts of the stage's pool (the current task's training prompts,
plus budgeted replay prompts of past tasks with ``replay_budget: true``) get ``group_size`` sampled responses
each from the current model; each response is scored with its task's reward; advantages are normalised
within each prompt's group; then ``updates_per_batch`` optimizer steps minimise the PPO-clipped surrogate
(plus ``kl_coef`` × a KL penalty to the frozen stage-start model), normalised per token over the whole
batch (DAPO-style token-level normalisation: Σ over all response tokens / number of response tokens).

Batching: one optimizer step covers the whole rollout batch (prompts_per_step × group_size responses);
``engine.batch_size`` is the number of responses per micro-batch (memory), ``engine.grad_accum``,
``engine.epochs`` and ``engine.max_steps`` do not apply (``steps`` × ``updates_per_batch`` is the stage).
Rollouts are generated ``rollout.batch_size`` prompts at a time.

The prompt pool and schedule helpers here are shared with ``self_distill`` (the other on-policy method).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from opr.losses.policy import group_advantages, grpo_loss
from opr.losses.sft import PackedBatch, pack, target_logits, token_nll
from opr.methods.base import StageContext, StageData, own_objective
from opr.replay import sample_replay_prompts
from opr.rollout import Rollout, encode_response, frozen_copy, sample_rollouts
from opr.types import Example

# ----------------------------------------------------------------------------------------------------------
# shared by the on-policy methods (grpo, self_distill)


@dataclass
class OnPolicyData(StageData):
    """An on-policy stage trains on prompts, not on SFT examples: ``examples`` stays empty and ``prompts``
    holds the stage's prompt pool (current task first, then replay prompts)."""

    prompts: list[Example] = field(default_factory=list)


def prompt_pool(ctx: StageContext, replay_budget: bool) -> OnPolicyData:
    """The current task's training prompts, plus (``replay_budget``) the budgeted past-task prompts that
    vanilla replay and OPR use at this stage (same seed, same prompts)."""
    current = list(ctx.task.train)
    if not current:
        raise ValueError(f"task {ctx.task.name!r} has no training examples: nothing to sample prompts from")
    replay = (
        sample_replay_prompts(ctx.past, ctx.budget, len(ctx.task.train), ctx.seed, ctx.stage)
        if replay_budget and ctx.past else []
    )
    stats = {
        "replay": {"requested": len(replay), "kept": len(replay), "mean_reward": None},
        "prompt_pool": {"current": len(current), "replay": len(replay)},
    }
    return OnPolicyData([], stats, prompts=current + replay)


def prompt_schedule(pool: Sequence[Example], per_step: int, steps: int, key: str) -> list[list[Example]]:
    """``steps`` batches of ``min(per_step, len(pool))`` prompts: passes over the pool in a fresh random order
    each pass (seeded by ``key``), so every prompt is used once before any is used twice."""
    if not pool:
        raise ValueError("the prompt pool is empty")
    per_step = min(per_step, len(pool))
    rng = random.Random(key)
    order: list[Example] = []
    batches = []
    for _ in range(steps):
        batch: list[Example] = []
        while len(batch) < per_step:
            if not order:
                order = list(pool)
                rng.shuffle(order)
            batch.append(order.pop())
        batches.append(batch)
    return batches


def step_seed(seed: int, stage: int, step: int) -> int:
    """The generation seed of rollout batch ``step`` of ``stage``: distinct per (seed, stage, step)."""
    return (seed * 1_000_003 + stage * 10_007 + step) % (2**31 - 1)


def check_data(data: StageData, method: str) -> list[Example]:
    if not isinstance(data, OnPolicyData):
        raise TypeError(f"{method}.train_stage needs the OnPolicyData its stage_data returns, got {type(data).__name__}")
    return data.prompts


@dataclass
class StepLog:
    """Per-step records of an on-policy stage and their summary (the dict ``train_stage`` returns)."""

    rows: list[dict] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    seconds_rollout: float = 0.0

    def add(self, row: dict, trainer) -> None:
        self.rows.append(row)
        if getattr(trainer, "logger", None) is not None and "loss" in row:
            scalars = {f"train/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
            trainer.logger.log_step(scalars, step=trainer.global_step)

    def summary(self, **extra) -> dict:
        updates = [r for r in self.rows if "loss" in r]

        def mean(key: str, rows: Sequence[dict]) -> Optional[float]:
            vals = [r[key] for r in rows if r.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        batches = [r for r in self.rows if "reward" in r]
        out = {
            "steps": len(updates),
            "rollout_batches": len(batches),
            "rollouts": sum(r["rollouts"] for r in batches),
            "mean_reward": mean("reward", batches),
            "reward_per_step": [r["reward"] for r in batches],
            "success_fraction": mean("success_fraction", batches),
            "finished_fraction": mean("finished_fraction", batches),
            "first_loss": updates[0]["loss"] if updates else None,
            "last_loss": updates[-1]["loss"] if updates else None,
            "mean_loss": mean("loss", updates),
            "mean_grad_norm": mean("grad_norm", updates),
            "grad_norm_per_step": [r["grad_norm"] for r in updates],
            "supervised_tokens": int(sum(r["tokens"] for r in updates)),
            "seconds": time.perf_counter() - self.t0,
            "seconds_rollout": self.seconds_rollout,
        }
        out.update(extra)
        return out


def batch_stats(groups: Sequence[Sequence[Rollout]], min_reward: float) -> dict:
    """Reward statistics of one rollout batch (one group of rollouts per prompt)."""
    rewards = [r.reward for g in groups for r in g]
    return {
        "rollouts": len(rewards),
        "reward": sum(rewards) / len(rewards),
        "success_fraction": sum(any(r.reward >= min_reward for r in g) for g in groups) / len(groups),
        "finished_fraction": sum(r.finished for g in groups for r in g) / len(rewards),
    }


def micro_batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------------
# GRPO


@dataclass
class _PolicyBatch:
    """One micro-batch: packed (prompt, response) sequences, one advantage per sequence [S], and the
    behaviour / reference log-probs of its M response tokens ([M], filled at the first update)."""

    batch: PackedBatch
    advantages: torch.Tensor
    logp_old: Optional[torch.Tensor] = None
    logp_ref: Optional[torch.Tensor] = None


@dataclass
class GRPO:
    """Options:

    steps: rollout batches per stage; each gives ``updates_per_batch`` optimizer steps.
    prompts_per_step: prompts per rollout batch (capped at the pool size).
    group_size: G, sampled responses per prompt (>= 2: the group mean is the baseline).
    updates_per_batch: policy updates on one rollout batch (PPO epochs); from the second on, the samples are
      stale and the clipped ratio π_θ/π_old does its job.
    temperature, top_p: sampling of the rollouts. The log-probs in the ratio are those of the untempered
      policy, so keep temperature 1 and top_p 1 for an exactly on-policy ratio.
    clip_eps, clip_eps_high: PPO clip range [1 - clip_eps, 1 + clip_eps_high] (``clip_eps_high: null`` =
      clip_eps; a larger value is DAPO's clip-higher).
    kl_coef: weight of the KL penalty to the stage-start model (a frozen copy, made only when > 0).
    kl_estimator: k1 | k2 | k3 (Schulman's estimators of KL(π_θ ‖ π_ref) on the sampled tokens; k3 = GRPO's).
    scale_advantages: true divides by the group's standard deviation (GRPO); false only centres
      (Dr. GRPO). Advantages are computed on reward / 100, so unscaled ones lie in [-1, 1].
    drop_degenerate_groups: leave groups whose rewards are all equal (zero advantage) out of the batch, so
      they neither cost compute nor dilute the token normalisation (DAPO's filter, without resampling).
      A batch where every group is degenerate and ``kl_coef == 0`` has an exactly zero gradient; its update
      is skipped either way (Adam would otherwise keep moving on stale momentum).
    min_reward: a rollout counts as a success when its reward reaches this (statistics only).
    replay_budget: add the budgeted past-task prompts (the replay prompts of vanilla replay / OPR) to the
      pool, each scored with its own task's reward.
    """

    name: str = "grpo"
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 4
    updates_per_batch: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    scale_advantages: bool = True
    drop_degenerate_groups: bool = False
    min_reward: float = 50.0
    replay_budget: bool = False

    def __post_init__(self) -> None:
        for key in ("steps", "prompts_per_step", "updates_per_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.{key} must be >= 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ValueError(f"method.group_size must be >= 2 (a group of 1 has no baseline), got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"method.temperature must be > 0 (GRPO samples its group), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"method.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.clip_eps < 1:
            raise ValueError(f"method.clip_eps must be in [0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high < 0:
            raise ValueError(f"method.clip_eps_high must be >= 0 or null, got {self.clip_eps_high}")
        if not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            raise ValueError(f"method.kl_coef must be a finite number >= 0, got {self.kl_coef}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"method.kl_estimator must be 'k1', 'k2' or 'k3', got {self.kl_estimator!r}")

    def stage_data(self, ctx: StageContext) -> StageData:
        return prompt_pool(ctx, self.replay_budget)

    # ------------------------------------------------------------------ the loss
    def loss_fn(self, reference: Optional[torch.nn.Module]) -> Callable[[torch.nn.Module, _PolicyBatch], tuple]:
        """``loss_fn(model, micro_batch) -> (Σ per-token loss, metrics)`` for ``trainer.optimizer_step``."""

        def fn(model: torch.nn.Module, mb: _PolicyBatch) -> tuple[torch.Tensor, dict]:
            device = next(model.parameters()).device
            batch = mb.batch.to(device)
            logp = -token_nll(target_logits(model, batch), batch.targets)  # [M]
            if mb.logp_old is None:  # first update on these samples: the current policy sampled them
                mb.logp_old = logp.detach()
            if reference is not None and mb.logp_ref is None:
                with torch.no_grad():
                    mb.logp_ref = -token_nll(target_logits(reference, batch), batch.targets)
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
            }
            return out.loss * batch.num_targets, metrics

        return fn

    def policy_batches(self, ctx: StageContext, groups: Sequence[Sequence[Rollout]]) -> tuple[list[_PolicyBatch], dict]:
        """Group advantages and packed micro-batches (``trainer.batch_size`` responses each) of one batch."""
        rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float32) / 100.0  # [N, G]
        adv = group_advantages(rewards, self.group_size, scale=self.scale_advantages)  # [N, G]
        degenerate = rewards.amax(dim=1) == rewards.amin(dim=1)  # [N]
        tok, bb = ctx.backbone.tokenizer, ctx.backbone
        tasks = ctx.tasks_by_name
        seqs, seq_adv = [], []
        for i, group in enumerate(groups):
            if self.drop_degenerate_groups and bool(degenerate[i]):
                continue
            for j, r in enumerate(group):
                prompt_text = bb.format_prompt(r.example.prompt, tasks[r.example.task].chat)
                prompt, response = encode_response(tok, prompt_text, r.text, r.finished, ctx.trainer.max_length,
                                                    r.token_ids)
                if response:
                    seqs.append((prompt, response))
                    seq_adv.append(float(adv[i, j]))
        micro = [
            _PolicyBatch(pack([s for s, _ in chunk]), torch.tensor([a for _, a in chunk]))
            for chunk in micro_batches(list(zip(seqs, seq_adv)), ctx.trainer.batch_size)
        ]
        stats = {"degenerate_fraction": float(degenerate.float().mean()), "sequences": len(seqs)}
        return micro, stats

    # ------------------------------------------------------------------ the stage
    def train_identity(self, ctx: StageContext) -> dict:
        return own_objective(self, ctx)

    def train_stage(self, ctx: StageContext, data: StageData) -> dict:
        pool = check_data(data, self.name)
        trainer, model = ctx.trainer, ctx.backbone.model
        reference = frozen_copy(model) if self.kl_coef > 0 else None
        loss_fn = self.loss_fn(reference)
        trainer.begin_stage(self.steps * self.updates_per_batch)
        schedule = prompt_schedule(pool, self.prompts_per_step, self.steps, f"{self.name}/{ctx.seed}/{ctx.stage}")
        log = StepLog()
        skipped = 0
        for step, prompts in enumerate(schedule):
            clock = time.perf_counter()
            groups = sample_rollouts(
                ctx.backbone, prompts, ctx.tasks_by_name, self.group_size, self.temperature, self.top_p,
                ctx.rollout_batch_size, seed=step_seed(ctx.seed, ctx.stage, step), compute_dtype=ctx.compute_dtype,
                max_prompt_tokens=ctx.max_prompt_tokens,
            )
            log.seconds_rollout += time.perf_counter() - clock
            row = batch_stats(groups, self.min_reward)
            micro, extra = self.policy_batches(ctx, groups)
            row.update(extra)
            no_signal = all(float(mb.advantages.abs().max()) == 0.0 for mb in micro) and self.kl_coef == 0
            if not micro or no_signal:
                skipped += self.updates_per_batch
                log.add(row, trainer)
                continue
            for update in range(self.updates_per_batch):
                out = trainer.optimizer_step(micro, loss_fn, [mb.batch.num_targets for mb in micro])
                log.add({**(row if update == 0 else {}), **out, "update": update}, trainer)
        del reference
        batches = [r for r in log.rows if "degenerate_fraction" in r]
        updates = [r for r in log.rows if "loss" in r]
        return log.summary(
            skipped_steps=skipped,
            degenerate_fraction=sum(r["degenerate_fraction"] for r in batches) / len(batches),
            mean_clip_frac=sum(r["clip_frac"] for r in updates) / len(updates) if updates else None,
            mean_kl=sum(r["kl"] for r in updates) / len(updates) if updates else None,
        )
