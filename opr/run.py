"""Build every component from the validated config and run the continual loop."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from opr import checkpoint as ckpt
from opr import distributed
from opr import stage_cache as sc
from opr.attention import describe as describe_attention
from opr.config import ConfigError, build, validate
from opr.evaluation import EvalSettings
from opr.loop import ContinualLoop, peak_rss_mb
from opr.observers import (
    CheckpointObserver,
    DiagnosticsObserver,
    DriftObserver,
    InsideStageEval,
    LoggerObserver,
    Observer,
    ReplayDumpObserver,
)
from opr.provenance import reproduction_facts
from opr.results import format_table
from opr.rundir import RunDirInUse, RunDirLock, keep_hydra_files, restore_hydra_files
from opr.stage_cache import StageCache
from opr.train_state import GracefulStop

log = logging.getLogger("opr")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Config keys that may differ between an interrupted run and its resumption (where and how it is kept and logged).
RESUME_FREE_KEYS = ("resume", "checkpoint", "run_dir", "stage_cache", "logger")


def keep_previous_results(run_dir: Path, why: str) -> None:
    """Before a run starts over in a directory that holds results: keep them as ``results.json.bak-<time>``
    and say so (finished work is never overwritten silently)."""
    old = run_dir / "results.json"
    if not old.is_file():
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = old.with_name(f"results.json.bak-{stamp}")
    old.replace(kept)
    log.warning("%s: starting over in %s (%d finished stage(s) there); its results.json is kept as %s", why,
                run_dir, finished_stages_of(kept), kept.name)


def finished_stages_of(path: Path) -> int:
    """Trained stages recorded in a results.json (0 when it is absent or unreadable)."""
    try:
        return max(0, len(json.loads(path.read_text()).get("matrix", [])) - 1)
    except (OSError, ValueError):
        return 0


_ABSENT = object()


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every dotted key whose value differs (nested mappings are followed down to the
    field: ``method.lr: 1e-05 -> 0.0001``); a key only one side has reads ``(absent)`` on the other."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        else:
            shown = ["(absent)" if v is _ABSENT else repr(v) for v in (a, b)]
            out.append(f"{prefix}{key}: {shown[0]} -> {shown[1]}")
    return out


def find_resume_state(cfg: DictConfig, config: dict) -> Optional[dict]:
    """The training state to continue from, per ``cfg.resume`` (auto | true | false), or None.

    The saved run's config must equal this one (except ``resume``, ``checkpoint.*`` and ``run_dir``): a
    different experiment in the same run directory is an error, not something to continue.
    """
    run_dir = Path(cfg.run_dir)
    if cfg.resume is False:
        keep_previous_results(run_dir, "resume=false")
        return None
    folder = ckpt.latest_train_state(run_dir)
    if folder is None:
        if cfg.resume is True:
            raise ConfigError(f"resume=true but {run_dir / ckpt.STATE_DIR} holds no complete training "
                              "state; use resume=auto (the default) to start fresh when there is none")
        unmarked = ckpt.state_folders_without_marker(run_dir)
        finished = finished_stages_of(run_dir / "results.json")
        if unmarked and finished:
            raise ConfigError(f"{run_dir} holds results of {finished} finished stage(s) but its training state "
                              f"{unmarked[-1]} has no {ckpt.STATE_MARKER} marker, so it cannot be trusted; rerun "
                              "with resume=false to start over (results.json is kept as a .bak copy), or use "
                              "another run directory")
        keep_previous_results(run_dir, "no training state to resume from")
        return None
    try:
        saved = ckpt.load_train_state(folder)
    except ckpt.CorruptTrainState as err:
        raise ConfigError(f"cannot resume {run_dir}: {err}. Rerun with resume=false to start over (results.json "
                          "is kept as a .bak copy), or use another run directory") from err
    old = {k: v for k, v in saved["results"]["config"].items() if k not in RESUME_FREE_KEYS}
    new = {k: v for k, v in config.items() if k not in RESUME_FREE_KEYS}
    if old != new:
        diff = "; ".join(config_differences(old, new))
        raise ConfigError(f"{cfg.run_dir} holds a training state of a different config (saved -> now: {diff}); "
                          "use another run directory, or resume=false to overwrite it")
    log.info("found training state %s", folder)
    return saved


def open_stage_cache(cfg: DictConfig, config: dict, backbone, benchmark) -> tuple[StageCache, dict]:
    """The cache and row 0's key parts except the RNG state (the loop adds it): code, environment, run config,
    initial weights, tokenizer and task data, each hashed."""
    clock = time.perf_counter()
    identity = dict(code=sc.code_version(), env=sc.environment_identity(), config=config,
                    weights=sc.hash_state_dict(backbone.model.state_dict()),
                    tokenizer=sc.hash_tokenizer(backbone.tokenizer), benchmark=sc.hash_benchmark(benchmark))
    log.info("stage cache %s (identity hashed in %.1f s)", cfg.stage_cache.dir, time.perf_counter() - clock)
    return StageCache(cfg.stage_cache.dir, cfg.stage_cache.max_gb), identity


def build_observers(cfg: DictConfig, run_dir: Path, backbone, benchmark, trainer, logger,
                    eval_settings: EvalSettings) -> list[Observer]:
    """The loop's observers (opr.observers), in the order they are told: drift and diagnostics first (the
    dashboard logs what they computed), then replay dumps, the logger and the stage checkpoints. Only rank 0
    dumps and logs; every rank computes its share of the drift, of the policy diagnostics and of the
    inside-stage evaluation, and times its (rank 0's) checkpoint."""
    observers: list[Observer] = []
    is_main = trainer.rank == 0
    # on every rank, each its share of the parameters: copies its base weights now, before any resume restores
    # later ones
    if cfg.analysis.drift:
        observers.append(DriftObserver(backbone, k=cfg.analysis.k, svd=cfg.analysis.svd, ranks=trainer))
    # π_0, copied now; on every rank: each computes its share of the probe
    if cfg.analysis.diagnostics and cfg.analysis.probe_per_task:
        observers.append(DiagnosticsObserver(backbone, benchmark, cfg.analysis.probe_per_task, cfg.seed,
                                             eval_settings, trainer.max_length))
    if cfg.eval.every_steps is not None:  # on every rank: each evaluates its share of the prompts
        pool = list(benchmark.tasks) + list(benchmark.general)
        chosen = cfg.eval.inside_stage_tasks
        tasks = pool if chosen is None else [t for t in pool if t.name in set(chosen)]
        observers.append(InsideStageEval(backbone, tasks, eval_settings, cfg.eval.every_steps, cfg.seed, logger))
    if is_main:
        observers += [ReplayDumpObserver(run_dir), LoggerObserver(logger, run_dir)]
    observers.append(CheckpointObserver(backbone, run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                        save=cfg.checkpoint.save and is_main))
    return observers


def refused(run_dir: Path, message: str, restore: bool = True) -> ConfigError:
    """The error of a run refused before work starts; Hydra's files in ``run_dir`` go back to the run it holds."""
    restored = restore and restore_hydra_files(run_dir)
    note = f" ({run_dir / '.hydra'} restored to the run it holds)" if restored else ""
    return ConfigError(f"{message}{note}")


def start_ranks(cfg: DictConfig) -> distributed.LaunchEnv:
    """Make this process a rank of the run (:mod:`opr.distributed`: ``RANK`` from a launcher, or SLURM's tasks)
    and join the process group; refuse, before anything loads, a layout the config cannot run."""
    try:
        layout = distributed.launch_env()
    except distributed.LaunchError as err:
        raise ConfigError(str(err)) from err
    if layout.world_size > 1:
        engine = cfg.engine._target_.rsplit(".", 1)[-1]
        if engine != "DeepSpeedTrainer":
            raise ConfigError(f"this launch has {layout.world_size} processes (from {layout.source}) but "
                              f"engine={cfg.engine.get('name')!r} trains in one process: use engine=deepspeed, "
                              "or launch one process")
    check_rollout_backend(cfg, layout.world_size, torch.cuda.is_available())
    if layout.world_size > 1:
        if layout.source == "slurm":
            distributed.export(layout)
        distributed.init_process_group(layout, cfg.engine.collective_timeout_min)
        if layout.rank != 0:  # rank-0 logging: the others say only what goes wrong
            logging.getLogger("opr").setLevel(logging.WARNING)
            os.environ["TQDM_DISABLE"] = "1"
    return layout


def check_rollout_backend(cfg: DictConfig, world_size: int, cuda: bool) -> None:
    """Refuse, before anything loads, a ``rollout.backend=vllm`` run that :class:`opr.generation_vllm.VLLMBackend`
    cannot run: without a CUDA GPU (vLLM's engine and its sleep mode need one), or with
    ``rollout.vllm.tensor_parallel_size`` other than 1 (each rank's engine holds the whole model beside the
    trainer). Several processes need ``engine=deepspeed``, which :func:`start_ranks` checks for every backend."""
    if cfg.rollout.backend != "vllm":
        return
    ranks = f"{world_size} process{'es' if world_size > 1 else ''}"
    if not cuda:
        raise ConfigError(f"rollout.backend=vllm needs a CUDA GPU per process (vLLM's engine and its sleep mode "
                          f"run on CUDA only) and this machine has none ({ranks}); use rollout.backend=hf")
    tp = cfg.rollout.vllm.tensor_parallel_size
    if tp != 1:
        raise ConfigError(f"rollout.vllm.tensor_parallel_size={tp} with {ranks}: the vLLM engine runs beside the "
                          "trainer, one whole model on each rank's GPU, so only tensor_parallel_size=1 is allowed "
                          "(more GPUs: launch more processes with engine=deepspeed)")


def vllm_options(cfg: DictConfig, benchmark, backbone) -> dict:
    """``rollout.vllm`` as :class:`opr.generation_vllm.VLLMBackend` takes it, with the run's seed and, when
    ``max_model_len`` is null, the longest sequence the run asks for (:func:`opr.generation_vllm.max_model_len_for`:
    ``eval.max_prompt_length``, which cuts evaluation and rollout prompts alike, plus the longest answer limit of
    the tasks, the general sets and the method's own ``max_new_tokens`` options)."""
    from opr.evaluation import context_length
    from opr.generation_vllm import max_model_len_for

    options = OmegaConf.to_container(cfg.rollout.vllm, resolve=True)
    if options["max_model_len"] is None:
        answers = [t.max_new_tokens for t in list(benchmark.tasks) + list(benchmark.general)]
        answers += method_answer_limits(OmegaConf.to_container(cfg.method, resolve=True))
        options["max_model_len"] = max_model_len_for(cfg.eval.max_prompt_length, answers, context_length(backbone))
        if options["max_model_len"] is None:
            log.warning("rollout.backend=vllm: eval.max_prompt_length is null, so prompts are not capped and the "
                        "engine takes the model's whole context as max_model_len; set eval.max_prompt_length (or "
                        "rollout.vllm.max_model_len) to keep its KV cache to what the run uses")
        else:
            log.info("rollout.vllm.max_model_len=%d (eval.max_prompt_length %d + the longest answer limit %d)",
                     options["max_model_len"], cfg.eval.max_prompt_length, max(answers))
    return {**options, "seed": int(cfg.seed)}


def method_answer_limits(node) -> list[int]:
    """Every integer ``max_new_tokens`` in a method's config, nested ones included (``sft_then_grpo.grpo``).

    >>> method_answer_limits({"max_new_tokens": None, "grpo": {"max_new_tokens": 96}})
    [96]
    """
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "max_new_tokens" and isinstance(v, int)]
        return found + [x for k, v in node.items() if k != "max_new_tokens" for x in method_answer_limits(v)]
    if isinstance(node, list):
        return [x for v in node for x in method_answer_limits(v)]
    return []


