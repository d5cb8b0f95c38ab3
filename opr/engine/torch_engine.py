"""The single-process trainer: AdamW, warm-up + constant/cosine schedule, clipping, accumulation.

Training data arrive as :class:`~opr.types.SFTExample` lists (``fit_sft``), or, for methods with their own
objective, as a loss function over micro-batches (``optimizer_step``). Batches are padding-free (see
:mod:`opr.losses.sft`) and grouped by length so that a step's micro-batches hold similar amounts of work.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from opr.backbones import Backbone, keep_last
from opr.config import check_options
from opr.engine.base import AfterStep, LossFn, NonFiniteLoss, StepHook, TrainStats  # (re-exported too)
from opr.generation import autocast
from opr.losses.sft import PackedBatch, pack, target_logits, token_nll
from opr.types import SFTExample

log = logging.getLogger("opr")

DATA_ORDERS = ("paired", "shuffled")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "linear":
        return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))
    raise ValueError(f"unknown lr schedule {schedule!r}; allowed: constant, cosine, linear")


def make_adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
               fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on norms, biases and other 1-D parameters.

    ``fused=True`` uses torch's fused kernel where the parameters live on CPU or CUDA (the same update rule;
    on CPU torch otherwise steps each parameter tensor in a Python loop, ~0.2 s of a SmolLM2 step).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = fused and all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``engine.device``: ``auto`` (the GPU when there is one, else the CPU), ``cpu`` or ``cuda``."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"engine.device must be one of {list(DEVICES)} (or cuda:N), got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"engine.device={device} but torch sees no CUDA device (torch {torch.__version__}); "
                         "use engine.device=auto or cpu")
    return torch.device(device)


class TorchTrainer:
    """Trains a backbone in place. A new optimizer and schedule are made at each stage (``begin_stage``).

    Implements :class:`opr.engine.base.Trainer` (see there for who calls what); the distributed members
    describe a world of one: rank 0 of 1, ``barrier``, ``any_rank`` and ``all_gather`` do nothing, ``rank_state``
    is None.
    """

    world_size = 1
    rank = 0

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.0,
        schedule: str = "constant",
        max_grad_norm: Optional[float] = 1.0,
        batch_size: int = 8,
        grad_accum: int = 1,
        max_length: int = 256,
        compute_dtype: str = "float32",
        epochs: float = 1.0,
        epochs_per_task: Optional[dict[str, float]] = None,
        max_steps: Optional[int] = None,
        log_every: int = 1,
        data_order: str = "paired",
        device: str = "auto",
        seed: int = 0,
        logger=None,
    ) -> None:
        # the config's ranges (opr.config.RANGES), for a trainer made in code too: engine.epochs=0 would
        # otherwise end in an IndexError after the stage's data was built
        check_options("engine", dict(
            lr=lr, weight_decay=weight_decay, betas=betas, warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm,
            batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, epochs=epochs,
            epochs_per_task=dict(epochs_per_task or {}), max_steps=max_steps, log_every=log_every))
        if data_order not in DATA_ORDERS:
            raise ValueError(f"engine.data_order must be one of {list(DATA_ORDERS)}, got {data_order!r}")
        lr_factor(0, 1, 0, schedule)  # validates the schedule name before any training
        self.backbone = backbone
        self.model = backbone.model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_ratio, self.schedule, self.max_grad_norm = warmup_ratio, schedule, max_grad_norm
        self.batch_size, self.grad_accum, self.max_length = batch_size, grad_accum, max_length
        self.compute_dtype, self.epochs, self.max_steps = compute_dtype, epochs, max_steps
        self.epochs_per_task = dict(epochs_per_task or {})
        self.log_every, self.seed, self.logger = log_every, seed, logger
        self.data_order = data_order
        self.global_step = 0
        self.optimizer: Optional[torch.optim.Optimizer] = None
        # The model moves to the training device once, here; generation and evaluation follow it.
        self.device = resolve_device(device)
        self.model.to(self.device)
        self._keep_fp32_master()
        # Resume support (set by the loop). ``stage`` seeds the batch order together with the seed and the
        # epoch, so the order depends on nothing else (not on what ran before in this process).
        self.stage = 0
        self.stage_fit_calls = 0
        # ``step_hook(stage_step, make_state)`` runs after every optimizer step (see Trainer.step_hook);
        # ``make_state()`` returns the fit position (see ``fit_sft``) for a mid-stage training state, and is
        # None outside a stage's first ``fit_sft``.
        self.step_hook: Optional[StepHook] = None
        self.last_step: Optional[dict] = None  # the latest optimizer step's metrics (loss, ...), for the hook
        self._fitting = 0  # > 0 inside fit_sft, which calls the step hook itself (with the fit position)
        # A fit position saved by ``step_hook``'s ``make_state``: the next ``fit_sft`` continues from it.
        self.pending_resume: Optional[dict] = None

    def _keep_fp32_master(self) -> None:
        """The weights AdamW updates are fp32 (master weights); ``compute_dtype`` is autocast's. A backbone
        loaded in 16 bits (the hub presets' ``dtype: bfloat16``) is cast up once here: updating 16-bit weights
        directly loses the small steps of a low learning rate to rounding."""
        low = sorted({str(p.dtype) for p in self.model.parameters() if p.dtype != torch.float32})
        if low:
            log.info("the backbone's weights are %s: training keeps fp32 master weights (computing in %s)",
                     ", ".join(low), self.compute_dtype)
            self.model.float()

    def set_stage(self, stage: int) -> None:
        """Called by the loop before each stage's training."""
        self.stage, self.stage_fit_calls = stage, 0

    # ------------------------------------------------------------------ distribution (a world of one)
    def inference(self) -> contextlib.AbstractContextManager:
        """Nothing to gather: the model is whole on one process."""
        return contextlib.nullcontext()

    def barrier(self) -> None:
        """Nothing to wait for on one process."""

    def any_rank(self, flag: bool) -> bool:
        """``flag``: this process is every rank."""
        return flag

    def all_gather(self, obj: Any) -> list:
        """``[obj]``: this process is every rank."""
        return [obj]

    def rank_state(self) -> Optional[dict]:
        """None: the fit position and the weights hold the whole training state (no ``ranks/`` folder)."""
        return None

    # ------------------------------------------------------------------ frozen models (reference, teacher)
    def frozen_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A full frozen copy of ``model`` (:func:`opr.rollout.frozen_copy`) on the policy's device, in its dtype."""
        from opr.rollout import frozen_copy

        weights = next(self.model.parameters())
        return frozen_copy(model, device=weights.device, dtype=weights.dtype)

    def frozen_state_dict(self, frozen: torch.nn.Module) -> dict:
        """``frozen.state_dict()``: the copy is whole on one process."""
        return frozen.state_dict()

    def load_frozen_state_dict(self, frozen: torch.nn.Module, state: dict) -> None:
        """``frozen.load_state_dict(state)``."""
        frozen.load_state_dict(state)

    @torch.no_grad()
    def ema_update(self, frozen: torch.nn.Module, rate: float) -> None:
        """frozen ← (1 - rate) · frozen + rate · policy, parameter by parameter, in the frozen copy's dtype."""
        for pf, pp in zip(frozen.parameters(), self.model.parameters(), strict=True):
            pf.lerp_(pp.detach().to(device=pf.device, dtype=pf.dtype), rate)

    # ------------------------------------------------------------------ training states (mid-stage resume)
    def state_dict(self) -> dict:
        """Optimizer state and schedule position of the current stage (for a mid-stage training state)."""
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "stage_step": self.stage_step, "stage_total": self.stage_total, "warmup": self.warmup,
            "global_step": self.global_step,
        }

    def full_state_dict(self) -> dict:
        """The model's full weights for a training state (the DeepSpeed trainer gathers ZeRO-3 partitions)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` after ``begin_stage`` made this stage's optimizer."""
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.stage_step, self.stage_total = state["stage_step"], state["stage_total"]
        self.warmup, self.global_step = state["warmup"], state["global_step"]

    # ------------------------------------------------------------------ data
    def tokenize(self, ex: SFTExample) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids [+ EOS]), cut to ``max_length``: prompts lose their start, responses their end.

        The response is ``ex.response_ids`` when given (a rollout's own sampled tokens), else ``ex.response``
        encoded; the tokenizer's EOS is appended only when ``ex.finished`` (a response cut at the token limit
        never chose to stop). The prompt is encoded as generation encodes it (``Backbone.encode_prompt``: the
        family's BOS where it expects one) and keeps a leading BOS when cut.
        """
        tok = self.backbone.tokenizer
        prompt = self.backbone.encode_prompt(self.backbone.format_prompt(ex.prompt, ex.chat))
        if ex.response_ids is not None:
            response = list(ex.response_ids)
        else:
            response = tok(ex.response, add_special_tokens=False)["input_ids"]
        if ex.finished:
            response = response + [tok.eos_token_id]
        if not response:
            raise ValueError(f"example {ex.example_id or ex.prompt[:40]!r} has an empty, unfinished response: "
                             "nothing to train")
        room = self.max_length - len(response)
        if room < 1:  # keep at least one prompt token; cut the response on the right
            response = response[: self.max_length - 1]
            room = 1
        return keep_last(tok, prompt, room), response

    def batch_plan(self, examples: Sequence[SFTExample], epoch: int, task: Optional[str] = None,
                   lengths: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Indices into ``examples`` of each micro-batch of one epoch, in training order.

        ``data_order="paired"`` (default; stratified placement): the examples of the current ``task`` are
        shuffled by (seed, stage, epoch) only and cut into ``K = ceil(n_current / batch_size)`` micro-batches,
        so every method with the same seed trains on the *same current-task batches in the same order*
        (whatever it replays); the other examples (replay) are ordered by a hash of (seed, stage, epoch,
        example id) and example j of R joins micro-batch ``floor((j + 0.5) * K / R)``: evenly spaced over the
        stage, on top of the current-task examples. Vanilla, OPR and low-score replay then differ only in the
        replayed responses. Without a ``task`` (or with no current-task example) every example counts as
        current.

        ``data_order="shuffled"`` (the earlier behaviour): one shuffle of all examples, sorted by length within
        windows of 32 micro-batches, then the micro-batches shuffled (length-grouped sampling): replay lands
        wherever the shuffle puts it, and a different replay count reshuffles the current task too.

        Either order depends only on (seed, stage, epoch) and the examples, so a resumed run rebuilds it exactly.
        ``lengths`` (tokens per tokenized example) saves ``shuffled`` from tokenizing again.
        """
        B = self.batch_size
        if self.data_order == "shuffled":
            rng = random.Random((self.seed * 1_000_003 + self.stage) * 1_000_003 + epoch)
            if lengths is None:
                lengths = [len(p) + len(r) for p, r in (self.tokenize(e) for e in examples)]
            order = list(range(len(examples)))
            rng.shuffle(order)
            window = B * 32
            plan: list[list[int]] = []
            for w in range(0, len(order), window):
                chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
                plan.extend(chunk[i : i + B] for i in range(0, len(chunk), B))
            rng.shuffle(plan)
            return plan
        current = [i for i, e in enumerate(examples) if task is None or e.task == task]
        if not current:
            current = list(range(len(examples)))
        other = sorted(set(range(len(examples))) - set(current))
        random.Random(f"order/{self.seed}/{self.stage}/{epoch}").shuffle(current)
        K = math.ceil(len(current) / B)
        plan = [current[k * B : (k + 1) * B] for k in range(K)]

        def slot_key(i: int) -> tuple[str, int]:
            ex = examples[i]
            digest = hashlib.sha256(f"{self.seed}/{self.stage}/{epoch}/{ex.task}/{ex.example_id}".encode()).hexdigest()
            return digest, i

        other.sort(key=slot_key)
        R = len(other)
        for j, i in enumerate(other):
            plan[int((j + 0.5) * K / R)].append(i)
        return plan

    def batches(self, examples: Sequence[SFTExample], epoch: int,
                task: Optional[str] = None) -> list[list[tuple[list[int], list[int]]]]:
        """The micro-batches of one epoch as (prompt ids, response ids) lists, in the order of :meth:`batch_plan`."""
        seqs = [self.tokenize(e) for e in examples]
        plan = self.batch_plan(examples, epoch, task, lengths=[len(p) + len(r) for p, r in seqs])
        return [[seqs[i] for i in b] for b in plan]

    def micro_batches_per_epoch(self, examples: Sequence[SFTExample], task: Optional[str] = None) -> int:
        return len(self.batch_plan(examples, 0, task))

    def num_optimizer_steps(self, num_micro_batches: int, task: Optional[str] = None) -> int:
        """Optimizer steps for a stage of ``num_micro_batches`` micro-batches per epoch: ``epochs`` (or the
        task's entry in ``epochs_per_task``) over them, capped at ``max_steps``."""
        epochs = self.epochs_per_task.get(task, self.epochs) if task else self.epochs
        steps = math.ceil(epochs * num_micro_batches / self.grad_accum)
        return min(steps, self.max_steps) if self.max_steps else steps

    # ------------------------------------------------------------------ optimisation
    def begin_stage(self, total_steps: int, lr: Optional[float] = None) -> None:
        self.stage_lr = self.lr if lr is None else lr
        self.optimizer = make_adamw(self.model, self.stage_lr, self.betas, self.weight_decay, fused=True)
        self.stage_total = max(1, total_steps)
        self.stage_step = 0
        self.warmup = int(round(self.warmup_ratio * self.stage_total))

    def current_lr(self) -> float:
        return self.stage_lr * lr_factor(self.stage_step, self.stage_total, self.warmup, self.schedule)

    def resume_position(self) -> Optional[dict]:
        """A method's own position from ``pending_resume`` (see :meth:`opr.engine.base.Trainer.resume_position`),
        its optimizer and schedule restored; None when nothing is pending. Call after ``begin_stage``."""
        pending, self.pending_resume = self.pending_resume, None
        if pending is None:
            return None
        if "trainer" not in pending or "epoch" in pending:
            raise RuntimeError("cannot resume: the saved mid-stage position is fit_sft's, not a method's own steps")
        self.load_state_dict({**pending["trainer"], "rank_states": pending.get("rank_states")})
        return {k: v for k, v in pending.items() if k not in ("trainer", "rank_states")}

    def optimizer_step(self, micro_batches: Sequence, loss_fn: LossFn, counts: Sequence[int],
                       after: Optional[AfterStep] = None) -> dict:
        """One optimizer step over ``micro_batches``, then the step hook.

        ``loss_fn(model, micro_batch) -> (loss_sum, metrics)`` returns a *sum* over the micro-batch's
        ``counts[i]`` units (supervised tokens); the step minimises the sum over all micro-batches divided by
        ``sum(counts)``, so gradient accumulation gives the same update as one large batch. Each micro-batch
        is backpropagated right after its forward, so memory holds one micro-batch's graph at a time.

        ``after(out)`` (a method's bookkeeping) runs after the step and before the step hook; the position it
        returns (or None) becomes the hook's ``make_state``, with this trainer's :meth:`state_dict` added under
        ``trainer``. Inside ``fit_sft``, which calls the hook itself once it has recorded the step (with the fit
        position on a stage's first fit), the hook is left to it: either way every optimizer step reaches the
        hook once.
        """
        out = self._update(micro_batches, loss_fn, counts)
        self.last_step = out
        position = after(out) if after is not None else None
        if not self._fitting:
            self._call_step_hook(None if position is None else (lambda: {**position(), "trainer": self.state_dict()}))
        return out

    def _call_step_hook(self, make_state: Optional[Callable[[], dict]]) -> None:
        if self.step_hook is not None:
            self.step_hook(self.stage_step, make_state)

    def _update(self, micro_batches: Sequence, loss_fn: LossFn, counts: Sequence[int]) -> dict:
        """The optimizer step itself (see :meth:`optimizer_step`), without the step hook."""
        assert self.optimizer is not None, "begin_stage() must be called before optimizer_step()"
        self.model.train()
        lr = self.current_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        denom = max(1, int(sum(counts)))
        total_loss = 0.0
        extra: dict = {}
        for mb in micro_batches:
            with autocast(self.compute_dtype):
                loss_sum, metrics = loss_fn(self.model, mb)
            if not torch.isfinite(loss_sum):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(f"loss is {float(loss_sum.detach())} at optimizer step {self.stage_step} of the stage")
            (loss_sum / denom).backward()
            total_loss += float(loss_sum.detach())
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / len(micro_batches)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"gradient norm is {grad_norm} at optimizer step {self.stage_step} of the stage")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stage_step += 1
        self.global_step += 1
        return {"loss": total_loss / denom, "lr": lr, "grad_norm": grad_norm, "tokens": denom, **extra}

    # ------------------------------------------------------------------ SFT
    @staticmethod
    def sft_loss(model: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        """Sum of completion-token NLLs of a packed batch (see :mod:`opr.losses.sft`)."""
        batch = batch.to(next(model.parameters()).device)
        return token_nll(target_logits(model, batch), batch.targets).sum(), {}

    def _micro_batch(self, batch: list[tuple[list[int], list[int]]]) -> PackedBatch:
        """One of :meth:`batches` as the packed micro-batch ``optimizer_step`` takes."""
        return pack(batch)

    def fit_sft(self, examples: Sequence[SFTExample], desc: str = "train", task: Optional[str] = None,
                steps: Optional[int] = None) -> TrainStats:
        """Train on ``examples`` for the task's epochs (capped at ``max_steps`` optimizer steps), or for exactly
        ``steps`` optimizer steps when given (passes over the examples in the same per-epoch orders, as many as
        that takes; ``max_steps`` does not apply).

        If ``pending_resume`` holds a fit position (from a mid-stage training state), the optimizer, the
        schedule, the statistics and the data position (epoch, batch index) are restored from it and training
        continues with the next batch, exactly as the interrupted run would have.
        """
        stats = TrainStats(examples=len(examples))
        if not examples:
            return stats
        self.stage_fit_calls += 1
        resume, self.pending_resume = self.pending_resume, None
        if steps is not None and steps < 1:
            raise ValueError(f"fit_sft(steps=...) must be >= 1 or None, got {steps}")
        total = steps if steps is not None else self.num_optimizer_steps(self.micro_batches_per_epoch(examples, task), task)
        self.begin_stage(total)
        losses: list[float] = []
        norms: list[float] = []
        epoch, start = 0, 0
        if resume is not None:
            if resume["total"] != total or resume["num_examples"] != len(examples):
                raise RuntimeError(
                    f"cannot resume: the saved position is for {resume['num_examples']} examples / {resume['total']} "
                    f"steps, this stage has {len(examples)} examples / {total} steps")
            self.load_state_dict({**resume["trainer"], "rank_states": resume.get("rank_states")})
            epoch, start = resume["epoch"], resume["batch"]
            stats.steps, stats.supervised_tokens = resume["steps"], resume["supervised_tokens"]
            losses, norms = list(resume["losses"]), list(resume["norms"])
        first_fit = self.stage_fit_calls == 1  # positions of a stage's first fit only
        micro: list[PackedBatch] = []
        t0 = time.perf_counter()
        bar = tqdm(total=total, initial=stats.steps, desc=desc, leave=False, dynamic_ncols=True)

        def step(micro: list[PackedBatch], next_epoch: int, next_batch: int) -> None:
            t_step = time.perf_counter()
            out = self.optimizer_step(micro, self.sft_loss, [b.num_targets for b in micro])
            stats.steps += 1
            stats.supervised_tokens += out["tokens"]
            losses.append(out["loss"])
            norms.append(out["grad_norm"])
            out["tokens_per_second"] = out["tokens"] / max(1e-9, time.perf_counter() - t_step)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{out['lr']:.1e}", tok_s=f"{out['tokens_per_second']:.0f}")
            if self.logger is not None and stats.steps % self.log_every == 0:
                self.logger.log_step({f"train/{k}": v for k, v in out.items()}, step=self.global_step)
            self._call_step_hook((lambda: {
                "epoch": next_epoch, "batch": next_batch, "steps": stats.steps,
                "supervised_tokens": stats.supervised_tokens, "losses": list(losses), "norms": list(norms),
                "total": total, "num_examples": len(examples), "trainer": self.state_dict(),
            }) if first_fit else None)

        self._fitting += 1  # optimizer_step leaves the hook to step() above
        try:
            while stats.steps < total:
                batches = self.batches(examples, epoch, task)
                for i in range(start, len(batches)):
                    micro.append(self._micro_batch(batches[i]))
                    if len(micro) == self.grad_accum:
                        step(micro, epoch, i + 1)
                        micro = []
                        if stats.steps >= total:
                            break
                if micro and stats.steps < total:  # an epoch's last, partial accumulation is a (smaller) step
                    step(micro, epoch + 1, 0)
                micro = []
                epoch, start = epoch + 1, 0
        finally:
            self._fitting -= 1
        bar.close()
        stats.seconds = time.perf_counter() - t0
        stats.first_loss, stats.last_loss = losses[0], losses[-1]
        stats.mean_loss = sum(losses) / len(losses)
        stats.mean_grad_norm = sum(norms) / len(norms)
        return stats
