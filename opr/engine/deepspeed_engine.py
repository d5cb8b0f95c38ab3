"""Multi-process trainer on DeepSpeed ZeRO (stage 2 or 3), with the interface of :class:`TorchTrainer`.

Launch with ``torchrun --nproc_per_node N train.py engine=deepspeed ...`` (or the ``deepspeed`` launcher):
rank and world size come from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); without them the trainer runs as a world of one. Tokenisation, batching, the SFT loss, the
learning-rate schedule and the statistics are the torch engine's; only the optimisation (ZeRO-partitioned
AdamW, DeepSpeed's backward and step, mixed precision, offload) and the data distribution differ.

Data distribution. A global batch is ``batch_size x grad_accum x world_size`` examples. The examples are
batched exactly as the torch engine batches them with ``batch_size x world_size`` examples per micro-batch
(same shuffle, same length grouping); rank ``r`` takes the ``r``-th contiguous shard of every such global
micro-batch. Each rank's loss is its token-NLL sum divided by the *global* number of supervised tokens (an
all-reduce), times ``world_size`` because DeepSpeed averages gradients over ranks; so one optimizer step is
the same update as the torch engine's step over the global batch, and for the same seed the losses agree.

ZeRO-3 and everything that is not training. Under ZeRO-3 each rank holds a slice of every parameter and
hooks gather them around each module's forward, a collective that every rank must enter in lockstep. The
loop evaluates, rolls out, saves checkpoints and measures drift between training calls with ordinary module
calls whose number differs between ranks (generation stops when its sequences end). So between training
calls the trainer keeps the model *materialised*: all parameters gathered on every rank
(``GatheredParameters`` inside DeepSpeed's ``unwrap_model_for_generation``, entered by every rank at the same
point, the end of a training call) and the ZeRO-3 hooks removed; every rank then holds the full, identical
model and generation, ``state_dict`` and checkpoints work as on one process. Training calls re-partition first.
Changes made to the weights while materialised are not kept (DeepSpeed re-partitions from the slices), which is
fine because nothing outside training changes them after the engine exists (a resume loads its weights before
the first stage's training, before the engine is created). Only rank 0 writes (the loop's ``is_main``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch

from opr import distributed
from opr.backbones import Backbone
from opr.distributed import shard_bounds
from opr.engine.base import LossFn, NonFiniteLoss, TrainStats, ZeroWeight
from opr.engine.torch_engine import TorchTrainer, make_adamw
from opr.losses.sft import PackedBatch, pack
from opr.types import SFTExample

log = logging.getLogger("opr")

ZERO_STAGES = (2, 3)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
OFFLOAD_DEVICES = ("none", "cpu")


def deepspeed_config(
    *,
    zero_stage: int,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    compute_dtype: str = "float32",
    max_grad_norm: Optional[float] = 1.0,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    overlap_comm: bool = False,
) -> dict:
    """The DeepSpeed config dict for these settings (the only place it is made; no JSON files are kept).

    ``batch_size`` is per rank and micro-batch; ``train_batch_size`` is the global batch
    ``batch_size * grad_accum * world_size``. ``compute_dtype`` float32 enables neither ``bf16`` nor ``fp16``;
    float16 uses dynamic loss scaling. ``offload_param`` needs ZeRO-3. The optimizer is the torch AdamW the
    trainer passes in (hence ``zero_allow_untested_optimizer`` and no forced DeepSpeed CPU Adam with offload).
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    for name, value in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if value not in OFFLOAD_DEVICES:
            raise ValueError(f"{name} must be one of {OFFLOAD_DEVICES}, got {value!r}")
    if offload_param != "none" and zero_stage != 3:
        raise ValueError(f"offload_param={offload_param!r} needs zero_stage=3 (parameters are partitioned only "
                         f"by ZeRO-3), got zero_stage={zero_stage}")
    if batch_size < 1 or grad_accum < 1 or world_size < 1:
        raise ValueError(f"batch_size, grad_accum and world_size must be >= 1, got {batch_size}, {grad_accum}, "
                         f"{world_size}")
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": overlap_comm, "contiguous_gradients": True}
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if offload_param != "none":
        zero["offload_param"] = {"device": offload_param, "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_batch_size": batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(max_grad_norm) if max_grad_norm else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if compute_dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif compute_dtype == "float16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    return config


def make_cpu_adam(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float):
    """DeepSpeed's CPU Adam in AdamW mode over the same parameter groups as :func:`make_adamw` (no weight decay
    on norms, biases and other 1-D parameters): the optimizer for ``offload_optimizer=cpu``, whose states and
    step live on the host (a vectorised C++ step instead of torch's per-tensor loop). Its extension is compiled
    on first use (~1 min on a 2-core CPU, then cached by torch)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = make_adamw(model, lr, betas, weight_decay).param_groups
    return DeepSpeedCPUAdam([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=lr,
                            betas=betas, adamw_mode=True)


def init_distributed(timeout_min: float = 30.0) -> tuple[int, int, int]:
    """Join (or make) the default process group from the launcher's environment; returns (rank, world, local rank).

    ``train.py`` joins it before the trainer is built (:func:`opr.run.start_ranks`, which also turns SLURM's
    tasks into ranks); a trainer made directly (a script under ``torchrun``) joins it here. Without launcher
    variables the process is a world of one (rank 0, ``MASTER_ADDR`` localhost). Uses NCCL on GPUs, gloo on
    CPU, ``timeout_min`` minutes per collective; DeepSpeed's shared-memory CPU collectives are switched off first
    (they compile a C++ extension for ~40 s and gloo is enough here).
    """
    import datetime

    import deepspeed
    import torch.distributed as dist

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, default)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # also for a group train.py made
    if not dist.is_initialized() or deepspeed.comm.comm.cdb is None:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_min))
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


class DeepSpeedTrainer(TorchTrainer):
    """:class:`TorchTrainer` whose optimisation runs on DeepSpeed ZeRO over all ranks of the process group.

    ``batch_size`` is per rank and micro-batch; the global batch is ``batch_size * grad_accum * world_size``.
    The DeepSpeed engine is made at the first stage and kept; each later stage starts a fresh AdamW state
    (as the torch engine makes a new optimizer per stage). Of :class:`opr.engine.base.Trainer` it implements
    the distributed members for real (``barrier``, ``any_rank``, ``all_gather``, ``rank_state``); the step hook runs where
    TorchTrainer runs it, after the step (and, outside training calls under ZeRO-3, after re-materialising).
    """

    def __init__(
        self,
        backbone: Backbone,
        zero_stage: int = 2,
        offload_optimizer: str = "none",
        offload_param: str = "none",
        gradient_checkpointing: bool = False,
        collective_timeout_min: float = 30.0,
        **trainer_options: Any,
    ) -> None:
        if trainer_options.get("device", "auto") != "auto":
            raise ValueError(f"engine.device={trainer_options['device']!r} applies to engine=torch; under DeepSpeed "
                             "each rank trains on its own local GPU (or the CPU without one): leave it at auto")
        # lr, batch_size, schedule, ...: TorchTrainer's options; the model stays on the CPU until each rank
        # moves it to its own GPU below
        super().__init__(backbone, **{**trainer_options, "device": "cpu"})
        self.rank, self.world_size, self.local_rank = init_distributed(collective_timeout_min)
        self.zero_stage = zero_stage
        self.offload_optimizer = offload_optimizer
        self.ds_config = deepspeed_config(
            zero_stage=zero_stage, batch_size=self.batch_size, grad_accum=self.grad_accum,
            world_size=self.world_size, compute_dtype=self.compute_dtype, max_grad_norm=self.max_grad_norm,
            offload_optimizer=offload_optimizer,
            offload_param=offload_param)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.model.to(torch.device("cuda", self.local_rank))
            self.device = next(self.model.parameters()).device
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine = None
        self._torch_optimizer: Optional[torch.optim.Optimizer] = None
        self._materialised: Optional[contextlib.AbstractContextManager] = None  # ZeRO-3 gathered-model context
        self._fit_depth = 0
        self._frozen_engines: list = []  # ZeRO-3 frozen models' inference engines (made once, then reused)
        self._frozen_in_use: list = []  # those handed out since the last set_stage

    def _keep_fp32_master(self) -> None:
        """Nothing to do: DeepSpeed keeps fp32 master weights in its optimizer under bf16/fp16 (16-bit weights on
        the ranks), and the model stays in the dtype it was loaded in (no fp32 copy per rank on the host)."""

    # ------------------------------------------------------------------ data
    @contextlib.contextmanager
    def _global_micro_batch(self) -> Iterator[None]:
        """Within: ``batch_size`` is the global micro-batch (per rank x world size), as the torch engine's."""
        per_rank = self.batch_size
        self.batch_size = per_rank * self.world_size
        try:
            yield
        finally:
            self.batch_size = per_rank

    def micro_batches_per_epoch(self, examples: Sequence[SFTExample], task: Optional[str] = None) -> int:
        with self._global_micro_batch():
            return super().micro_batches_per_epoch(examples, task)

    def batches(self, examples: Sequence[SFTExample], epoch: int,
                task: Optional[str] = None) -> list[list[tuple[list[int], list[int]]] | ZeroWeight]:
        """This rank's shard of each global micro-batch (the torch engine's batches of ``batch_size x world``).

        A rank whose shard is empty (a last micro-batch with fewer examples than ranks) gets the micro-batch's
        first sequence as a :class:`~opr.engine.base.ZeroWeight`: it runs forward and backward like the others
        (ZeRO's collectives need every rank) and its loss is weighted zero in :meth:`optimizer_step`.
        """
        with self._global_micro_batch():
            global_batches = super().batches(examples, epoch, task)
        out = []
        for b in global_batches:
            lo, hi = shard_bounds(len(b), self.rank, self.world_size)
            out.append(b[lo:hi] if hi > lo else ZeroWeight(b[:1]))
        return out

    def _micro_batch(self, batch: list[tuple[list[int], list[int]]] | ZeroWeight) -> PackedBatch | ZeroWeight:
        """A shard of :meth:`batches` packed; an empty shard's filler stays a :class:`ZeroWeight`."""
        return ZeroWeight(pack(batch.batch)) if isinstance(batch, ZeroWeight) else pack(batch)

    # ------------------------------------------------------------------ ZeRO-3 prefetch
    def _param_coordinator(self):
        """ZeRO-3's parameter coordinator (records the order in which modules fetch their parameters, then
        prefetches along it), or None outside ZeRO-3."""
        if self.zero_stage != 3 or self.engine is None:
            return None
        return self.engine.optimizer.parameter_offload.get_param_coordinator()

    def _reset_zero3_step(self) -> None:
        """Tell ZeRO-3 that a forward begins. DeepSpeed does it in a pre-forward hook of the root module, but the
        losses call the decoder and the output layer directly (``opr.losses``), so the hook never fires: without
        this the coordinator never completes its trace and every all-gather waits on the critical path."""
        coordinator = self._param_coordinator()
        if coordinator is not None:
            coordinator.reset_step()

    def zero3_trace_complete(self) -> Optional[bool]:
        """Whether ZeRO-3 has a complete fetch trace (so it prefetches); None outside ZeRO-3 training."""
        coordinator = self._param_coordinator()
        return None if coordinator is None else bool(coordinator.is_complete_trace())

    # ------------------------------------------------------------------ ZeRO-3 materialisation
    def _shard(self) -> None:
        """Leave the materialised state (ZeRO-3): re-partition the parameters and restore the hooks."""
        if self._materialised is not None:
            ctx, self._materialised = self._materialised, None
            ctx.__exit__(None, None, None)

    def _materialise(self) -> None:
        """Gather every parameter on every rank and remove ZeRO-3's hooks (all ranks call this together)."""
        if self.zero_stage == 3 and self.engine is not None and self._materialised is None:
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            ctx = unwrap_model_for_generation(self.engine)
            ctx.__enter__()
            self._materialised = ctx

    # ------------------------------------------------------------------ optimisation
    def begin_stage(self, total_steps: int, lr: Optional[float] = None) -> None:
        """Make the DeepSpeed engine (first stage) or reset AdamW's state (later stages); set the schedule."""
        import deepspeed

        self._shard()
        if self.engine is None:
            # DeepSpeed steps its own flattened partitions through this optimizer: the plain (unfused) AdamW, or
            # DeepSpeed's vectorised CPU Adam where the optimizer states live on the host (offload_optimizer=cpu)
            self._torch_optimizer = (make_cpu_adam if self.offload_optimizer == "cpu" else make_adamw)(
                self.model, self.lr, self.betas, self.weight_decay)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.model, optimizer=self._torch_optimizer, config=self.ds_config)
        else:  # a fresh AdamW per stage: drop the moments and step counts (re-made lazily at the next step)
            self._torch_optimizer.state.clear()
        self.stage_lr = self.lr if lr is None else lr  # set on the optimizer at each step (current_lr)
        self.stage_total = max(1, total_steps)
        self.stage_step = 0
        self.warmup = int(round(self.warmup_ratio * self.stage_total))
        if self._fit_depth == 0:
            self._materialise()

    # ------------------------------------------------------------------ frozen models (reference, teacher)
    # Under ZeRO-3 a frozen model is a DeepSpeed inference engine (ZeRO-3, no optimizer) partitioned like the
    # policy: each rank holds 1/W of every parameter (``ds_tensor``, the same layout as the policy's) and the
    # engine's hooks gather each layer's parameters while it runs and release them after it
    # (``stage3_param_persistence_threshold: 0``: no parameter stays gathered between forwards). The engine is made
    # once and reused by the following stages' frozen models (their weights are copied into its partitions).
    def set_stage(self, stage: int) -> None:
        """TorchTrainer's, and the frozen models of earlier stages are free for reuse (ZeRO-3)."""
        super().set_stage(stage)
        self._frozen_in_use = []

    def frozen_config(self) -> dict:
        """The DeepSpeed config of a ZeRO-3 frozen model: the policy's precision and parameter offload, no
        optimizer, no parameter kept gathered between forwards."""
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
        if "offload_param" in self.ds_config["zero_optimization"]:
            zero["offload_param"] = dict(self.ds_config["zero_optimization"]["offload_param"])
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": self.batch_size * self.world_size, "zero_optimization": zero,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
        }
        for key in ("bf16", "fp16"):
            if key in self.ds_config:
                config[key] = {"enabled": True}
        return config

    def frozen_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """ZeRO-2: TorchTrainer's full copy. ZeRO-3: a module partitioned like the policy (see the section's
        comment) holding ``model``'s full weights (the policy between training calls, or the reloaded base):
        the engine is made from the policy's own tensors (no second full copy on the GPU) and, for another model,
        each rank copies its part of that model's weights into its partitions."""
        if self.zero_stage != 3:
            return super().frozen_model(model)
        source = model.state_dict()
        engine = next((e for e in self._frozen_engines if e not in self._frozen_in_use), None)
        new = engine is None
        if new:
            engine = self._make_frozen_engine()
        wrong = _layout_mismatch(engine.module, source)
        if wrong is not None:
            raise ValueError(f"frozen_model: {wrong}; a frozen model has the policy's architecture and is made from "
                             "full weights (under ZeRO-3, between training calls)")
        if new:
            self._frozen_engines.append(engine)
        self._frozen_in_use.append(engine)
        if not new or model is not self.model:
            self.load_frozen_state_dict(engine.module, source)
        return engine.module

    def _make_frozen_engine(self):
        """A ZeRO-3 inference engine over a frozen copy of the policy (partitioned from the policy's full tensors)."""
        import deepspeed

        module = _aliased_copy(self.model)
        engine, _, _, _ = deepspeed.initialize(model=module, config=self.frozen_config())
        coordinator = engine.optimizer.get_param_coordinator()
        # The losses call the decoder and the output layer, not the root module whose hook starts DeepSpeed's
        # trace: start it before the decoder's own fetch (prepend), once per forward.
        module.get_decoder().register_forward_pre_hook(lambda *_: coordinator.reset_step(), prepend=True)
        module.eval()
        return engine

    def frozen_state_dict(self, frozen: torch.nn.Module) -> dict:
        """ZeRO-3: every parameter gathered in turn (all ranks) and copied to rank 0's host memory; the other
        ranks get an empty dict. ZeRO-2: the full copy's ``state_dict``."""
        if not _is_partitioned(frozen):
            return super().frozen_state_dict(frozen)
        import deepspeed

        out: dict = {}
        copies: dict[int, torch.Tensor] = {}  # a tied parameter is gathered once
        for name, t in frozen.state_dict(keep_vars=True).items():
            if hasattr(t, "ds_id"):
                if id(t) not in copies:
                    with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                        copies[id(t)] = t.detach().to("cpu", copy=True) if self.rank == 0 else None
                value = copies[id(t)]
            else:
                value = t.detach().to("cpu", copy=True) if self.rank == 0 else None
            if self.rank == 0:
                out[name] = value
        return out

    @torch.no_grad()
    def load_frozen_state_dict(self, frozen: torch.nn.Module, state: dict) -> None:
        """ZeRO-3: each rank copies its own part of every full tensor of ``state`` into its partition (no
        collective). ZeRO-2: ``load_state_dict``."""
        if not _is_partitioned(frozen):
            return super().load_frozen_state_dict(frozen, state)
        import torch.distributed as dist
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        names = dict(frozen.named_parameters())
        missing = sorted(set(names) - set(state))
        if missing:
            raise KeyError(f"the frozen model's saved weights lack {missing[:3]} ({len(missing)} in all)")
        for name, p in names.items():
            full = state[name]
            if tuple(full.shape) != tuple(p.ds_shape):
                raise ValueError(f"the frozen model's {name} has shape {tuple(p.ds_shape)}, the weights to load "
                                 f"{tuple(full.shape)}: a frozen model loads weights of its own architecture")
            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
                raise RuntimeError(f"the frozen model's {name} is gathered ({p.ds_status}): load its weights between "
                                   "its forwards")
            part = p.ds_tensor
            start = part.ds_numel * dist.get_rank(group=p.ds_process_group)
            count = max(0, min(part.ds_numel, full.numel() - start))
            part.narrow(0, 0, count).copy_(full.reshape(-1).narrow(0, start, count))
        for name, b in frozen.named_buffers():
            if name in state:
                b.copy_(state[name])

    @torch.no_grad()
    def ema_update(self, frozen: torch.nn.Module, rate: float) -> None:
        """ZeRO-3: each rank lerps its partition of every parameter towards the policy's partition (the same
        layout; nothing gathered). ZeRO-2: TorchTrainer's, over the full copy."""
        if not _is_partitioned(frozen):
            return super().ema_update(frozen, rate)
        for pf, pp in zip(frozen.parameters(), self.model.parameters(), strict=True):
            own, policy = pf.ds_tensor, getattr(pp, "ds_tensor", None)
            if policy is None or own.shape != policy.shape:
                raise RuntimeError("ema_update under ZeRO-3 needs the policy partitioned like the frozen model "
                                   f"(partition of {tuple(own.shape)}, the policy's "
                                   f"{None if policy is None else tuple(policy.shape)}): call it after an optimizer step")
            own.lerp_(policy.to(device=own.device, dtype=own.dtype), rate)

    # ------------------------------------------------------------------ training states (mid-stage resume)
    # A mid-stage state holds the full weights (gathered by all ranks under ZeRO-3, saved by rank 0), the
    # schedule position (the same on every rank), and one file per rank with that rank's ZeRO optimizer
    # partition (Adam moments and fp32 master weights), written by the rank itself. The on-policy position in it
    # holds the ZeRO-3 frozen models' full weights once: gathered parameter by parameter onto rank 0's host
    # (frozen_state_dict), not a copy per rank. Resuming needs the same number of ranks: the partitions are cut
    # for that world size.
    def state_dict(self) -> dict:
        """The schedule position; the optimizer is per rank (:meth:`rank_state`)."""
        return {**super().state_dict(), "optimizer": None}

    def rank_state(self) -> Optional[dict]:
        """This rank's ZeRO optimizer partition, for ``ranks/rank<r>.pt`` of a mid-stage training state."""
        return {"rank": self.rank, "world_size": self.world_size, "zero_stage": self.zero_stage,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule, then this rank's optimizer partition from ``state["rank_states"]``."""
        super().load_state_dict(state)
        folder = state.get("rank_states")
        if folder is None:
            raise RuntimeError("this mid-stage training state has no per-rank optimizer partitions (ranks/): it was "
                               "saved by engine=torch; resume it with engine=torch")
        path = os.path.join(folder, f"rank{self.rank}.pt")
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: the state was saved by fewer ranks than this run's "
                               f"{self.world_size}; resume with the same number of processes")
        part = torch.load(path, map_location="cpu", weights_only=False)
        if (part["world_size"], part["zero_stage"]) != (self.world_size, self.zero_stage):
            raise RuntimeError(
                f"the training state was saved with world size {part['world_size']} and ZeRO stage "
                f"{part['zero_stage']}, this run has {self.world_size} and {self.zero_stage}; ZeRO partitions only "
                "load into the same layout: resume with the same number of processes and engine.zero_stage")
        if part["optimizer"] is not None:
            own = [part["optimizer"] if r == self.rank else None for r in range(self.world_size)]
            self.optimizer.load_state_dict(own, load_optimizer_states=True, load_from_fp32_weights=True)

    def full_state_dict(self) -> dict:
        """The full weights. Inside training under ZeRO-3 every rank must call this together (it gathers the
        partitions); rank 0 gets the weights, the other ranks an empty dict."""
        if self.zero_stage == 3 and self.engine is not None and self._materialised is None:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                if self.rank != 0:
                    return {}
                return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.model.state_dict()

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Within: the whole model on every rank. Under ZeRO-3 inside a training call (partitioned), every rank
        gathers the parameters and removes the hooks (as between training calls) and partitions them again on
        exit; otherwise the model is already whole."""
        gather = self.zero_stage == 3 and self.engine is not None and self._materialised is None
        if gather:
            self._materialise()
        try:
            yield
        finally:
            if gather:
                self._shard()

    def barrier(self) -> None:
        """Wait for every rank (``torch.distributed.barrier``)."""
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a stop signal reaches ranks at different steps)."""
        return bool(self._all_reduce([1.0 if flag else 0.0], op="max")[0])

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` in rank order (``torch.distributed.all_gather_object``: pickled, so any picklable
        object; the on-policy loop gathers each rank's share of a rollout batch)."""
        return distributed.gather_all(obj)

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _update(self, micro_batches: Sequence, loss_fn: LossFn, counts: Sequence[int]) -> dict:
        """One optimizer step over this rank's ``micro_batches`` (``optimizer_step`` without the step hook);
        the same contract as TorchTrainer's.

        Every rank must call it together with the same number of micro-batches. The loss is normalised by the
        supervised tokens of *all* ranks, so the step equals the torch engine's step over the global batch
        (each rank's part of it: the shards of ``fit_sft``, the on-policy loop's
        :func:`~opr.methods.on_policy.rank_micro_batches`). A filler (:class:`~opr.engine.base.ZeroWeight`: an empty SFT
        shard's, or the on-policy loop's) runs forward and backward with weight zero. The metrics are
        means over the real micro-batches of all ranks.
        """
        assert self.engine is not None, "begin_stage() must be called before optimizer_step()"
        self._shard()
        try:
            return self._optimizer_step(micro_batches, loss_fn, counts)
        finally:
            if self._fit_depth == 0:
                self._materialise()

    def _optimizer_step(self, micro_batches: Sequence, loss_fn: Callable, counts: Sequence[int]) -> dict:
        self.model.train()
        lr = self.current_lr()
        for g in self._torch_optimizer.param_groups:
            g["lr"] = lr
        weights = [0.0 if isinstance(mb, ZeroWeight) else 1.0 for mb in micro_batches]
        n_micro = self._all_reduce([float(len(micro_batches))])[0]
        if n_micro != len(micro_batches) * self.world_size:
            raise RuntimeError(f"rank {self.rank} has {len(micro_batches)} micro-batches but the ranks have "
                               f"{int(n_micro)} in all: every rank must step over the same number")
        local = sum(w * c for w, c in zip(weights, counts))
        denom = max(1.0, self._all_reduce([local])[0])
        total_loss = 0.0
        sums: dict = {}  # Σ over this rank's real micro-batches of each metric
        for i, mb in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            # Loss functions call the module (often its decoder) directly, not ``engine.forward``; this is the
            # bookkeeping ``engine.forward`` does first: ZeRO-3 counts micro-steps there, and without it every
            # micro-batch's gradient would overwrite, not add to, the previous ones.
            if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
                self.engine.optimizer.clear_backward_seen_flag()
            self._reset_zero3_step()
            loss_sum, metrics = loss_fn(self.model, mb.batch if isinstance(mb, ZeroWeight) else mb)
            loss_sum = loss_sum * weights[i]
            # DeepSpeed averages gradients over ranks: x world_size makes the sum over ranks of Σ NLL / denom.
            self.engine.backward(loss_sum * (self.world_size / denom), scale_wrt_gas=False)
            total_loss += float(loss_sum.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + weights[i] * float(v)
        keys = sorted(sums)  # the same loss_fn on every rank: the same keys
        total_loss, *reduced, real = self._all_reduce([total_loss] + [sums[k] for k in keys] + [sum(weights)])
        extra = {k: v / max(1.0, real) for k, v in zip(keys, reduced)}
        if not math.isfinite(total_loss):
            self.engine.zero_grad()
            raise NonFiniteLoss(f"loss is {total_loss / denom} at optimizer step {self.stage_step} of the stage")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        if norm is not None and not math.isfinite(grad_norm) and "fp16" not in self.ds_config:
            raise NonFiniteLoss(f"gradient norm is {grad_norm} at optimizer step {self.stage_step} of the stage")
        self.stage_step += 1
        self.global_step += 1
        return {"loss": total_loss / denom, "lr": lr, "grad_norm": grad_norm, "tokens": int(denom), **extra}

    # ------------------------------------------------------------------ SFT
    def fit_sft(self, examples: Sequence[SFTExample], desc: str = "train", task: Optional[str] = None,
                steps: Optional[int] = None) -> TrainStats:
        """TorchTrainer's ``fit_sft`` over this rank's shards; statistics count the global batch.

        ``examples`` must be the same list on every rank (the loop builds it identically everywhere).
        """
        self._fit_depth += 1
        try:
            stats = super().fit_sft(examples, desc=desc, task=task, steps=steps)
        finally:
            self._fit_depth -= 1
            if self._fit_depth == 0:
                self._materialise()
        return stats


# ---------------------------------------------------------------------------------------------- frozen models
def _is_partitioned(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 partitions (a frozen model of a ZeRO-3 trainer)."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def _layout_mismatch(frozen: torch.nn.Module, state: dict) -> Optional[str]:
    """None when ``state`` (full weights) has a tensor of the right shape for every parameter of ``frozen``; else
    what differs first."""
    for name, p in frozen.named_parameters():
        if name not in state:
            return f"the model given has no parameter {name!r}"
        if tuple(state[name].shape) != tuple(p.ds_shape):
            return f"{name} has shape {tuple(state[name].shape)} in the model given, {tuple(p.ds_shape)} in the policy"
    return None


def _aliased_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` whose parameters share ``model``'s (full) tensors, for ZeRO-3 to partition:
    DeepSpeed copies each rank's part out of them and drops the reference, so no second full copy is made (its
    broadcast from rank 0 writes the values every rank already has). What a materialised ZeRO-3 policy carries of
    DeepSpeed (its root's forward hook, module ids) is left out of the copy."""
    memo: dict = {}
    for name, p in model.named_parameters():
        if p.numel() != (p.ds_numel if hasattr(p, "ds_numel") else p.numel()):
            raise RuntimeError(f"{name} is partitioned ({p.numel()} of {p.ds_numel} elements here): a frozen model is "
                               "made from full weights, between training calls")
        memo[id(p)] = torch.nn.Parameter(p.data, requires_grad=False)
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__module__", "").startswith("deepspeed")]:
                del hooks[key]
        for attr in [a for a in vars(m) if a.startswith("ds_") or a == "_external_params"]:
            delattr(m, attr)
    return clone.eval()
