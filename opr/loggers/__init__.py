"""Loggers: ``none`` writes nothing beyond the console and the run's files; ``wandb`` is added beside it.

Every logger has the same calls: ``start(config, run_dir)`` before training and ``finish()`` after it, also
when it fails (``opr.run``); ``log_step(metrics, step)`` per optimizer step (the trainer);
``log_stage(stage, metrics)`` per evaluated stage and ``log_final(results, run_dir)`` once results.json is
written (the loop, on global rank 0 only). Metric names are namespaced: ``train/loss``,
``stage{t}/eval/{task}``, ``final/OP``.

A logger must never take training down: apart from configuration errors (raised by the constructor or
``start``, before training), these calls raise nothing; a logger whose backend fails warns once, naming the
error, and logs nothing more (``WandbLogger`` does).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("opr")


class NoLogger:
    """Logs stage summaries to the console (Python logging) and nothing else."""

    def __init__(self, **_: object) -> None:
        pass

    def start(self, config: dict, run_dir: Path) -> None:
        pass

    def log_step(self, metrics: dict, step: int) -> None:
        pass

    def log_stage(self, stage: int, metrics: dict) -> None:
        shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items() if "/eval/" in k}
        if shown:  # the loop also logs drift and diagnostics per stage; the console shows scores only
            log.info("stage %d: %s", stage, shown)

    def log_final(self, results: dict, run_dir: Path) -> None:
        pass

    def finish(self) -> None:
        pass
