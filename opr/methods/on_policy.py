"""The stage loop of the on-policy methods (``grpo``, ``self_distill``): they train on prompts, not on SFT
examples, with optimizer steps of their own.

A stage: the prompt pool (:func:`prompt_pool`: the current task's training prompts, plus the budgeted replay
prompts of past tasks with ``replay_budget: true``) is cut into ``steps`` rollout batches of
``prompts_per_step`` prompts (:func:`prompt_schedule`: every prompt once before any twice). Each batch is
rolled out from the current model (``samples`` responses per prompt, with a generation seed per (seed, stage,
step): :func:`step_seed`) and scored with each prompt's own task reward (over several ranks each rank samples
every ``world_size``-th prompt and all ranks get the whole batch: :func:`sample_batch`); then
``updates_per_batch`` optimizer steps are taken on it. :func:`train_on_policy` runs this and takes the method's two pieces:

* ``make_batches(ctx, groups) -> (micro_batches, stats)``: a batch's rollout groups (one group per prompt)
  as packed micro-batches (``engine.batch_size`` responses each, :func:`micro_batches`), each with
  ``num_targets``, its number of supervised response tokens;
* ``loss_fn(model, micro_batch) -> (Σ per-token loss, metrics)``, as ``trainer.optimizer_step`` calls it.

Batching: one optimizer step covers the whole rollout batch (``engine.batch_size`` sets memory only; over
several ranks each rank steps over its contiguous part of the batch's micro-batches, :func:`rank_micro_batches`,
so the update is data-parallel and its loss the one process's);
``engine.grad_accum``, ``engine.epochs`` and ``engine.max_steps`` do not apply (``steps`` ×
``updates_per_batch`` is the stage). Rollouts are generated ``rollout.batch_size`` prompts at a time.
:class:`StepLog` keeps a row per rollout batch and per update and sums them up for ``results.json`` (means,
and per rollout batch: reward, finished fraction, entropy, ...).

Mid-stage resume: every optimizer step hands the trainer a resumable position (:func:`train_on_policy`'s
``position``: the prompt pool, the next step and update, the records so far, the rollout batch still being
updated when ``updates_per_batch`` > 1, the weights of the method's extra models ``keep`` such as a frozen
reference or an EMA teacher, and the collapse guard's kept weights); the trainer adds its optimizer and
schedule, and the loop saves it (``checkpoint.every_steps``, a stop signal). Rollouts come from per-(seed,
stage, step) generators and the prompt schedule from (seed, stage), so a resumed stage continues exactly as
the uninterrupted one would have.

Collapse guard (``method.stop_on_collapse``, :class:`CollapseGuard`, off by default): a stage ends early
when the finished fraction of the rollout batches stays below ``min_finished`` for ``patience`` batches in a
row (:func:`collapse_onset`); the model goes back to the weights that sampled the last batch above the
threshold, and ``stages[t].train.collapse`` records where and why.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
from tqdm.auto import tqdm

from opr.distributed import shard_bounds
from opr.engine.base import Trainer, ZeroWeight
from opr.methods.base import StageContext, StageData
from opr.replay import sample_replay_prompts
from opr.rollout import Rollout, encode_response, sample_rollouts
from opr.types import Example

logger = logging.getLogger("opr")

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
    """The options every on-policy method validates alike: the schedule's sizes ``counts`` are >= 1,
    ``top_p`` is in (0, 1] and ``stop_on_collapse`` is null or a valid :class:`CollapseGuard` (a mapping, as
    Hydra passes it, becomes one)."""
    for key in counts:
        if getattr(method, key) < 1:
            raise ValueError(f"method.{key} must be >= 1, got {getattr(method, key)}")
    if not 0 < method.top_p <= 1:
        raise ValueError(f"method.top_p must be in (0, 1], got {method.top_p}")
    guard = method.stop_on_collapse
    if isinstance(guard, Mapping):
        unknown = sorted(set(guard) - {f.name for f in dataclasses.fields(CollapseGuard)})
        if unknown:
            raise ValueError(f"method.stop_on_collapse has no option(s) {unknown}; allowed: min_finished, patience")
        method.stop_on_collapse = guard = CollapseGuard(**guard)
    if guard is not None and not isinstance(guard, CollapseGuard):
        raise ValueError("method.stop_on_collapse must be null or a mapping such as "
                         f"{{min_finished: 0.1, patience: 5}}, got {guard!r}")


def check_choice(method, key: str, allowed: Sequence[str]) -> None:
    """``method.<key>`` is one of ``allowed`` (the message lists them: 'a', 'b' or 'c')."""
    value = getattr(method, key)
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
        raise ValueError(f"method.{key} must be {listed}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# the collapse guard


@dataclass
class CollapseGuard:
    """``method.stop_on_collapse`` (null: off). A rollout batch counts as collapsed when its finished fraction
    (responses that ended with EOS within the token limit) is below ``min_finished``; ``patience`` collapsed
    batches in a row end the stage (the model keeps the weights that sampled the last batch at or above the
    threshold, or the stage-start weights when there was none)."""

    min_finished: float = 0.1
    patience: int = 5

    def __post_init__(self) -> None:  # the same bounds as opr.config.RANGES, for a guard made in code
        if isinstance(self.min_finished, bool) or not 0 <= self.min_finished <= 1:
            raise ValueError(f"method.stop_on_collapse.min_finished must be in [0, 1], got {self.min_finished}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"method.stop_on_collapse.patience must be an integer >= 1, got {self.patience}")


def collapse_onset(values: Sequence[Optional[float]], threshold: float, patience: int) -> Optional[int]:
    """The index where the trailing run of ``values`` below ``threshold`` starts, when that run is at least
    ``patience`` long; else None. A None (not measured) value breaks a run.

    Shapes: values [n] (one per rollout batch so far) -> an index in [0, n - patience], or None.
    ``collapse_onset([0.5, 0.05, 0.0, 0.02], 0.1, 3) == 1``; ``collapse_onset([0.05, 0.5, 0.0], 0.1, 2) is None``.
    """
    run = 0
    for v in reversed(values):
        if v is None or v >= threshold:
            break
        run += 1
    return len(values) - run if run >= patience and run > 0 else None


class _Guard:
    """The collapse guard while a stage trains: the finished fractions so far and the weights that sampled the
    last batch at or above the threshold (a CPU copy, refreshed at each such batch)."""

    def __init__(self, options: CollapseGuard, model: torch.nn.Module) -> None:
        self.options, self.model = options, model
        self.kept: Optional[tuple[Optional[int], dict]] = None  # (batch index or None: stage start, weights)

    def keep(self, step: Optional[int]) -> None:
        self.kept = (step, {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()})

    def check(self, batches: Sequence[dict]) -> Optional[dict]:
        """After a rollout batch's statistics: None (go on; the batch's weights are kept when it is good), or
        the record of a collapse (the model is put back to the kept weights)."""
        values = [r.get("finished_fraction") for r in batches]
        g = self.options
        onset = collapse_onset(values, g.min_finished, g.patience)
        if onset is None:
            if values and values[-1] is not None and values[-1] >= g.min_finished:
                self.keep(len(values) - 1)
            return None
        step, weights = self.kept
        self.model.load_state_dict(weights)
        return {"figure": "finished_fraction", "threshold": g.min_finished, "patience": g.patience,
                "first_batch": onset, "stopped_at_batch": len(values) - 1, "values": values[onset:],
                "weights_of_batch": step}


# ----------------------------------------------------------------------------------------------------------
# the batches


def sample_batch(method: OnPolicyOptions, ctx: StageContext, prompts: Sequence[Example], samples: int,
                 seed: int) -> tuple[list[list[Rollout]], list[int]]:
    """The scored rollout groups of one rollout batch (one group of ``samples`` per prompt, in the order of
    ``prompts``) and the number of prompts each rank sampled.

    Over several ranks (``engine=deepspeed``) each rank samples only its share, the prompts at positions
    ``rank, rank + world_size, rank + 2 world_size, ...``, with the generation seeds they have in the whole
    batch (:func:`opr.rollout.sample_rollouts`' ``indices``), and ``trainer.all_gather`` gives every rank all
    groups, put back in prompt order: what follows (advantages, micro-batches, statistics) is the same on every
    rank and the same as one process's, up to the float rounding of other generation batches (a prompt's
    samples do not depend on the prompts that share its batch otherwise). On one process: all prompts.
    """
    trainer = ctx.trainer
    rank, world = trainer.rank, trainer.world_size
    groups = sample_rollouts(
        ctx.backbone, prompts, ctx.tasks_by_name, samples, method.temperature, method.top_p, ctx.rollout_batch_size,
        seed=seed, compute_dtype=ctx.compute_dtype, max_prompt_tokens=ctx.max_prompt_tokens,
        max_new_tokens=method.max_new_tokens, indices=None if world == 1 else range(rank, len(prompts), world),
    )
    if world == 1:
        return groups, [len(groups)]
    shares = trainer.all_gather(groups)
    return [shares[i % world][i // world] for i in range(len(prompts))], [len(s) for s in shares]



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


def rank_micro_batches(micro: Sequence, rank: int, world_size: int) -> list:
    """This rank's part of an optimizer step over the micro-batches ``micro`` (the whole rollout batch's, the
    same list on every rank): its contiguous share (:func:`opr.distributed.shard_bounds`), evened out to
    ``ceil(len(micro) / world_size)`` with :class:`~opr.engine.base.ZeroWeight` copies of its first micro-batch
    (of ``micro[0]`` when its share is empty), because every rank must run as many forwards and backwards. The
    copies are shallow and made before the step, so what a loss caches on a micro-batch at its first update (the
    behaviour and reference log-probs) is computed on the copy too: the ranks call the frozen models alike.

    ``rank_micro_batches([a, b, c], 0, 2) == [a, ZeroWeight(copy of a)]``; ``... (c, 1, 2) == [b, c]``;
    one rank: ``list(micro)``.
    """
    if world_size == 1:
        return list(micro)
    lo, hi = shard_bounds(len(micro), rank, world_size)
    own = list(micro[lo:hi])
    template = own[0] if own else micro[0]
    return own + [ZeroWeight(copy.copy(template)) for _ in range(-(-len(micro) // world_size) - len(own))]


def gather_micro_batches(trainer: Trainer, local: Sequence) -> list:
    """Every rank's real micro-batches of ``local`` (:func:`rank_micro_batches`' part, after the step: with what
    the loss cached on them), in the order of the whole batch, on every rank; their tensors travel on the CPU."""
    own = [_on_cpu(mb) for mb in local if not isinstance(mb, ZeroWeight)]
    return [mb for share in trainer.all_gather(own) for mb in share]


def _on_cpu(mb):
    """A shallow copy of the dataclass ``mb`` with its tensor fields on the CPU (pickled for another rank)."""
    moved = {f.name: getattr(mb, f.name).cpu() for f in dataclasses.fields(mb)
             if isinstance(getattr(mb, f.name), torch.Tensor)}
    return dataclasses.replace(mb, **moved) if moved else mb


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
    collapse: Optional[dict] = None  # the collapse guard's record, when it ended the stage

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

    def per_step(self, key: str) -> list:
        """``key`` of every rollout batch in order (None where it was not measured, e.g. a skipped batch's
        update figures); the first update's value for the figures of an update."""
        return [r.get(key) for r in self.batches]

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
            "mean_entropy": mean("entropy", updates),
            "finished_fraction_per_step": self.per_step("finished_fraction"),
            "entropy_per_step": self.per_step("entropy"),
        }
        shares = [r["prompts_per_rank"] for r in batches if "prompts_per_rank" in r]
        if shares:  # several ranks: the prompts each rank sampled over the stage
            out["prompts_per_rank"] = [sum(n) for n in zip(*shares)]
        micro = [r["micro_batches_per_rank"] for r in updates if "micro_batches_per_rank" in r]
        if micro:  # several ranks: the micro-batches each rank trained on over the stage (its part of each step)
            out["micro_batches_per_rank"] = [sum(n) for n in zip(*micro)]
        if self.collapse is not None:
            out["collapse"] = self.collapse
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
    stop_on_collapse: Optional[CollapseGuard]  # None: no collapse guard


