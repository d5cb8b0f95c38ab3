"""The trainer contract: what the loop and the methods may use of a training engine, and nothing else.

Two engines implement it: :class:`~opr.engine.torch_engine.TorchTrainer` (one process) and
:class:`~opr.engine.deepspeed_engine.DeepSpeedTrainer` (ZeRO over the ranks of a process group). The loop
(:mod:`opr.loop`), the run (:mod:`opr.run`) and the methods (:mod:`opr.methods`, through
:class:`~opr.methods.base.StageContext`) call only the members of :class:`Trainer`, without probing which
engine they have: the single-process engine implements the distributed members as the world of one they
describe (rank 0 of 1, ``barrier`` returns at once, ``any_rank(flag)`` is ``flag``, ``all_gather(obj)`` is
``[obj]``, ``rank_state`` is None).

A stage's training, as the loop drives it::

    trainer.set_stage(t)                       # loop: before the stage's training
    trainer.step_hook = hook                   # loop: mid-stage states and stop requests
    method.train_stage(ctx, data)              # either trainer.fit_sft(examples) (SFT methods) or
                                               #   trainer.begin_stage(n); trainer.resume_position();
                                               #   trainer.optimizer_step(..., after=...) x n
    trainer.step_hook = None

Every optimizer step of the stage reaches ``step_hook`` exactly once, whichever way the method trains. Steps of
the stage's first ``fit_sft``, and steps whose method passes ``after`` returning its position (the on-policy
loop, :mod:`opr.methods.on_policy`), come with a resumable position (``make_state``), see
:attr:`Trainer.step_hook`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from opr.types import SFTExample

# ``step_hook(stage_step, make_state)``: ``make_state`` returns a resumable fit position, or is None where the
# trainer knows of none (see Trainer.step_hook).
StepHook = Callable[[int, Optional[Callable[[], dict]]], None]
# ``loss_fn(model, micro_batch) -> (Σ loss over the micro-batch's units, metrics)`` for ``optimizer_step``.
LossFn = Callable[["torch.nn.Module", Any], "tuple[torch.Tensor, dict]"]
# ``after(metrics) -> position or None`` for ``optimizer_step``: the method's bookkeeping of a step, run before
# the step hook; ``position()`` returns the method's resumable position after the step (a torch-picklable dict).
AfterStep = Callable[[dict], Optional[Callable[[], dict]]]


@dataclass(frozen=True)
class ZeroWeight:
    """A micro-batch that a rank runs with weight zero, only to keep in step with the other ranks: ZeRO's
    collectives need every rank in every forward and backward of an optimizer step, so a rank whose share of a
    step is one micro-batch short runs ``batch`` (a copy of a real micro-batch) again and adds nothing to the loss,
    the gradient, the token count or the metrics. Made by :func:`opr.methods.on_policy.rank_micro_batches`; the
    multi-rank trainer's ``optimizer_step`` unwraps it (one process never receives one)."""

    batch: Any
    num_targets = 0  # the units it counts: none


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the stage is stopped and nothing from it is kept."""


@dataclass
class TrainStats:
    """What ``fit_sft`` measured (a stage's ``train`` entry in results.json, via :meth:`as_dict`)."""

    steps: int = 0
    examples: int = 0
    supervised_tokens: int = 0
    seconds: float = 0.0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    mean_loss: float = float("nan")
    mean_grad_norm: float = float("nan")

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tokens_per_second"] = self.supervised_tokens / self.seconds if self.seconds > 0 else 0.0
        return d


@runtime_checkable
class Trainer(Protocol):
    """A training engine as the loop, the run and the methods see it.

    Attributes the engine sets at construction and the others read: ``rank``, ``world_size``,
    ``batch_size``, ``grad_accum``, ``max_length``, ``compute_dtype``, ``device``, ``epochs_per_task``,
    ``logger``. Attributes the loop writes: ``global_step`` (restored on resume and from the stage cache),
    ``step_hook``, ``pending_resume``.
    """

    rank: int
    """This process's rank (0 on one process). The run writes files on rank 0 only (``is_main``)."""

    world_size: int
    """Number of ranks training together (1 on one process). The loop records it and the global batch."""

    global_step: int
    """Optimizer steps over the whole run. Advanced by ``optimizer_step``; set by the loop when it restores a
    training state or takes a stage from the stage cache; read by the loop (state markers, cache records) and
    by methods that log their own steps."""

    batch_size: int
    """Sequences per micro-batch on each rank (``engine.batch_size``). Methods with their own objective cut
    their micro-batches to it; the loop records it."""

    grad_accum: int
    """Micro-batches per optimizer step (``engine.grad_accum``); recorded by the loop."""

    max_length: int
    """Token limit of a training sequence (prompt + response, see ``tokenize``); methods encode their own
    sequences to it and the loop's diagnostics score at it."""

    compute_dtype: str
    """``float32``, ``bfloat16`` or ``float16``: the autocast dtype of training; the run evaluates in it too."""

    device: torch.device
    """Where the model lives for training (set once at construction; generation and evaluation follow it)."""

    epochs_per_task: dict[str, float]
    """Per-task epoch overrides (``engine.epochs_per_task``); the run checks that they name tasks of the stream."""

    logger: Any
    """The run's logger (``log_step(metrics, step)``) or None. ``fit_sft`` logs its steps through it; methods
    that call ``optimizer_step`` themselves log theirs."""

    last_step: Optional[dict]
    """The metrics ``optimizer_step`` returned for the latest optimizer step (``loss``, ``grad_norm``, ``lr``,
    ...), None before the first: what the step hook may read about the step it follows."""

    step_hook: Optional[StepHook]
    """Set by the loop before a stage's training, reset to None after it. The trainer calls
    ``step_hook(stage_step, make_state)`` once after every optimizer step of the stage, on every rank together
    (``stage_step``: steps done in the stage so far): from ``optimizer_step`` itself, or, inside ``fit_sft``,
    from ``fit_sft`` right after it has recorded the step (so that the position includes it).

    ``make_state()`` returns the fit position after this step (data position, statistics, ``state_dict()``
    under ``trainer``): what ``pending_resume`` takes to continue the stage. It is given for steps of a stage's
    *first* ``fit_sft``, and for a method's own ``optimizer_step`` whose ``after`` returned a position (the
    method's part, with the trainer's ``state_dict()`` added under ``trainer``); elsewhere (a later ``fit_sft``
    of the same stage, a method without a position) it is None and no mid-stage training state can be made at
    that step. The loop saves mid-stage states (``checkpoint.every_steps``, stop requests) from
    the hook; it may stop the process from it (a signal), so the hook must run where every rank is between
    steps."""

    pending_resume: Optional[dict]
    """A fit position (from ``make_state``, plus ``rank_states``: the folder of the per-rank files, or None)
    that the loop sets before resuming a stage interrupted mid-way. The stage's next ``fit_sft`` continues
    from it, or a method's own loop takes it with ``resume_position``; either resets it to None. The loop fails
    the stage if it is still set afterwards (the method took no position)."""

    def set_stage(self, stage: int) -> None:
        """Called by the loop before stage ``stage``'s training (also a resumed one): the stage seeds the batch
        order and ``fit_sft`` counts its calls per stage from here."""
        ...

    def begin_stage(self, total_steps: int, lr: Optional[float] = None) -> None:
        """A fresh optimizer and a learning-rate schedule over ``total_steps`` optimizer steps, peaking at ``lr``
        (None: ``engine.lr``). Called by ``fit_sft``, and by methods with their own objective before their first
        ``optimizer_step`` (also by a later phase of a two-phase stage, ``sft_then_grpo``: a fresh optimizer
        and schedule at its own learning rate)."""
        ...

    def resume_position(self) -> Optional[dict]:
        """For a method with its own objective, right after ``begin_stage``: when ``pending_resume`` holds a
        position saved from its steps (``optimizer_step``'s ``after``), restore the optimizer and the schedule
        from it, reset ``pending_resume`` and return the method's part of it (without ``trainer`` and
        ``rank_states``); else None. Called by :func:`opr.methods.on_policy.train_on_policy`."""
        ...

    def optimizer_step(self, micro_batches: Sequence, loss_fn: LossFn, counts: Sequence[int],
                       after: Optional[AfterStep] = None) -> dict:
        """One optimizer step over ``micro_batches`` (this rank's; over several ranks the step covers every
        rank's); returns ``loss``, ``lr``, ``grad_norm``, ``tokens`` (over all ranks) and the means of
        ``loss_fn``'s metrics over the micro-batches of all ranks. Called by ``fit_sft`` and by methods with their
        own objective (every rank together, with the same number of micro-batches; a :class:`ZeroWeight`
        micro-batch, with count 0, evens out a rank's share and counts for nothing).

        ``loss_fn(model, micro_batch) -> (loss_sum, metrics)`` returns a *sum* over ``counts[i]`` units; the
        step minimises the total over all micro-batches divided by ``sum(counts)`` (over all ranks). Raises
        :class:`NonFiniteLoss` on a NaN/inf loss or gradient norm. Advances ``global_step``, then runs
        ``after(metrics)`` (a method's bookkeeping of the step: an EMA teacher, its records), then calls
        ``step_hook`` (outside ``fit_sft``), with ``make_state`` made from the position ``after`` returned
        (None without one)."""
        ...

    def fit_sft(self, examples: Sequence[SFTExample], desc: str = "train", task: Optional[str] = None,
                steps: Optional[int] = None) -> TrainStats:
        """Completion-only SFT on ``examples`` for the task's epochs (``begin_stage`` included), or for exactly
        ``steps`` optimizer steps (cycling the examples epoch after epoch); continues from ``pending_resume``
        when set. Called by :func:`opr.methods.base.train_sft` (every SFT method) and by the SFT phase of
        ``sft_then_grpo`` (with ``steps``)."""
        ...

    def num_optimizer_steps(self, num_micro_batches: int, task: Optional[str] = None) -> int:
        """Optimizer steps ``fit_sft`` takes over ``num_micro_batches`` micro-batches per epoch (the task's
        epochs, capped at ``engine.max_steps``)."""
        ...

    def tokenize(self, ex: SFTExample) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids [+ EOS]) of an example as ``fit_sft`` trains it, cut to ``max_length``."""
        ...

    def full_state_dict(self) -> dict:
        """The model's full weights for a training state. Called by the loop on every rank together (under
        ZeRO-3 inside training it is a collective); only rank 0's result is written."""
        ...

    def rank_state(self) -> Optional[dict]:
        """This rank's share of a mid-stage training state that only this rank holds (its ZeRO optimizer
        partition), written by the rank itself to ``ranks/rank<r>.pt``; None when ``make_state``'s position
        holds everything (one process: no ``ranks/`` folder). Called by the loop on every rank together."""
        ...

    def frozen_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen (eval mode, no gradients) model with ``model``'s weights, laid out like the policy: GRPO's KL
        reference and ``self_distill``'s frozen, EMA or base teacher (``model``: the policy, or a model of the
        same architecture such as the reloaded base). Called by the methods at the start of a stage, on every
        rank together, between training calls. The torch engine and ZeRO-2 return a full copy on the policy's
        device and in its dtype; ZeRO-3 returns a module partitioned like the policy (each rank holds 1/W of
        every parameter; its forward gathers each layer's parameters while it runs and releases them after, so
        every rank must call it together, as the on-policy loss functions do). The model is valid until the next
        ``set_stage``: ZeRO-3 then reuses its partitions for the next stage's frozen model."""
        ...

    def frozen_state_dict(self, frozen: torch.nn.Module) -> dict:
        """The full weights of a model from ``frozen_model``, for a mid-stage training state (the on-policy
        position's ``modules``). Called on every rank together (under ZeRO-3 each parameter is gathered in turn
        and copied to rank 0's host memory); only rank 0's result is written, the other ranks get an empty
        dict under ZeRO-3."""
        ...

    def load_frozen_state_dict(self, frozen: torch.nn.Module, state: dict) -> None:
        """Load :meth:`frozen_state_dict`'s weights (as saved by rank 0) into a model from ``frozen_model``.
        Called on every rank together when a stage resumes (under ZeRO-3 each rank keeps its own part)."""
        ...

    def ema_update(self, frozen: torch.nn.Module, rate: float) -> None:
        """frozen ← (1 - rate) · frozen + rate · policy, for a model from ``frozen_model`` (an EMA teacher);
        called after every optimizer step on every rank together. Under ZeRO-3 each rank updates its partition
        of every parameter from the policy's partition (the same layout): nothing is gathered."""
        ...

    def inference(self) -> contextlib.AbstractContextManager:
        """Within: the model's full weights are usable for generation and evaluation on every rank, with no
        collective inside its forward (ZeRO-3 gathers them on entry and partitions them again on exit; elsewhere
        nothing to do). Every rank enters together. Called by observers that evaluate inside a stage's training
        (:class:`opr.observers.InsideStageEval`); between training calls the model is already whole."""
        ...

    def barrier(self) -> None:
        """Wait until every rank gets here (returns at once on one process). Called by the loop around the
        writing of per-rank files."""
        ...

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (``flag`` on one process). Called by the loop's step
        hook on every rank together, so that a stop signal that reached one rank stops all at the same step."""
        ...

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (a picklable object), in rank order, on every rank (``[obj]`` on one process).
        Called by the on-policy loop on every rank together: each rank samples its share of a rollout batch
        and all ranks get the whole batch (:func:`opr.methods.on_policy.sample_batch`)."""
        ...
