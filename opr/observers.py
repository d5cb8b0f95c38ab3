"""Observers: the side concerns of the continual loop (analysis, dumps, checkpoints, dashboard), each in one place.

The loop (:class:`opr.loop.ContinualLoop`) runs the algorithm and tells its observers, in list order, what
happened; :func:`opr.run.build_observers` builds the list from the config (only what the config turns on, and
on rank 0 only what writes files or logs, so DeepSpeed's other ranks observe nothing but the checkpoint timing).

Hooks and what they may read and write (all default to doing nothing):

``on_run_start(loop)``
    Once, before row 0 or a resume. May read the loop's components; writes nothing of the loop.
``on_stage_start(stage, ctx, resumed)``
    Stage ``stage`` (>= 1) begins, before its data is built and before any of it changes the weights.
    ``ctx`` is the method's :class:`opr.methods.base.StageContext`; ``resumed`` is the saved mid-stage training
    state when the stage continues one (it holds what :meth:`on_train_state` added), else None. Read only.
``on_stage_data(stage, data, entry)``
    Freshly built stage data (not called for a stage resumed mid-way, whose data is the saved one). Read only.
``on_step(stage, stage_step, trainer)``
    After every optimizer step of stage ``stage`` (``stage_step`` steps done; ``trainer.last_step`` holds the
    step's metrics), on rank 0 between steps. May evaluate (greedy, drawing no random number) and keep what
    it measured for :meth:`on_stage_end`; must leave the weights, the trainer and the RNG as they were.
``on_phase_start(stage, name)`` / ``on_phase_end(stage, name, stage_step, entry)``
    Only for a method whose stage trains in phases (``sft_then_grpo``: "sft", then "rl"): phase ``name``
    begins (also when a resumed stage continues inside it), or ended after ``stage_step`` steps of the stage
    (not called for the stage's last phase: its end is the stage end). At a phase end an observer may
    evaluate (as in ``on_step``), write files of its own and set entry fields (e.g. ``phase_checkpoints``).
``on_stage_evaluated(stage, scores, general)``
    A row of R was recorded (row 0, a trained stage, or one taken from the stage cache). Read only.
``on_stage_end(stage, entry, cached)``
    After the evaluation of stage ``stage`` >= 1 and before the stage cache stores it. With ``cached`` False
    (the stage was computed) an observer may add fields to ``entry`` (e.g. ``drift``, ``diagnostics`` and
    their ``entry.seconds``): the stage cache stores them. With ``cached`` True they came from the cache and
    must not be recomputed (nor may the RNG be drawn from): the hook may only read them.
``on_stage_finish(stage, entry)``
    The stage's outcome is final (computed or cached), before it is appended to results.json; may write files
    of its own and ``entry.seconds`` / entry fields that the stage cache does not store (e.g. the checkpoint).
``on_train_state(kind, state)``
    A training state (``kind`` "mid_stage" or "stage_end") is being written (rank 0): may add keys to ``state``
    that :meth:`on_stage_start` gets back as ``resumed`` after a mid-stage resume.
``on_run_end(results)``
    The run completed; ``results`` is the final :class:`opr.results.RunResults`. Read only.

The trainer's per-step hook is not an observer hook: it belongs to the trainer (``Trainer.step_hook``,
:mod:`opr.engine.base`), and the loop sets it to its training-state saving for each stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from opr import checkpoint as ckpt
from opr.results import write_text_atomic


class Observer:
    """Base of the loop's observers: every hook does nothing (see the module docstring for the contract)."""

    def on_run_start(self, loop) -> None:
        pass

    def on_stage_start(self, stage: int, ctx, resumed: Optional[dict]) -> None:
        pass

    def on_stage_data(self, stage: int, data, entry) -> None:
        pass

    def on_step(self, stage: int, stage_step: int, trainer) -> None:
        pass

    def on_phase_start(self, stage: int, name: str) -> None:
        pass

    def on_phase_end(self, stage: int, name: str, stage_step: int, entry) -> None:
        pass

    def on_stage_evaluated(self, stage: int, scores: list, general: list) -> None:
        pass

    def on_stage_end(self, stage: int, entry, cached: bool) -> None:
        pass

    def on_stage_finish(self, stage: int, entry) -> None:
        pass

    def on_train_state(self, kind: str, state: dict) -> None:
        pass

    def on_run_end(self, results) -> None:
        pass