def train_on_policy(
    method: OnPolicyOptions,
    ctx: StageContext,
    data: StageData,
    samples: int,
    make_batches: Callable[[StageContext, list[list[Rollout]]], tuple[list, dict]],
    loss_fn: Callable,
    skip: Optional[Callable[[list], bool]] = None,
    after_step: Optional[Callable[[], None]] = None,
    keep: Optional[Mapping[str, torch.nn.Module]] = None,
    lr: Optional[float] = None,
    carry: Optional[dict] = None,
) -> StepLog:
    """Trains one stage on rollouts of the prompt pool of ``data`` (module docstring); returns its records.

    ``samples``: responses per prompt. A batch without micro-batches (no response has a token), or one for
    which ``skip(micro_batches)`` is true, takes no optimizer step (counted in ``StepLog.skipped``).
    ``after_step()`` runs after every optimizer step (e.g. an EMA teacher's update). ``keep``: the method's
    extra models whose weights belong to the stage's position (a frozen stage-start reference, an EMA
    teacher: ``trainer.frozen_model``'s), saved in mid-stage states (``trainer.frozen_state_dict``: the full
    weights, gathered on rank 0 under ZeRO-3, written once with the position) and loaded back when the trainer
    resumes one (``trainer.load_frozen_state_dict``: under ZeRO-3 each rank keeps its part). ``lr``: the schedule's
    learning rate (None: ``engine.lr``). ``carry``: the caller's own record, saved with every position under
    ``"carry"`` (the RL phase of ``sft_then_grpo`` keeps its SFT phase's statistics there); a caller reads it
    back from ``trainer.pending_resume`` before calling this on a resume.
    """
    trainer, keep = ctx.trainer, dict(keep or {})
    trainer.begin_stage(method.steps * method.updates_per_batch, lr=lr)
    resume = trainer.resume_position()
    guard = _Guard(method.stop_on_collapse, ctx.backbone.model) if method.stop_on_collapse is not None else None
    start, pending = 0, None  # pending: (micro-batches, next update) of a batch resumed between its updates
    if resume is None:
        pool, log = check_data(data, method.name), StepLog()
        if guard is not None:
            guard.keep(None)  # the stage-start weights, until a batch passes
    else:
        pool, log, start, pending = _restore(method, trainer, resume, keep, guard)
    schedule = prompt_schedule(pool, method.prompts_per_step, method.steps, f"{method.name}/{ctx.seed}/{ctx.stage}")
    prompts_saved = [dataclasses.asdict(e) for e in pool]
    world = trainer.world_size

    def position(step: int, update: int, micro: list) -> dict:
        """The stage's position after update ``update`` of rollout batch ``step`` (see the module docstring)."""
        more = update + 1 < method.updates_per_batch
        return {"on_policy": {
            "method": method.name, "prompts": prompts_saved, "step": step, "update": update,
            "micro": micro if more else None, "rows": list(log.rows), "skipped": log.skipped,
            "seconds_rollout": log.seconds_rollout,
            "modules": {k: trainer.frozen_state_dict(m) for k, m in keep.items()},
            "kept": guard.kept if guard is not None else None,
        }, **({"carry": carry} if carry is not None else {})}

    bar = tqdm(total=method.steps, initial=start, desc=f"stage {ctx.stage} {ctx.task.name} {method.name}",
               unit="batch", leave=False, dynamic_ncols=True)

    def tick(row: dict) -> None:
        bar.update(1)
        if "reward" in row:
            bar.set_postfix(reward=f"{row['reward']:.1f}", finished=f"{row['finished_fraction']:.2f}",
                            skipped=log.skipped)

    try:
        for step in range(start, method.steps):
            first = 0
            if pending is not None:
                (micro, first), pending = pending, None
                row: dict = {}
            else:
                clock = time.perf_counter()
                groups, shares = sample_batch(method, ctx, schedule[step], samples, step_seed(ctx.seed, ctx.stage, step))
                log.seconds_rollout += time.perf_counter() - clock
                row = batch_stats(groups, method.min_reward)
                if len(shares) > 1:  # several ranks: the prompts each sampled
                    row["prompts_per_rank"] = shares
                if guard is not None:
                    log.collapse = guard.check(log.batches + [row])
                    if log.collapse is not None:
                        log.rows.append(row)
                        _warn_collapse(ctx, log.collapse)
                        break
                micro, extra = make_batches(ctx, groups)
                row.update(extra)
                if not micro or (skip is not None and skip(micro)):
                    log.skipped += method.updates_per_batch
                    log.add(row, trainer)
                    tick(row)
                    continue
            for update in range(first, method.updates_per_batch):
                local = rank_micro_batches(micro, trainer.rank, world)  # over several ranks: this rank's part
                synced = [micro]  # the whole batch's micro-batches after the step (all ranks' caches in them)

                def after(out: dict, step=step, update=update, row=row, local=local, synced=synced) -> Callable[[], dict]:
                    if after_step is not None:
                        after_step()
                    if world > 1 and update + 1 < method.updates_per_batch:
                        # the next update, and a position saved at this step, need the log-probs each rank's loss
                        # cached on its own micro-batches at this first update
                        synced[0] = gather_micro_batches(trainer, local)
                    # out["tokens"]: the trainer's count of the batch's supervised tokens (over all ranks)
                    if world > 1:  # the real micro-batches each rank ran
                        out["micro_batches_per_rank"] = [
                            hi - lo for lo, hi in (shard_bounds(len(synced[0]), r, world) for r in range(world))]
                    log.add({**(row if update == 0 else {}), **out, "update": update}, trainer)
                    return lambda: position(step, update, synced[0])

                trainer.optimizer_step(local, loss_fn, [mb.num_targets for mb in local], after=after)
                micro = synced[0]
            tick(row)
    finally:
        bar.close()
    return log


