"""The continual loop shared by every method.

    R[0, :] = evaluate(model, all tasks)                      # before any training
    for t, task in enumerate(stream, 1):
        data = method.stage_data(ctx)                         # SFT mixture, or prompts for on-policy methods
        method.train_stage(ctx, data)
        R[t, :] = evaluate(model, all tasks)                  # past, current and future tasks
        checkpoint(stage t); write results.json               # so finished work survives any later failure
    metrics = continual_metrics(R)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from opr import checkpoint as ckpt
from opr.backbones import Backbone
from opr.engine.torch_engine import NonFiniteLoss
from opr.evaluation import EvalSettings, TaskScore, evaluate_all
from opr.methods.base import StageContext
from opr.metrics.continual import continual_metrics
from opr.types import Benchmark

log = logging.getLogger("opr")


class StageDiverged(RuntimeError):
    """Raised after a NaN/inf loss; results.json and the last good checkpoint are kept."""


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


class ContinualLoop:
    def __init__(
        self,
        benchmark: Benchmark,
        backbone: Backbone,
        method,
        trainer,
        run_dir: Path,
        budget: float,
        seed: int,
        eval_settings: EvalSettings,
        logger,
        config: dict,
        rollout_batch_size: int = 32,
        checkpoint_keep_last: int = 1,
        save_checkpoints: bool = True,
        is_main: bool = True,
        drift: Optional[dict] = None,
    ) -> None:
        self.benchmark, self.backbone, self.method, self.trainer = benchmark, backbone, method, trainer
        self.run_dir, self.budget, self.seed = Path(run_dir), budget, seed
        self.eval_settings, self.logger, self.config = eval_settings, logger, config
        self.rollout_batch_size = rollout_batch_size
        self.keep_last, self.save_checkpoints, self.is_main = checkpoint_keep_last, save_checkpoints, is_main
        # Drift against the base weights: a CPU copy of the stage-0 state, and the base's SVD factors cached
        # across stages (only the checkpoint side is decomposed again).
        self.drift = drift if drift and is_main else None
        if self.drift:
            self.base_state = {k: v.detach().to("cpu", copy=True) for k, v in backbone.model.state_dict().items()}
            self.base_svd_cache: dict = {}
        tasks = benchmark.tasks
        self.results: dict = {
            "config": config,
            "run": {
                "world_size": getattr(trainer, "world_size", 1),
                "per_device_batch": trainer.batch_size,
                "grad_accum": trainer.grad_accum,
                "global_batch": trainer.batch_size * trainer.grad_accum * getattr(trainer, "world_size", 1),
                "compute_dtype": trainer.compute_dtype,
                "backbone_source": backbone.source,
                "seed": seed,
            },
            "tasks": [t.name for t in tasks],
            "matrix": [],
            "general": {"tasks": [g.name for g in benchmark.general], "matrix": []},
            "metrics": {},
            "stages": [],
            "manifest": benchmark.manifest,
            "status": "running",
        }

    # ------------------------------------------------------------------ pieces
    def _evaluate(self, stage: int) -> tuple[list[TaskScore], list[TaskScore]]:
        out = self.run_dir / "predictions" / f"stage{stage}" if self.is_main else None
        settings = self.eval_settings
        scores = evaluate_all(self.backbone, self.benchmark.tasks, settings, out, seed=self.seed)
        general = evaluate_all(self.backbone, self.benchmark.general, settings, out, seed=self.seed)
        return scores, general

    def _record_eval(self, stage: int, scores: list[TaskScore], general: list[TaskScore], entry: dict) -> None:
        self.results["matrix"].append([s.score for s in scores])
        self.results["general"]["matrix"].append([g.score for g in general])
        entry["eval"] = {s.task: s.score for s in scores}
        entry["general"] = {g.task: g.score for g in general}
        entry["empty_rate"] = {s.task: s.empty_rate for s in scores + general}
        entry["format_error_rate"] = {s.task: s.format_error_rate for s in scores if s.format_error_rate is not None}
        metrics = {f"stage{stage}/eval/{s.task}": s.score for s in scores}
        metrics.update({f"stage{stage}/general/{g.task}": g.score for g in general})
        metrics.update({f"stage{stage}/empty_rate/{s.task}": s.empty_rate for s in scores})
        if self.is_main:
            self.logger.log_stage(stage, metrics)

    def _drift(self) -> dict:
        from opr.analysis.drift import drift_summary

        state = {k: v.detach().to("cpu") for k, v in self.backbone.model.state_dict().items()}
        return drift_summary(self.base_state, state, k=self.drift["k"], method=self.drift["svd"],
                             base_cache=self.base_svd_cache)

    def _write(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "results.json", self.results)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        tasks = self.benchmark.tasks
        t0 = time.perf_counter()
        scores, general = self._evaluate(0)
        entry: dict = {"stage": 0, "task": None, "train_examples": 0, "seconds": {}}
        self._record_eval(0, scores, general, entry)
        entry["seconds"]["eval"] = time.perf_counter() - t0
        self.results["stages"].append(entry)
        self._write()
        for t, task in enumerate(tasks, 1):
            entry = {"stage": t, "task": task.name, "seconds": {}}
            ctx = StageContext(
                stage=t, task=task, past=tasks[: t - 1], backbone=self.backbone, trainer=self.trainer,
                budget=self.budget, seed=self.seed, rollout_batch_size=self.rollout_batch_size,
                compute_dtype=self.eval_settings.compute_dtype,
            )
            clock = time.perf_counter()
            data = self.method.stage_data(ctx)
            entry["seconds"]["data"] = time.perf_counter() - clock
            entry["train_examples"] = len(data.examples)
            entry.update(data.stats)
            clock = time.perf_counter()
            try:
                entry["train"] = self.method.train_stage(ctx, data)
            except NonFiniteLoss as err:
                self.results["status"] = "diverged"
                self.results["error"] = f"stage {t} ({task.name}): {err}"
                self._write()
                last = ckpt.latest_stage(self.run_dir / "checkpoints")
                raise StageDiverged(
                    f"training diverged at stage {t} ({task.name}): {err}. Kept results.json with "
                    f"{len(self.results['matrix']) - 1} finished stage(s)"
                    + (f" and the checkpoint of stage {last}." if last is not None else ".")
                ) from err
            entry["seconds"]["train"] = time.perf_counter() - clock
            clock = time.perf_counter()
            scores, general = self._evaluate(t)
            entry["seconds"]["eval"] = time.perf_counter() - clock
            self._record_eval(t, scores, general, entry)
            clock = time.perf_counter()
            if self.save_checkpoints and self.is_main:
                ckpt.save_stage(self.run_dir / "checkpoints", t, self.backbone, {"task": task.name}, self.keep_last)
            entry["seconds"]["checkpoint"] = time.perf_counter() - clock
            if self.drift:
                clock = time.perf_counter()
                entry["drift"] = self._drift()
                entry["seconds"]["drift"] = time.perf_counter() - clock
            self.results["stages"].append(entry)
            self._write()
        self.results["metrics"] = continual_metrics(self.results["matrix"])
        g = self.results["general"]["matrix"]
        if g and g[0]:
            self.results["metrics"]["general_drift"] = sum(g[-1]) / len(g[-1]) - sum(g[0]) / len(g[0])
        self.results["seconds_total"] = time.perf_counter() - t0
        self.results["status"] = "complete"
        self._write()
        if self.is_main:
            self.logger.log_final(self.results, self.run_dir)
        return self.results


def format_table(results: dict) -> str:
    """The accuracy matrix (plus general ability) and the summary metrics as a plain-text table."""
    tasks = results["tasks"]
    gen_tasks = results.get("general", {}).get("tasks", [])
    header = ["stage"] + tasks + gen_tasks
    width = max(8, *(len(h) for h in header))
    lines = ["  ".join(h.rjust(width) for h in header)]
    for s, row in enumerate(results["matrix"]):
        g = results["general"]["matrix"][s] if gen_tasks else []
        label = "0 (base)" if s == 0 else f"{s} {tasks[s - 1]}"[:width]
        lines.append("  ".join([label.rjust(width)] + [f"{v:.1f}".rjust(width) for v in list(row) + list(g)]))
    m = results.get("metrics", {})
    shown = [f"{k}={v:.2f}" for k, v in m.items() if isinstance(v, (int, float))]
    lines.append("  ".join(shown))
    return "\n".join(lines)