class DriftObserver(Observer):
    """``entry.drift`` (``analysis.drift``): each trained stage's weights against the base weights, shared by the
    ranks. Each rank analyses its share of the parameters (:func:`opr.analysis.drift.drift_shares`, balanced by
    SVD cost): it keeps a host copy of only those base weights, taken when the observer is built (before any
    resume restores later weights), caches their SVD factors across stages and, at a stage end, copies only
    those current weights to the host. The per-parameter terms of all ranks are gathered and pooled in one
    order, so every rank holds one process's numbers (one process: the whole model, as before).

    ``ranks``: the trainer (``rank``, ``world_size``, ``all_gather``); every rank must build the observer and
    reach ``on_stage_end`` together."""

    def __init__(self, backbone, k: int, svd: str, ranks) -> None:
        from opr.analysis.drift import drift_shares

        self.backbone, self.k, self.svd, self.ranks = backbone, k, svd, ranks
        live = backbone.model.state_dict()
        self.names = drift_shares(live, ranks.world_size)[ranks.rank]
        self.base_state = {n: live[n].detach().to("cpu", copy=True) for n in self.names}
        self.base_svd_cache: dict = {}

    def on_stage_end(self, stage: int, entry, cached: bool) -> None:
        if cached:
            return
        from opr.analysis.drift import drift_terms, summarize_drift

        clock = time.perf_counter()
        live = self.backbone.model.state_dict()
        mine = {"parameters": [], "spectral": []}
        if self.names:  # more ranks than parameters: a rank may have none
            state = {n: live[n].detach().to("cpu") for n in self.names}
            mine = drift_terms(self.base_state, state, k=self.k, method=self.svd, base_cache=self.base_svd_cache)
        parts = self.ranks.all_gather(mine)  # [mine] on one process
        order = {name: i for i, name in enumerate(live)}  # state_dict order: one process's summation order
        terms = {kind: sorted((t for part in parts for t in part[kind]), key=lambda t: order[t["name"]])
                 for kind in ("parameters", "spectral")}
        entry.drift = summarize_drift(terms, self.k)
        entry.seconds["drift"] = time.perf_counter() - clock


class DiagnosticsObserver(Observer):
    """``entry.diagnostics`` (``analysis.diagnostics``): KL(π_t‖π_{t-1}), KL(π_t‖π_0) and the base model's mean
    log-prob of π_t's greedy responses, on fixed eval prompts of the tasks seen so far (token-weighted means,
    nats).

    π_0 is copied when the observer is built (before any resume restores later weights), π_{t-1} at each stage
    start. A mid-stage training state carries π_{t-1} (``prev_is_base`` or ``prev_model``), so a stage resumed
    mid-way reports the same ``kl_prev``.

    Both copies live in host memory (:func:`host_copy`: copied parameter by parameter to the host, never a second
    copy on the GPU); at the stage end each in turn is moved to the policy's device to score and back to the host
    after (:func:`moved_to`), so the GPU holds at most one of them, and only then.
    """

    def __init__(self, backbone, benchmark, per_task: int, seed: int, eval_settings, max_length: int) -> None:
        self.backbone, self.benchmark, self.per_task, self.seed = backbone, benchmark, per_task, seed
        self.eval_settings, self.max_length = eval_settings, max_length
        self.base_model = host_copy(backbone.model)
        self.prev_model = None
        self.ranks = None  # the trainer (every rank computes its share of the probe)

    def on_stage_start(self, stage: int, ctx, resumed: Optional[dict]) -> None:
        self.ranks = ctx.trainer
        if resumed is None:
            self.prev_model = self.base_model if stage == 1 else host_copy(self.backbone.model)
        elif resumed.get("prev_is_base"):
            self.prev_model = self.base_model
        elif resumed.get("prev_model") is not None:  # saved with the mid-stage state
            self.prev_model = host_copy(self.backbone.model)
            self.prev_model.load_state_dict(resumed["prev_model"])
        else:
            self.prev_model = None

    def on_stage_end(self, stage: int, entry, cached: bool) -> None:
        if not cached:
            clock = time.perf_counter()
            shares: list[int] = []
            entry.diagnostics = self._diagnostics(stage, shares)
            entry.seconds["diagnostics"] = time.perf_counter() - clock
            entry.record_shares("diagnostics", shares)  # the probe prompts each rank answered
        self.prev_model = None

    def on_train_state(self, kind: str, state: dict) -> None:
        if kind == "mid_stage" and self.prev_model is not None:
            # π_{t-1} for the stage's kl_prev diagnostic: after a resume it is no longer in memory
            if self.prev_model is self.base_model:
                state["prev_is_base"] = True
            else:
                state["prev_model"] = {k: v.detach().to("cpu") for k, v in self.prev_model.state_dict().items()}

    def _diagnostics(self, t: int, shares: list[int]) -> dict:
        from opr.diagnostics import base_logprob, greedy_responses, policy_kl, sample_probe

        seen = self.benchmark.tasks[:t]
        by_name = {x.name: x for x in seen}
        probe = sample_probe(seen, per_task=self.per_task, seed=self.seed)
        bs, dt = self.eval_settings.batch_size, self.eval_settings.compute_dtype
        resp = greedy_responses(self.backbone, probe, by_name, batch_size=bs, compute_dtype=dt, ranks=self.ranks,
                                share_counts=shares)
        kw = dict(batch_size=8, max_length=self.max_length, compute_dtype=dt, ranks=self.ranks)
        model = self.backbone.model
        device = next(model.parameters()).device
        with moved_to(self.base_model, device):
            out = {"kl_base": policy_kl(model, self.base_model, self.backbone, probe, by_name, resp, **kw),
                   "kl_prev": None,
                   "base_logprob": base_logprob(self.base_model, self.backbone, probe, by_name, resp, **kw)}
        if self.prev_model is not None:
            with moved_to(self.prev_model, device):
                out["kl_prev"] = policy_kl(model, self.prev_model, self.backbone, probe, by_name, resp, **kw)
        return out


