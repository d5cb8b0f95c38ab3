"""The continual loop shared by every method::

    R[0, :] = evaluate(model, all tasks)                      # before any training
    for t, task in enumerate(stream, 1):
        data = method.stage_data(ctx)                         # SFT mixture, or prompts for on-policy methods
        method.train_stage(ctx, data)
        R[t, :] = evaluate(model, all tasks)                  # past, current and future tasks
        checkpoint(stage t); write results.json               # so finished work survives any later failure
        save training state                                   # (also every checkpoint.every_steps optimizer
                                                              #  steps inside a stage, and at a stop signal)
    metrics = continual_metrics(R)

Side concerns are observers (:mod:`opr.observers`, built by :func:`opr.run.build_observers`): drift and policy
diagnostics add fields to a trained stage's entry after its evaluation (before the stage cache stores it; a cache
hit brings them back instead), replay dumps, stage checkpoints and the logger's per-stage metrics.

The results (``results.json``) are an :class:`opr.results.RunResults` with one :class:`opr.results.StageRecord`
per evaluated stage.

Resume: given a training state (``opr.checkpoint.load_train_state``), finished stages are skipped (their rows
of R and their statistics come from the saved results), and a stage interrupted mid-way continues from the
saved model/optimizer/data position with the saved training examples (replay data is not rebuilt), or, for an
on-policy method, from the position its steps saved (prompt pool, rollout step, records, extra models).

Phases: a method whose stage trains in phases (``sft_then_grpo``) calls ``ctx.start_phase`` / ``ctx.end_phase``;
the loop numbers the stage's steps across them (the trainer restarts its count with each phase's optimizer)
and tells its observers (``on_phase_start``, ``on_phase_end``: the phase checkpoint, the curve's labels).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from opr import checkpoint as ckpt
from opr.backbones import Backbone
from opr.engine.base import NonFiniteLoss, Trainer
from opr.evaluation import EvalPrompts, EvalSettings, TaskScore, encode_eval_prompts, evaluate_all
from opr.methods.base import StageContext, StageData
from opr.metrics.continual import continual_metrics, general_drift
from opr.observers import Observer
from opr.provenance import REPRODUCTION_KEYS
from opr.results import GeneralScores, RunResults, StageRecord, Status
from opr.stage_cache import CachedStage, StageCache, hash_rng, hash_stage_data, row0_key, stage_key
from opr.train_state import GracefulStop, info_kind, rng_state, set_rng_state
from opr.types import Benchmark, SFTExample

log = logging.getLogger("opr")


# The parts of a stage's results.json entry (StageRecord fields, by their JSON keys: the stage cache's entry.json
# stores them so) that its training, evaluation and analysis compute; the rest (data statistics, checkpoint
# time, memory) belongs to the run that reads it.
CACHED_ENTRY_KEYS = ("train", "eval", "general", "empty_rate", "format_error_rate", "prompts_cut", "drift",
                     "diagnostics", "curve")


def cache_summary(stages: list[StageRecord], directory) -> dict:
    """Hits, misses and the compute seconds the hits saved (as measured by the runs that computed them)."""
    marks = [e.stage_cache for e in stages if e.stage_cache]
    hits = [m for m in marks if m["hit"]]
    return {"dir": str(directory), "hits": len(hits), "misses": len(marks) - len(hits),
            "hit_stages": [e.stage for e in stages if e.cache_hit],
            "seconds_saved": sum(m["seconds_saved"] for m in hits)}


class StageDataMismatch(RuntimeError):
    """The ranks of a run built different data for a stage (they would step out of lockstep)."""


class StageDiverged(RuntimeError):
    """Raised after a NaN/inf loss; results.json and the last good checkpoint are kept."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ContinualLoop:
    """The stream of stages (the module docstring), with its side concerns left to ``observers``
    (:mod:`opr.observers`: drift, diagnostics, replay dumps, stage checkpoints, the logger), the stage cache
    (``stage_cache`` with row 0's key parts ``cache_identity``, :mod:`opr.stage_cache`) and the training state
    (saved at stage ends and, through the trainer's step hook, mid-stage; ``resume_from`` continues one).

    ``config`` is the run's validated config as a dict: it is recorded in results.json, and the loop reads its
    ``budget``, ``seed``, ``rollout.batch_size`` and ``checkpoint.{train_state,every_steps}``.
    """

    def __init__(
        self,
        benchmark: Benchmark,
        backbone: Backbone,
        method,
        trainer: Trainer,
        run_dir: Path,
        eval_settings: EvalSettings,
        config: dict,
        observers: Sequence[Observer] = (),
        stage_cache: Optional[StageCache] = None,
        cache_identity: Optional[dict] = None,
        resume_from: Optional[dict] = None,
        stop: Optional[GracefulStop] = None,
        load_base_model: Optional[Callable[[], Any]] = None,
    ) -> None:
        self.benchmark, self.backbone, self.method, self.trainer = benchmark, backbone, method, trainer
        self.run_dir, self.eval_settings, self.config = Path(run_dir), eval_settings, config
        self._eval_prompts: Optional[EvalPrompts] = None  # the rows' prompts, encoded at the first row
        self.observers = list(observers)
        self.budget, self.seed = config["budget"], config["seed"]
        self.rollout_batch_size = config["rollout"]["batch_size"]
        self.is_main = trainer.rank == 0
        saving = config["checkpoint"]
        every_steps = saving["every_steps"]
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1 or null, got {every_steps}")
        self.save_state, self.every_steps = saving["train_state"], every_steps  # independent of stage checkpoints
        self.resume_from, self.stop = resume_from, stop
        self.load_base_model = load_base_model  # StageContext.load_base_model (None: the context's default)
        # Stage cache (opr.stage_cache): ``cache_identity`` holds row 0's key parts except the RNG state;
        # ``cache_key`` is the chain key of the last finished stage (None: caching is off from here on).
        self.cache, self.cache_identity = stage_cache, cache_identity
        self.cache_key: Optional[str] = None
        self.cache_store_error: Optional[str] = None  # the first failed write (then storing is off for the run)
        self._phase_offset = 0  # optimizer steps of the current stage's earlier phases (ctx.start_phase)
        self.results = RunResults(
            config=config,
            run={
                "world_size": trainer.world_size,
                "per_device_batch": trainer.batch_size,
                "grad_accum": trainer.grad_accum,
                "global_batch": trainer.batch_size * trainer.grad_accum * trainer.world_size,
                "compute_dtype": trainer.compute_dtype,
                "backbone_source": backbone.source,
                "seed": self.seed,
            },
            tasks=[t.name for t in benchmark.tasks],
            general=GeneralScores(tasks=[g.name for g in benchmark.general]),
            manifest=benchmark.manifest,
        )  # status running; matrix, metrics and stages empty

    def _notify(self, hook: str, *args, **kwargs) -> None:
        for observer in self.observers:
            getattr(observer, hook)(*args, **kwargs)

    # ------------------------------------------------------------------ run
    def run(self) -> RunResults:
        """Run (or continue) the stream. A run that stops early says so in results.json: ``diverged`` (NaN
        loss), ``interrupted`` (a signal: a training state was saved, the same command resumes) or ``failed``
        (any other error, named), never a ``running`` that nothing is running."""
        try:
            return self._run()
        except StageDiverged:
            raise
        except BaseException as err:
            self._record_stop(err)
            raise

    def _run(self) -> RunResults:
        self.t0 = time.perf_counter()
        self._notify("on_run_start", self)
        first, mid = self._restore() if self.resume_from is not None else (self._row0(), None)
        for t, task in enumerate(self.benchmark.tasks[first - 1:], first):
            ctx = self._context(t, task)
            self._notify("on_stage_start", t, ctx, mid)
            if mid is not None:  # continue an interrupted stage with its saved data and position
                (entry, data), key, mid = self._resume_stage(mid), None, None
            else:
                entry, data, key = self._stage_data(ctx)
            hit = self._cache_lookup(key)
            if hit is not None:
                self._apply_cached(t, hit, entry)  # the cached fields, drift and diagnostics included
            else:
                entry.train = self._train(ctx, data, entry)
                scores, general = self._evaluate_stage(t, entry)
                self._notify("on_stage_end", t, entry, cached=False)  # drift, diagnostics, dashboard
                self._cache_store(key, t, entry, scores, general, {
                    k: entry.seconds[k] for k in ("train", "eval", "drift", "diagnostics") if k in entry.seconds})
            self.cache_key = key
            self._finish_stage(t, entry)
        return self._complete()

    # ------------------------------------------------------------------ pieces of the run
    def _row0(self) -> int:
        """R[0, :]: the model before any training (or its evaluation from the stage cache); returns stage 1."""
        entry = StageRecord(stage=0, task=None, train_examples=0)
        key = None
        greedy = self.eval_settings.temperature == 0
        if self.cache is not None:
            rng_before = hash_rng(rng_state())
            key = row0_key(**self.cache_identity, rng=None if greedy else rng_before)
        hit = self._cache_lookup(key)
        if hit is not None:
            self._apply_cached(0, hit, entry, restore_rng=not greedy)  # greedy: the RNG is as it was
        else:
            clock = time.perf_counter()
            scores, general = self._evaluate(0, entry)
            self._record_eval(0, scores, general, entry)
            entry.seconds["eval"] = time.perf_counter() - clock
            if key is not None and greedy and hash_rng(rng_state()) != rng_before:
                log.warning("stage cache: greedy evaluation drew random numbers; row 0 is not cached")
                key = None
            self._cache_store(key, 0, entry, scores, general, {"eval": entry.seconds["eval"]})
        self.cache_key = key
        self.results.stages.append(entry)
        self._write()
        self._save_train_state("stage_end", 0)
        self._check_stop()
        return 1

    def _context(self, t: int, task) -> StageContext:
        tasks = self.benchmark.tasks
        return StageContext(
            stage=t, task=task, past=tasks[: t - 1], backbone=self.backbone, trainer=self.trainer,
            budget=self.budget, seed=self.seed, rollout_batch_size=self.rollout_batch_size,
            compute_dtype=self.eval_settings.compute_dtype,
            max_prompt_tokens=self.eval_settings.max_prompt_length,
            **({"load_base_model": self.load_base_model} if self.load_base_model is not None else {}),
        )

    def _stage_data(self, ctx: StageContext) -> tuple[StageRecord, StageData, Optional[str]]:
        """The method's stage data, the stage's entry with its statistics, and the stage's cache key (None:
        caching is off)."""
        t, task = ctx.stage, ctx.task
        entry = StageRecord(stage=t, task=task.name)
        clock = time.perf_counter()
        data = self.method.stage_data(ctx)
        entry.seconds["data"] = time.perf_counter() - clock
        entry.train_examples = len(data.examples)
        entry.update(data.stats)  # the method's data statistics (extra keys: replay, prompt_pool, ...)
        for kind, counts in ctx.prompts_per_rank.items():
            entry.record_shares(kind, counts)
        self._check_same_data(t, data)
        self._notify("on_stage_data", t, data, entry)
        key = None
        if self.cache_key is not None:
            key = stage_key(prev=self.cache_key, stage=t, task=task.name, data=hash_stage_data(data),
                            train_identity=self.method.train_identity(ctx), rng=hash_rng(rng_state()),
                            global_step=self.trainer.global_step, seed=self.seed)
        return entry, data, key

    def _check_same_data(self, t: int, data: StageData) -> None:
        """Every rank must train on the same stage data (its examples and their order decide the steps every rank
        takes together): compare a hash of it across the ranks and fail, naming the stage, where they differ
        (a hang in the first collective that one rank skips is what it would be otherwise)."""
        if self.trainer.world_size == 1:
            return
        digests = self.trainer.all_gather(f"{len(data.examples)}:{hash_stage_data(data)}")
        if len(set(digests)) > 1:
            raise StageDataMismatch(
                f"stage {t} ({self.benchmark.tasks[t - 1].name}): the ranks built different stage data "
                f"(examples:hash per rank {digests}); every rank must train on the same examples in the same order. "
                f"Method {self.method.name!r} builds its data differently per rank (a rank-dependent draw, or "
                "generation that is not shared across the ranks)")

    def _resume_stage(self, mid: dict) -> tuple[StageRecord, StageData]:
        """The entry and data of a stage interrupted mid-way; the trainer continues from the saved position."""
        self.cache_key = None  # the stage's starting RNG state is gone: no caching from here on
        entry = StageRecord.from_json(mid["entry"])
        data = StageData([SFTExample(**e) for e in mid["examples"]], mid["data_stats"])
        self.trainer.pending_resume = {**mid["fit"], "rank_states": mid["rank_states"]}
        return entry, data

    def _train(self, ctx: StageContext, data: StageData, entry: StageRecord) -> dict:
        """``method.train_stage`` with the trainer's step hook set; a NaN/inf loss records ``diverged``."""
        t, task = ctx.stage, ctx.task
        self.trainer.set_stage(t)
        self.trainer.step_hook = self._step_hook(t, entry, data)
        self._phase_offset = 0  # steps of the stage's earlier phases (a method that trains in phases)
        ctx.start_phase = lambda name, steps_before: self._start_phase(t, name, steps_before)
        ctx.end_phase = lambda name, stage_step: self._notify("on_phase_end", t, name, stage_step, entry)
        clock = time.perf_counter()
        try:
            train = self.method.train_stage(ctx, data)
        except NonFiniteLoss as err:
            self.results.status = Status.DIVERGED
            self.results.error = f"stage {t} ({task.name}): {err}"
            self._write()
            last = ckpt.latest_stage(self.run_dir / "checkpoints")
            raise StageDiverged(
                f"training diverged at stage {t} ({task.name}): {err}. Kept results.json with "
                f"{self.results.finished_stages} finished stage(s)"
                + (f" and the checkpoint of stage {last}." if last is not None else ".")
            ) from err
        finally:
            self.trainer.step_hook = None
        if self.trainer.pending_resume is not None:
            raise RuntimeError(f"stage {t}: a mid-stage training state was saved but method "
                               f"{self.method.name!r} took no position from it (neither through fit_sft nor "
                               "trainer.resume_position), so it cannot resume it")
        entry.seconds["train"] = time.perf_counter() - clock
        return train

    def _start_phase(self, t: int, name: str, steps_before: int) -> None:
        """``ctx.start_phase``: the trainer counts a phase's steps from 0; the stage counts on from the phases
        before it."""
        self._phase_offset = steps_before
        self._notify("on_phase_start", t, name)

    def _evaluate(self, stage: int, entry: StageRecord) -> tuple[list[TaskScore], list[TaskScore]]:
        """Row ``stage``: every task and general set, the prompts shared across the ranks (every rank gets every
        answer; rank 0 writes the predictions)."""
        out = self.run_dir / "predictions" / f"stage{stage}" if self.is_main else None
        tasks = list(self.benchmark.tasks) + list(self.benchmark.general)
        if self._eval_prompts is None:  # formatted and tokenised once, for every row
            self._eval_prompts = encode_eval_prompts(self.backbone, tasks, self.eval_settings)
        counts: list[int] = []
        every = evaluate_all(self.backbone, tasks, self.eval_settings, out, seed=self.seed, prompts=self._eval_prompts,
                             ranks=self.trainer, share_counts=counts)
        entry.record_shares("eval", counts)
        n = len(self.benchmark.tasks)
        return every[:n], every[n:]

    def _evaluate_stage(self, t: int, entry: StageRecord) -> tuple[list[TaskScore], list[TaskScore]]:
        clock = time.perf_counter()
        scores, general = self._evaluate(t, entry)
        entry.seconds["eval"] = time.perf_counter() - clock
        self._record_eval(t, scores, general, entry)
        return scores, general

    def _record_eval(self, stage: int, scores: list[TaskScore], general: list[TaskScore],
                     entry: StageRecord) -> None:
        self.results.matrix.append([s.score for s in scores])
        self.results.general.matrix.append([g.score for g in general])
        entry.eval = {s.task: s.score for s in scores}
        entry.general = {g.task: g.score for g in general}
        entry.empty_rate = {s.task: s.empty_rate for s in scores + general}
        entry.format_error_rate = {s.task: s.format_error_rate for s in scores if s.format_error_rate is not None}
        cut = {s.task: s.prompts_cut for s in scores + general if s.prompts_cut}
        if cut:  # prompts longer than the model's context, cut on the left
            entry.prompts_cut = cut
        self._notify("on_stage_evaluated", stage, scores, general)

    def _finish_stage(self, t: int, entry: StageRecord) -> None:
        """Checkpoint (an observer), record and save the state of a finished stage (computed or cached)."""
        self._notify("on_stage_finish", t, entry)
        entry.peak_rss_mb = peak_rss_mb()
        if torch.cuda.is_available():  # against the memory plan (opr.memory_plan)
            entry.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        self.results.stages.append(entry)
        self.results.seconds_elapsed = time.perf_counter() - self.t0
        self._write()
        self._save_train_state("stage_end", t)
        self._check_stop()

    def _complete(self) -> RunResults:
        self.results.metrics = continual_metrics(self.results.matrix)
        drift = general_drift(self.results.general.matrix)
        if drift is not None:
            self.results.metrics["general_drift"] = drift
        self.results.seconds_total = time.perf_counter() - self.t0
        if self.cache is not None:
            self.results.stage_cache = cache_summary(self.results.stages, self.cache.dir)
            if self.cache_store_error is not None:
                self.results.stage_cache["store_error"] = self.cache_store_error
        self.results.status = Status.COMPLETE
        self._write()
        self._notify("on_run_end", self.results)
        return self.results

    def _write(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.results.save(self.run_dir / "results.json")

    def _record_stop(self, err: BaseException) -> None:
        signum = self.stop.requested if self.stop is not None else None
        if signum is not None or isinstance(err, KeyboardInterrupt):
            name = signal.Signals(signum).name if signum is not None else "SIGINT"
            self.results.status = Status.INTERRUPTED
            self.results.error = (f"stopped by {name}" + ("; the latest training state was kept: rerun "
                                     "the same command to resume from it" if self.stop is not None and self.stop.state_saved and self.save_state else ""))
        else:
            self.results.status = Status.FAILED
            self.results.error = f"{type(err).__name__}: {err}"
        try:
            self._write()
        except OSError as write_err:  # e.g. the disk is full: say so, keep the original error
            log.error("could not record status %r in results.json: %s", str(self.results.status), write_err)

    # ------------------------------------------------------------------ stage cache
    def _cache_lookup(self, key: Optional[str]) -> Optional[CachedStage]:
        if key is None:
            return None
        hit = self.cache.load(key)
        log.info("stage cache %s: %s", "hit" if hit else "miss", key)
        return hit

    def _apply_cached(self, stage: int, hit: CachedStage, entry: StageRecord, restore_rng: bool = True) -> None:
        """Take stage ``stage``'s outcome from the cache: weights, step counter, evaluation rows, predictions,
        the computed parts of its entry (drift and diagnostics included: the observers only read them), and
        (last) the RNG state it ended with."""
        record = hit.record
        if hit.model is not None:
            self.backbone.model.load_state_dict(hit.model)
        self.trainer.global_step = record["global_step"]
        entry.update(record["entry"])  # the entry's JSON keys, as the computing run wrote them
        entry.seconds.update({f"cached_{k}": v for k, v in record["seconds"].items()})
        entry.stage_cache = {"key": hit.key, "hit": True, "source": record.get("source"),
                             "seconds_saved": sum(record["seconds"].values())}
        scores = [TaskScore(**s) for s in record["scores"]]
        general = [TaskScore(**g) for g in record["general_scores"]]
        if self.is_main and hit.predictions:
            folder = self.run_dir / "predictions" / f"stage{stage}"
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in hit.predictions.items():
                (folder / name).write_bytes(data)
        self._record_eval(stage, scores, general, entry)
        if stage > 0:
            self._notify("on_stage_end", stage, entry, cached=True)
        if restore_rng:
            set_rng_state(hit.rng)

    def _cache_store(self, key: Optional[str], stage: int, entry: StageRecord, scores: list[TaskScore],
                     general: list[TaskScore], seconds: dict) -> None:
        if key is None:
            return
        written = entry.to_json()
        record = {
            "stage": stage,
            "task": entry.task,
            "entry": {k: written[k] for k in CACHED_ENTRY_KEYS if k in written},
            "scores": [dataclasses.asdict(x) for x in scores],
            "general_scores": [dataclasses.asdict(x) for x in general],
            "global_step": self.trainer.global_step,
            "seconds": seconds,
            "source": str(self.run_dir),
        }
        if self.cache_store_error is not None:  # an earlier write failed: storing is off for this run
            entry.stage_cache = {"key": key, "hit": False, "stored": False}
            return
        model = self.backbone.model.state_dict() if stage > 0 else None
        try:
            stored = self.cache.store(key, record, model, rng_state(),
                                      self.run_dir / "predictions" / f"stage{stage}")
        except OSError as err:  # read-only, full disk, permissions: the cache is an optimisation, never a loss
            self.cache_store_error = f"{type(err).__name__}: {err}"
            log.warning("stage cache: could not store stage %d in %s (%s); storing is off for the rest of this "
                        "run (lookups go on, the results are unaffected)", stage, self.cache.dir,
                        self.cache_store_error)
            stored = False
        entry.stage_cache = {"key": key, "hit": False, "stored": stored}

    # ------------------------------------------------------------------ training state
    def _save_train_state(self, kind: str, stage: int, entry: Optional[StageRecord] = None,
                          data: Optional[StageData] = None, fit: Optional[dict] = None,
                          stage_step: Optional[int] = None) -> None:
        """kind ``stage_end`` (stage ``stage`` finished and recorded) or ``mid_stage`` (inside its training,
        after ``stage_step`` optimizer steps of the stage)."""
        if not self.save_state:
            return
        # Every rank comes here together. Under DeepSpeed the ranks take part: ZeRO-3 gathers the weights
        # (a collective), and mid-stage each rank writes its own optimizer partition before rank 0 saves
        # (rank_state() is None on one process: no per-rank files).
        # Row 0's state (the base model evaluated): the weights are the ones the run loads, not saved again.
        model_state = None if (kind, stage) == ("stage_end", 0) else self.trainer.full_state_dict()
        rank_states = None
        own = self.trainer.rank_state() if fit is not None else None
        if own is not None:
            rank_states = ckpt.write_rank_state(self.run_dir, self.trainer.global_step, self.trainer.rank, own)
            self.trainer.barrier()
        if self.is_main:
            self._write_train_state(kind, stage, model_state, entry, data, fit, rank_states, stage_step)
        if rank_states is not None:
            self.trainer.barrier()  # no rank stages its next state before rank 0 has moved this one in

    def _write_train_state(self, kind: str, stage: int, model_state: dict, entry: Optional[StageRecord],
                           data: Optional[StageData], fit: Optional[dict], rank_states,
                           stage_step: Optional[int] = None) -> None:
        state = {
            "model": model_state,
            "global_step": self.trainer.global_step,
            "rng": rng_state(),
            "entry": entry.to_json() if entry is not None else None,  # the stage's results.json entry so far
            "data_stats": data.stats if data is not None else None,
            "fit": fit,
        }
        self._notify("on_train_state", kind, state)  # e.g. π_{t-1} for the diagnostics of a resumed stage
        examples = [dataclasses.asdict(e) for e in data.examples] if data is not None else None
        info = {"kind": kind, "stage": stage, "global_step": self.trainer.global_step,
                "stage_step": stage_step}
        ckpt.save_train_state(self.run_dir, state, examples, self.results.to_json(), info, rank_states)

    def _step_hook(self, stage: int, entry: StageRecord, data: StageData):
        """The trainer's ``step_hook`` for stage ``stage``: runs after every optimizer step (on every rank).

        With a resumable position (``make_state``: steps of the stage's first ``fit_sft``, and the on-policy
        methods' steps) it saves a mid-stage training state every ``every_steps`` steps and when a stop was
        requested. Without one (a later ``fit_sft`` of the stage, a method's own steps without a position)
        nothing is saved mid-stage, since a state without a position could not be resumed; a stop request then
        stops at once, and the latest training state (the previous stage's end) is where the same command
        resumes, running this stage again from its start.
        """
        announced = False

        def hook(stage_step: int, make_state) -> None:
            nonlocal announced
            stage_step += self._phase_offset  # the trainer counts the current phase's steps
            self._notify("on_step", stage, stage_step, self.trainer)
            periodic = self.every_steps is not None and stage_step % self.every_steps == 0
            # all ranks save together: stop when any rank got the signal
            stopping = self.trainer.any_rank(self.stop is not None and self.stop.requested is not None)
            if make_state is not None and (periodic or stopping):
                self._save_train_state("mid_stage", stage, entry, data, make_state(), stage_step)
            elif make_state is None and periodic and not announced and self.save_state and self.is_main:
                announced = True
                log.info("stage %d: method %r takes steps without a resumable position: no mid-stage training "
                         "state (checkpoint.every_steps); saved at the stage end only",
                         stage, self.method.name)
            if stopping:
                if make_state is None and self.save_state and self.is_main:
                    log.warning("stage %d: stopping at step %d without a mid-stage training state (method %r "
                                "has no resumable position there); a resume runs stage %d again from its start",
                                stage, stage_step, self.method.name, stage)
                self.stop.finish()
        return hook

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.requested is not None:
            self.stop.finish()

    def _restore(self) -> tuple[int, Optional[dict]]:
        """Apply ``resume_from`` (results, weights, step counter, stage cache chain and, last, the RNG state);
        returns (first stage to run, the mid-stage state of that stage or None)."""
        first, mid = self._restore_state()
        self.t0 -= self.results.seconds_elapsed or 0.0
        if self.cache is not None and info_kind(self.resume_from) == "stage_end":
            self.cache_key = (self.results.stages[-1].stage_cache or {}).get("key")
        set_rng_state(self.resume_from["state"]["rng"])  # last: nothing between here and the saved point draws
        self.resume_from = None
        return first, mid

    def _restore_state(self) -> tuple[int, Optional[dict]]:
        saved = self.resume_from
        info, state = saved["info"], saved["state"]
        # this attempt's machine and code (set by opr.run before the loop runs), before the saved record replaces
        # them: the record keeps the first attempt's under ``run`` and each later one's under ``resumed[i].run``
        attempt = {k: self.results.run[k] for k in REPRODUCTION_KEYS if k in (self.results.run or {})}
        self.results = RunResults.from_json(saved["results"])
        if self.results.resumed is None:
            self.results.resumed = []
        entry = {"kind": info["kind"], "stage": info["stage"], "global_step": info["global_step"]}
        if attempt:
            entry["run"] = attempt
            first = self.results.run or {}
            changed = [f"{k}: {first.get(k)!r} -> {v!r}" for k, v in attempt.items()
                       if k in ("git_commit", "git_dirty", "cpu", "cpu_features", "gpu", "torch", "transformers")
                       and k in first and first[k] != v]
            if changed:
                log.warning("this run resumes on other code or another machine than it started on (%s): its "
                            "numbers mix both; results.json keeps each attempt's facts under resumed[i].run",
                            "; ".join(changed))
        self.results.resumed.append(entry)
        if state["model"] is not None:  # None: row 0's state, the base weights the run loaded
            self.backbone.model.load_state_dict(state["model"])
        self.trainer.global_step = state["global_step"]
        log.info("resuming from %s state of stage %d (global step %d)", info["kind"], info["stage"],
                 info["global_step"])
        if info["kind"] == "stage_end":
            return info["stage"] + 1, None
        ranks = saved["folder"] / ckpt.RANKS_DIR
        return info["stage"], {**state, "examples": saved["examples"],
                               "rank_states": str(ranks) if ranks.is_dir() else None}
