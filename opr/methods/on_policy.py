"""The stage loop of the on-policy methods (``grpo``, ``self_distill``): they train on prompts, not on SFT
examples, with optimizer steps of their own.

A stage: the prompt pool (:func:`prompt_pool`: the current task's training prompts, plus the budgeted replay
prompts of past tasks with ``replay_budget: true``) is cut into ``steps`` rollout batches of
``prompts_per_step`` prompts (:func:`prompt_schedule`: every prompt once before any twice). Each batch is
rolled out from the current model (``samples`` responses per prompt, with a generation seed per (seed, stage,
step): :func:`step_seed`) and scored with each prompt's own task reward; then ``updates_per_batch`` optimizer
steps are taken on it. :func:`train_on_policy` runs this and takes the method's two pieces:

* ``make_batches(ctx, groups) -> (micro_batches, stats)``: a batch's rollout groups (one group per prompt)
  as packed micro-batches (``engine.batch_size`` responses each, :func:`micro_batches`), each with
  ``num_targets``, its number of supervised response tokens;
* ``loss_fn(model, micro_batch) -> (Σ per-token loss, metrics)``, as ``trainer.optimizer_step`` calls it.

Batching: one optimizer step covers the whole rollout batch (``engine.batch_size`` sets memory only);
``engine.grad_accum``, ``engine.epochs`` and ``engine.max_steps`` do not apply (``steps`` ×
``updates_per_batch`` is the stage). Rollouts are generated ``rollout.batch_size`` prompts at a time.
:class:`StepLog` keeps a row per rollout batch and per update and sums them up for ``results.json``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch

from opr.engine.base import Trainer
from opr.methods.base import StageContext, StageData
from opr.replay import sample_replay_prompts
from opr.rollout import Rollout, encode_response, sample_rollouts
from opr.types import Example

# ----------------------------------------------------------------------------------------------------------
# the prompts


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


def check_data(data: StageData, method: str) -> list[Example]:
    if not isinstance(data, OnPolicyData):
        raise TypeError(f"{method}.train_stage needs the OnPolicyData its stage_data returns, got {type(data).__name__}")
    return data.prompts


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


def stage_data(method, ctx: StageContext) -> OnPolicyData:
    """``stage_data`` of an on-policy method: the prompt pool, with replay prompts when ``method.replay_budget``."""
    return prompt_pool(ctx, method.replay_budget)


def uses_replay_budget(cls, options: Mapping) -> bool:
    """``uses_budget`` of an on-policy method (a classmethod): a run reads ``budget`` only when
    ``replay_budget`` adds the budgeted past-task prompts to the pool."""
    return bool(options.get("replay_budget", cls.replay_budget))


def check_options(method, counts: Sequence[str]) -> None:
    """The options every on-policy method validates alike: the schedule's sizes ``counts`` are >= 1 and
    ``top_p`` is in (0, 1]."""
    for key in counts:
        if getattr(method, key) < 1:
            raise ValueError(f"method.{key} must be >= 1, got {getattr(method, key)}")
    if not 0 < method.top_p <= 1:
        raise ValueError(f"method.top_p must be in (0, 1], got {method.top_p}")


def check_choice(method, key: str, allowed: Sequence[str]) -> None:
    """``method.<key>`` is one of ``allowed`` (the message lists them: 'a', 'b' or 'c')."""
    value = getattr(method, key)
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
        raise ValueError(f"method.{key} must be {listed}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# the batches


def encoded_rollouts(
    ctx: StageContext, groups: Sequence[Sequence[Rollout]], skip_group: Optional[Callable[[int], bool]] = None,
) -> Iterator[tuple[int, int, Rollout, list[int], list[int]]]:
    """(group index, index in the group, rollout, prompt ids, response ids) of every rollout of a batch with
    a token to train (an unfinished empty response has none: it is left out), its prompt formatted as it was
    sampled, together at most ``engine.max_length`` tokens (:func:`opr.rollout.encode_response`). Groups with
    ``skip_group(i)`` are left out before encoding."""
    bb, tasks = ctx.backbone, ctx.tasks_by_name
    for i, group in enumerate(groups):
        if skip_group is not None and skip_group(i):
            continue
        for j, r in enumerate(group):
            prompt_text = bb.format_prompt(r.example.prompt, tasks[r.example.task].chat)
            prompt, response = encode_response(bb.tokenizer, prompt_text, r.text, r.finished, ctx.trainer.max_length,
                                               r.token_ids)
            if response:
                yield i, j, r, prompt, response


def micro_batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def batch_stats(groups: Sequence[Sequence[Rollout]], min_reward: float) -> dict:
    """Reward statistics of one rollout batch (one group of rollouts per prompt)."""
    rewards = [r.reward for g in groups for r in g]
    return {
        "rollouts": len(rewards),
        "reward": sum(rewards) / len(rewards),
        "success_fraction": sum(any(r.reward >= min_reward for r in g) for g in groups) / len(groups),
        "finished_fraction": sum(r.finished for g in groups for r in g) / len(rewards),
    }


# ----------------------------------------------------------------------------------------------------------
# the records


def average(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


@dataclass
class StepLog:
    """Per-step records of an on-policy stage and their summary (the dict ``train_stage`` returns): a row per
    rollout batch (its reward statistics; with the first update's numbers when it trained) and per update."""

    rows: list[dict] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    seconds_rollout: float = 0.0
    skipped: int = 0  # optimizer steps not taken (a batch with nothing to train on)

    def add(self, row: dict, trainer: Trainer) -> None:
        self.rows.append(row)
        if trainer.logger is not None and "loss" in row:
            scalars = {f"train/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
            trainer.logger.log_step(scalars, step=trainer.global_step)

    @property
    def batches(self) -> list[dict]:
        return [r for r in self.rows if "reward" in r]

    @property
    def updates(self) -> list[dict]:
        return [r for r in self.rows if "loss" in r]

    def summary(self, **extra) -> dict:
        updates, batches = self.updates, self.batches

        def mean(key: str, rows: Sequence[dict]) -> Optional[float]:
            return average([r[key] for r in rows if r.get(key) is not None])

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


# ----------------------------------------------------------------------------------------------------------
# the loop


class OnPolicyOptions(Protocol):
    """The options :func:`train_on_policy` reads from the method (each method documents them)."""

    name: str
    steps: int
    prompts_per_step: int
    updates_per_batch: int
    temperature: float
    top_p: float
    min_reward: float
    max_new_tokens: Optional[int]  # the samples' token limit; None: each task's answer limit


def train_on_policy(
    method: OnPolicyOptions,
    ctx: StageContext,
    data: StageData,
    samples: int,
    make_batches: Callable[[StageContext, list[list[Rollout]]], tuple[list, dict]],
    loss_fn: Callable,
    skip: Optional[Callable[[list], bool]] = None,
    after_step: Optional[Callable[[], None]] = None,
) -> StepLog:
    """Trains one stage on rollouts of the prompt pool of ``data`` (module docstring); returns its records.

    ``samples``: responses per prompt. A batch without micro-batches (no response has a token), or one for
    which ``skip(micro_batches)`` is true, takes no optimizer step (counted in ``StepLog.skipped``).
    ``after_step()`` runs after every optimizer step (e.g. an EMA teacher's update).
    """
    pool = check_data(data, method.name)
    trainer = ctx.trainer
    trainer.begin_stage(method.steps * method.updates_per_batch)
    schedule = prompt_schedule(pool, method.prompts_per_step, method.steps, f"{method.name}/{ctx.seed}/{ctx.stage}")
    log = StepLog()
    for step, prompts in enumerate(schedule):
        clock = time.perf_counter()
        groups = sample_rollouts(
            ctx.backbone, prompts, ctx.tasks_by_name, samples, method.temperature, method.top_p,
            ctx.rollout_batch_size, seed=step_seed(ctx.seed, ctx.stage, step), compute_dtype=ctx.compute_dtype,
            max_prompt_tokens=ctx.max_prompt_tokens, max_new_tokens=method.max_new_tokens,
        )
        log.seconds_rollout += time.perf_counter() - clock
        row = batch_stats(groups, method.min_reward)
        micro, extra = make_batches(ctx, groups)
        row.update(extra)
        if not micro or (skip is not None and skip(micro)):
            log.skipped += method.updates_per_batch
            log.add(row, trainer)
            continue
        for update in range(method.updates_per_batch):
            out = trainer.optimizer_step(micro, loss_fn, [mb.num_targets for mb in micro])
            if after_step is not None:
                after_step()
            log.add({**(row if update == 0 else {}), **out, "update": update}, trainer)
    return log


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """teacher ← (1 - rate) · teacher + rate · student, parameter by parameter (same architecture): an EMA
    teacher's (or reference's) ``after_step``."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.lerp_(ps.detach().to(device=pt.device, dtype=pt.dtype), rate)