def host_copy(model):
    """A frozen (eval mode, no gradients) copy of ``model`` in host memory: each parameter is copied straight to
    the host (no second copy on the model's device, even for a moment); buffers follow."""
    import copy

    import torch

    memo = {id(p): torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo).to("cpu").eval()


@contextlib.contextmanager
def moved_to(model, device) -> Iterator[None]:
    """Within: ``model`` on ``device``; back in host memory after."""
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


class ReplayDumpObserver(Observer):
    """``replay/stage{t}.jsonl``: the stage's training examples from past tasks (what was replayed, with the
    response actually trained: the gold answer or the model's rollout), for inspection next to the scores."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / "replay"

    def on_stage_data(self, stage: int, data, entry) -> None:
        replayed = [e for e in data.examples if e.task != entry.task]
        if not replayed:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(dataclasses.asdict(e), ensure_ascii=False) for e in replayed]
        write_text_atomic(self.folder / f"stage{stage}.jsonl", "\n".join(lines) + "\n")


class CheckpointObserver(Observer):
    """Stage checkpoints (``checkpoint.save``, ``checkpoint.keep_last``) under ``<run_dir>/checkpoints``; the
    time it takes is ``entry.seconds["checkpoint"]`` (recorded, ≈0, also where nothing is saved). A stage
    trained in phases also gets one at each phase end but the last, ``stage{t}_{phase}`` (its path, relative to
    the run directory, in ``entry.phase_checkpoints``; ``keep_last`` removes it with its stage's checkpoint)."""

    def __init__(self, backbone, root: Path, keep_last: int, save: bool) -> None:
        self.backbone, self.root, self.keep_last, self.save = backbone, Path(root), keep_last, save

    def on_stage_finish(self, stage: int, entry) -> None:
        clock = time.perf_counter()
        if self.save:
            ckpt.save_stage(self.root, stage, self.backbone, {"task": entry.task}, self.keep_last)
        entry.seconds["checkpoint"] = time.perf_counter() - clock

    def on_phase_end(self, stage: int, name: str, stage_step: int, entry) -> None:
        if not self.save:
            return
        clock = time.perf_counter()
        folder = ckpt.save_stage(self.root, stage, self.backbone, {"task": entry.task, "phase": name,
                                                                   "stage_step": stage_step}, phase=name)
        entry.phase_checkpoints = {**(entry.phase_checkpoints or {}), name: f"{self.root.name}/{folder.name}"}
        entry.seconds[f"checkpoint_{name}"] = time.perf_counter() - clock


class InsideStageEval(Observer):
    """``entry.curve`` (``eval.every_steps``): the chosen tasks' scores every N optimizer steps of a stage and
    at its end, with the step's training loss, to see learning and forgetting *inside* a stage (e.g. an
    out-of-distribution score peaking early in SFT). Greedy evaluation of the eval sets (``eval.max_examples``
    applies), no prediction files; its cost is ``entry.seconds["eval_inside"]``. On W&B: ``inside/<task>``
    against the global step. A stage resumed mid-way keeps only the points after the resume. In a stage
    trained in phases each point says its ``phase``, and each phase end but the last has a point (evaluated
    there unless a point fell on that step)."""

    def __init__(self, backbone, tasks: list, settings, every_steps: int, seed: int, logger) -> None:
        self.backbone, self.tasks, self.settings = backbone, list(tasks), settings
        self.every, self.seed, self.logger = every_steps, seed, logger
        self.curve: list[dict] = []
        self.seconds = 0.0
        self.final: dict = {}
        self.trainer = None
        self.phase: Optional[str] = None  # the current phase of a stage trained in phases
        self.prompts = None  # the tasks' prompts, encoded at the first point (opr.evaluation.EvalPrompts)

    def on_stage_start(self, stage: int, ctx, resumed: Optional[dict]) -> None:
        self.curve, self.seconds, self.final, self.trainer = [], 0.0, {}, ctx.trainer
        self.phase = None

    def on_phase_start(self, stage: int, name: str) -> None:
        self.phase = name

    def on_step(self, stage: int, stage_step: int, trainer) -> None:
        if stage_step % self.every == 0:
            self._point(stage_step, trainer)

    def on_phase_end(self, stage: int, name: str, stage_step: int, entry) -> None:
        if not self.curve or self.curve[-1]["stage_step"] != stage_step:
            self._point(stage_step, self.trainer)

    def _point(self, stage_step: int, trainer) -> None:
        from opr.evaluation import encode_eval_prompts, evaluate_all

        clock = time.perf_counter()
        if self.prompts is None:
            self.prompts = encode_eval_prompts(self.backbone, self.tasks, self.settings)
        with trainer.inference():  # every rank evaluates its share (under ZeRO-3: the gathered model)
            every = evaluate_all(self.backbone, self.tasks, self.settings, None, seed=self.seed, prompts=self.prompts,
                                 ranks=trainer)
        scores = {s.task: s.score for s in every}
        self.seconds += time.perf_counter() - clock
        loss = (trainer.last_step or {}).get("loss")
        point = {"step": trainer.global_step, "stage_step": stage_step, "loss": loss, "scores": scores}
        if self.phase is not None:
            point["phase"] = self.phase
        self.curve.append(point)
        self.logger.log_step({f"inside/{task}": v for task, v in scores.items()}, step=trainer.global_step)

    def on_stage_evaluated(self, stage: int, scores: list, general: list) -> None:
        wanted = {t.name for t in self.tasks}
        self.final = {s.task: s.score for s in list(scores) + list(general) if s.task in wanted}

    def on_stage_end(self, stage: int, entry, cached: bool) -> None:
        if cached:  # the curve came from the cache with the rest of the entry
            return
        end = {"step": self.trainer.global_step, "stage_step": "end", "loss": None, "scores": self.final}
        entry.curve = self.curve + [end]
        entry.seconds["eval_inside"] = self.seconds


class LoggerObserver(Observer):
    """The logger's (``opr.loggers``) per-stage metrics on the stage axis (scores, general scores, empty rates,
    then drift and diagnostics) and the final results."""

    def __init__(self, logger, run_dir: Path) -> None:
        self.logger, self.run_dir = logger, Path(run_dir)

    def on_stage_evaluated(self, stage: int, scores: list, general: list) -> None:
        metrics = {f"stage{stage}/eval/{s.task}": s.score for s in scores}
        metrics.update({f"stage{stage}/general/{g.task}": g.score for g in general})
        metrics.update({f"stage{stage}/empty_rate/{s.task}": s.empty_rate for s in scores})
        self.logger.log_stage(stage, metrics)

    def on_stage_end(self, stage: int, entry, cached: bool) -> None:
        flat = {f"stage{stage}/drift/{k}": v for k, v in (entry.drift or {}).items()}
        for name, d in (entry.diagnostics or {}).items():
            if d is not None:
                flat[f"stage{stage}/diagnostics/{name}"] = d["mean"]
        if flat:
            self.logger.log_stage(stage, flat)

    def on_run_end(self, results) -> None:  # loggers take the results.json dict (opr.loggers)
        self.logger.log_final(results.to_json(), self.run_dir)
