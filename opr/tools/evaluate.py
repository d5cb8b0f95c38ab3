"""Evaluate saved model folders on a run's evaluation sets, the way the run evaluated its stages.

Usage::

    python -m opr.tools.evaluate MODEL_DIR [MODEL_DIR ...] --run RUN_DIR [--out scores.json] [--predictions DIR]
    python -m opr.tools.evaluate MODEL_DIR ... --set benchmark.num_tasks=1 --set eval.max_examples=50

The settings come from a run's ``results.json`` config (``--run``: the same tasks, general-ability sets,
prompt format, system line, greedy decoding, batch size and prompt limit as that run) or from the project's
config composed with ``--set`` overrides (``conf/config.yaml``, as ``train.py`` composes it). The weights come
from each MODEL_DIR (a plain transformers folder: a run's ``checkpoints/stage{t}``, the output of
``python -m opr.tools.analyze edit``, ...); the backbone's prompt formatting (``system_prompt``) and dtype come
from the settings. Evaluating a run's own stage checkpoint with ``--run`` reproduces that stage's row.

Prints one row per model (each task's score, each general set's, and the mean over the tasks) and, with
``--out``, writes ``{"settings": ..., "models": [{"path", "scores": {task: score}, "format_error_rate",
"empty_rate"}]}``. ``--predictions DIR`` keeps the answers (``DIR/<model folder name>/<task>.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["evaluate_folders", "main", "settings_from_overrides", "settings_from_run"]


def settings_from_run(run_dir: Path) -> DictConfig:
    """The resolved config a run recorded in its ``results.json``."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"--run {run_dir}: no results.json there")
    config = json.loads(path.read_text(encoding="utf-8")).get("config")
    if not isinstance(config, dict) or "benchmark" not in config:
        raise ValueError(f"--run {run_dir}: results.json holds no run config")
    return OmegaConf.create(config)


def settings_from_overrides(overrides: list[str]) -> DictConfig:
    """``conf/config.yaml`` composed with Hydra overrides and validated as ``train.py`` would."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from opr.config import ConfigError, validate

    conf = Path(__file__).resolve().parents[2] / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides) + ["run_dir=."])
    except HydraException as err:  # a bad override: Hydra's own message (train.py's), without the traceback
        cause = f" ({str(err.__cause__).splitlines()[0]})" if err.__cause__ is not None and str(err.__cause__) else ""
        raise ConfigError(f"--set {' '.join(overrides)}: {' '.join(str(err).split())}{cause}") from err
    return validate(cfg)


def evaluate_folders(folders: list[Path], cfg: DictConfig, benchmark, predictions: Path | None = None) -> list[dict]:
    """Score every model folder on ``benchmark`` (built from ``cfg.benchmark``) with the settings' evaluation:
    ``[{"path", "scores", "format_error_rate", "empty_rate"}]`` in the order given."""
    from opr.backbones import load_pretrained
    from opr.engine.torch_engine import resolve_device
    from opr.evaluation import EvalSettings, evaluate_all

    device = resolve_device(cfg.engine.get("device", "cpu") or "cpu")
    tasks = list(benchmark.tasks) + list(benchmark.general)
    settings = EvalSettings.from_config(cfg.eval, cfg.engine.get("compute_dtype", "float32"))
    out = []
    for folder in folders:
        backbone = load_pretrained(name=f"folder:{folder.name}", path=str(folder),
                                   dtype=cfg.backbone.get("dtype", "float32"),
                                   system_prompt=cfg.backbone.get("system_prompt", None))
        backbone.model.to(device)
        target = predictions / folder.name if predictions is not None else None
        scores = evaluate_all(backbone, tasks, settings, target, seed=int(cfg.seed))
        out.append({"path": str(folder),
                    "scores": {s.task: s.score for s in scores},
                    "format_error_rate": {s.task: s.format_error_rate for s in scores},
                    "empty_rate": {s.task: s.empty_rate for s in scores}})
        del backbone
    return out


def table(results: list[dict], task_names: list[str], general_names: list[str]) -> str:
    header = ["model"] + task_names + general_names + ["task mean"]
    rows = [header]
    for r in results:
        s = r["scores"]
        mean = sum(s[t] for t in task_names) / len(task_names) if task_names else float("nan")
        rows.append([r["path"]] + [f"{s[t]:.1f}" for t in task_names + general_names] + [f"{mean:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opr.tools.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("models", type=Path, nargs="+", help="model folders (config.json + weights + tokenizer)")
    ap.add_argument("--run", type=Path, default=None, help="take the evaluation settings from this run's results.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a Hydra override of conf/config.yaml (repeatable); not with --run")
    ap.add_argument("--out", type=Path, default=None, help="write the scores here as JSON")
    ap.add_argument("--predictions", type=Path, default=None, help="keep every answer under this folder")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.run is not None and args.overrides:
        ap.error(f"--set {args.overrides} with --run: the run's settings are used as recorded; give one or the other")
    missing = [str(m) for m in args.models if not (m / "config.json").is_file()]
    if missing:
        ap.error(f"not a model folder (no config.json): {', '.join(missing)}")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from opr.backbones import BackboneError
    from opr.config import ConfigError, build

    try:
        cfg = settings_from_run(args.run) if args.run is not None else settings_from_overrides(args.overrides)
        benchmark = build(cfg.benchmark)
        results = evaluate_folders(list(args.models), cfg, benchmark, args.predictions)
    except (FileNotFoundError, ValueError, ConfigError, BackboneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(results, [t.name for t in benchmark.tasks], [g.name for g in benchmark.general]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("benchmark", "eval", "backbone")}
        args.out.write_text(json.dumps({"settings": settings, "models": results}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