def _restore(method, trainer: Trainer, resume: dict, keep: Mapping[str, torch.nn.Module], guard: Optional[_Guard]):
    """(pool, log, first step, pending batch) of a stage resumed from ``position``'s saved dict; loads the
    weights of ``keep`` and the guard's kept weights."""
    pos = resume.get("on_policy")
    if pos is None or pos["method"] != method.name:
        raise RuntimeError(f"cannot resume {method.name!r}: the saved mid-stage position is not this method's")
    for name, module in keep.items():
        trainer.load_frozen_state_dict(module, pos["modules"][name])
    if guard is not None:
        guard.kept = pos["kept"]
    log = StepLog(rows=list(pos["rows"]), seconds_rollout=pos["seconds_rollout"], skipped=pos["skipped"])
    pool = [Example(**e) for e in pos["prompts"]]
    if pos["micro"] is not None:  # between two updates of one rollout batch
        return pool, log, pos["step"], (pos["micro"], pos["update"] + 1)
    return pool, log, pos["step"] + 1, None


def _warn_collapse(ctx: StageContext, record: dict) -> None:
    kept = record["weights_of_batch"]
    logger.warning(
        "stage %d (%s): collapse: finished fraction below %s for %d rollout batches in a row (batches %d-%d: %s); "
        "the stage ends here and the model goes back to the weights %s",
        ctx.stage, ctx.task.name, record["threshold"], len(record["values"]), record["first_batch"],
        record["stopped_at_batch"], ", ".join(f"{v:.3f}" for v in record["values"]),
        "of the stage start" if kept is None else f"that sampled batch {kept}")

