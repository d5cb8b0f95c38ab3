"""Build every component from the validated config and run the continual loop."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from opr.config import ConfigError, build, validate
from opr.evaluation import EvalSettings
from opr.loop import ContinualLoop, format_table

log = logging.getLogger("opr")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_experiment(cfg: DictConfig) -> dict:
    """Validate (before anything loads), build, run; returns the results dict also written to results.json."""
    cfg = validate(cfg)
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.seed)
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = build(cfg.logger)
    timings = {}
    clock = time.perf_counter()
    try:
        benchmark = build(cfg.benchmark)
    except (FileNotFoundError, ValueError) as err:  # missing data, malformed records, bad task names
        raise ConfigError(f"benchmark ({cfg.benchmark.name}): {err}") from err
    timings["benchmark"] = time.perf_counter() - clock
    clock = time.perf_counter()
    backbone = build(cfg.backbone, seed=cfg.seed)
    timings["model_load"] = time.perf_counter() - clock
    trainer = build(cfg.engine, backbone=backbone, logger=logger, seed=cfg.seed)
    unknown = sorted(set(getattr(trainer, "epochs_per_task", {})) - {t.name for t in benchmark.tasks})
    if unknown:
        raise ConfigError(f"engine.epochs_per_task names task(s) {unknown} that are not in the stream "
                          f"{[t.name for t in benchmark.tasks]}")
    method = build(cfg.method)
    logger.start(config, run_dir)
    loop = ContinualLoop(
        benchmark=benchmark,
        backbone=backbone,
        method=method,
        trainer=trainer,
        run_dir=run_dir,
        budget=cfg.budget,
        seed=cfg.seed,
        eval_settings=EvalSettings(
            batch_size=cfg.eval.batch_size,
            temperature=cfg.eval.temperature,
            max_examples=cfg.eval.max_examples,
            max_prompt_length=cfg.eval.max_prompt_length,
            compute_dtype=trainer.compute_dtype,
        ),
        logger=logger,
        config=config,
        rollout_batch_size=cfg.rollout.batch_size,
        checkpoint_keep_last=cfg.checkpoint.keep_last,
        save_checkpoints=cfg.checkpoint.save,
        is_main=getattr(trainer, "rank", 0) == 0,
        drift=dict(k=cfg.analysis.k, svd=cfg.analysis.svd) if cfg.analysis.drift else None,
    )
    loop.results["seconds_setup"] = timings
    try:
        results = loop.run()
    finally:
        logger.finish()
    log.info("results in %s\n%s", run_dir / "results.json", format_table(results))
    return results