def check_memory_plan(cfg: DictConfig, world_size: int) -> None:
    """On a GPU (and with ``check_memory``), refuse a run whose memory plan does not fit this GPU, naming the
    largest items; nothing to check on CPU, or for a backbone whose shape is unknown (``tiny``)."""
    if not (cfg.check_memory and torch.cuda.is_available()):
        return
    from opr.memory_plan import GB, MARGIN, plan, shape_for

    node = OmegaConf.to_container(cfg, resolve=True)
    try:
        shape = shape_for(node["backbone"]["name"], node["backbone"].get("path"))
    except ValueError:
        log.info("memory plan: no shape known for backbone %s; not checked", node["backbone"]["name"])
        return
    gpu_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB
    result = plan(node, shape, gpus=world_size, gpu_gb=gpu_gb)
    log.info("memory plan: peak per GPU %.1f GB of %.1f GB", result.peak_bytes / GB, gpu_gb)
    if not result.fits():
        largest = ", ".join(f"{i.name} {i.gpu / GB:.1f} GB" for i in result.largest())
        raise ConfigError(
            f"the memory plan needs {result.peak_bytes / GB:.1f} GB per GPU, more than {MARGIN:.0%} of this GPU's "
            f"{gpu_gb:.1f} GB; the largest items: {largest}. Lower eval.batch_size / rollout.batch_size or cap "
            "eval.max_prompt_length, set engine=deepspeed engine.zero_stage=3 engine.gradient_checkpointing=true, "
            "turn analysis.diagnostics off, or use more GPUs (python -m opr.tools.plan prints the whole plan; "
            "check_memory=false starts anyway)")


def one_run_dir(cfg: DictConfig, layout: distributed.LaunchEnv) -> None:
    """Every rank takes rank 0's run directory (``hydra.run.dir`` holds ``${now:...}``, resolved in each
    process: ranks started in different seconds would otherwise write to different folders). A rank whose own
    Hydra folder differs removes what Hydra wrote there (``.hydra/``, the job log) and the folder if empty."""
    if layout.world_size == 1:
        return
    own = Path(cfg.run_dir)
    main = Path(distributed.broadcast_from_main(str(own)))
    if own.resolve() != main.resolve():
        shutil.rmtree(own / ".hydra", ignore_errors=True)
        for f in own.glob("*.log"):
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            own.rmdir()
        cfg.run_dir = str(main)


def run_experiment(cfg: DictConfig) -> dict:
    """Validate (before anything loads), build, run; returns the results dict also written to results.json
    (``RunResults.to_json()``).

    With ``resume`` auto/true and a complete training state in ``run_dir``, the run continues from it. With
    several ranks (:func:`start_ranks`) rank 0 decides the run directory, holds its lock and checks the resume;
    a refusal there is every rank's refusal.
    """
    try:
        cfg = validate(cfg)
        layout = start_ranks(cfg)
        check_memory_plan(cfg, layout.world_size)
    except ConfigError as err:
        raise refused(Path(cfg.run_dir).expanduser(), str(err)) from err  # as validate() expands it
    one_run_dir(cfg, layout)
    run_dir = Path(cfg.run_dir)
    lock = RunDirLock(run_dir) if layout.rank == 0 else None
    refusal = None
    try:  # every refusal before work starts leaves the directory's files as they were
        if lock is not None:
            lock.acquire()
        config = OmegaConf.to_container(cfg, resolve=True)
        resume_from = find_resume_state(cfg, config) if layout.rank == 0 else None
    except (ConfigError, RunDirInUse) as err:
        refusal = err
    message = distributed.broadcast_from_main(None if refusal is None else str(refusal))
    if message is not None:
        if lock is not None:
            lock.release()
        raise refused(run_dir, message, restore=layout.rank == 0) from refusal
    if layout.world_size > 1:  # the other ranks read the state rank 0 found (memory-mapped: one copy per node)
        folder = distributed.broadcast_from_main(None if resume_from is None else str(resume_from["folder"]))
        if layout.rank != 0 and folder is not None:
            resume_from = ckpt.load_train_state(Path(folder))
    if layout.rank == 0:
        keep_hydra_files(run_dir)
    try:
        return _run(cfg, run_dir, config, resume_from)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: DictConfig, run_dir: Path, config: dict, resume_from: Optional[dict]) -> dict:
    seed_everything(cfg.seed)
    logger = build(cfg.logger)
    timings = {}
    clock = time.perf_counter()
    try:
        benchmark = build(cfg.benchmark)
    except (FileNotFoundError, ValueError) as err:  # missing data, malformed records, bad task names
        raise ConfigError(f"benchmark ({cfg.benchmark.name}): {err}") from err
    timings["benchmark"] = time.perf_counter() - clock
    names = {t.name for t in benchmark.tasks} | {g.name for g in benchmark.general}
    unknown_inside = sorted(set(cfg.eval.inside_stage_tasks or []) - names)
    if unknown_inside:
        raise ConfigError(f"eval.inside_stage_tasks names {unknown_inside}, which are not among the stream's tasks "
                          f"and general sets {sorted(names)}")
    clock = time.perf_counter()
    backbone = build(cfg.backbone, seed=cfg.seed)
    timings["model_load"] = time.perf_counter() - clock
    if cfg.rollout.backend == "vllm":
        from opr.generation_vllm import VLLMBackend

        # built lazily, at the first generation, by every rank together (after the trainer joined the group)
        backbone.generation_backend = VLLMBackend(**vllm_options(cfg, benchmark, backbone))
    trainer = build(cfg.engine, backbone=backbone, logger=logger, seed=cfg.seed)
    unknown = sorted(set(trainer.epochs_per_task) - {t.name for t in benchmark.tasks})
    if unknown:
        raise ConfigError(f"engine.epochs_per_task names task(s) {unknown} that are not in the stream "
                          f"{[t.name for t in benchmark.tasks]}")
    method = build(cfg.method)
    cache, identity = None, None
    if cfg.stage_cache.dir is not None:
        cache, identity = open_stage_cache(cfg, config, backbone, benchmark)
    logger.start(config, run_dir)
    # SIGTERM / SLURM pre-emption: save a training state at the next safe point, or leave after stop_grace_s
    stop = GracefulStop(grace_s=cfg.checkpoint.stop_grace_s)
    eval_settings = EvalSettings.from_config(cfg.eval, trainer.compute_dtype)
    observers = build_observers(cfg, run_dir, backbone, benchmark, trainer, logger, eval_settings)
    loop = ContinualLoop(
        benchmark=benchmark,
        backbone=backbone,
        method=method,
        trainer=trainer,
        run_dir=run_dir,
        eval_settings=eval_settings,
        config=config,
        observers=observers,
        stage_cache=cache,
        cache_identity=identity,
        resume_from=resume_from,
        stop=stop,
        load_base_model=lambda: build(cfg.backbone, seed=cfg.seed).model,  # the base, even after a resume
    )
    loop.results.seconds_setup = timings
    loop.results.run["peak_rss_mb"] = peak_rss_mb()
    loop.results.run.update(reproduction_facts())
    loop.results.run["packed_attention"] = describe_attention(backbone.model, trainer.compute_dtype)
    try:
        results = loop.run()
    finally:
        logger.finish()
        stop.restore()
    log.info("results in %s\n%s", run_dir / "results.json", format_table(results))
    return results.to_json()
