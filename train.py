"""Entry point: compose the config with Hydra and run one continual experiment.

    python train.py                                   # the default experiment (SmolLM2-135M, mini_trace, OPR)
    python train.py method=vanilla_replay budget=0.1 seed=1
    python train.py -m method=seq_sft,opr seed=0,1,2   # a sweep (local, or SLURM with hydra/launcher=...)

A single run exits 2 on a config error or a diverged stage. In a local sweep (``-m``) a failing job does not
stop the others: its error is in its ``results.json`` (status ``failed`` / ``diverged``; a job refused before
its loop started gets one too, see ``record_refusal``) and in the sweep's ``sweep_summary.json``; the sweep
exits 1 at the end if any job failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("opr")


def job_suffix(override_dirname: str) -> str:
    """``_<overrides>`` for a sweep job's folder name ("" without any); '/' in values becomes '%', and names
    over 120 characters are cut and end in a hash of the whole (folder names must stay unique and legal)."""
    if not override_dirname:
        return ""
    text = override_dirname.replace("/", "%")
    if len(text) > 120:
        text = text[:100] + "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:12]
    return "_" + text


OmegaConf.register_new_resolver("opr_job_suffix", job_suffix, replace=True)
FAILED_JOBS: list[dict] = []  # jobs of this process's sweep that failed (the basic launcher runs them here)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from opr.backbones import BackboneError
    from opr.config import ConfigError
    from opr.distributed import this_rank
    from opr.loop import StageDiverged
    from opr.run import run_experiment

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            results = run_experiment(cfg)
        except (ConfigError, BackboneError, StageDiverged) as err:
            log.error("%s", err)
            sys.exit(2)
        return float(results["metrics"]["OP"])  # the value a Hydra sweeper optimises
    try:
        results = run_experiment(cfg)
        status, error, value = "complete", None, float(results["metrics"]["OP"])
    except Exception as err:  # noqa: BLE001 - one job's failure must not stop the sweep
        log.error("sweep job %s failed: %s", hydra_cfg.job.num, err, exc_info=not isinstance(
            err, (ConfigError, BackboneError, StageDiverged)))
        status, error, value = "failed", f"{type(err).__name__}: {err}", float("nan")
        FAILED_JOBS.append({"job": hydra_cfg.job.num, "dir": hydra_cfg.runtime.output_dir, "error": error})
        if this_rank() == 0:  # a job of several ranks (SLURM tasks) is one job; its run directory is rank 0's
            record_refusal(Path(hydra_cfg.runtime.output_dir).expanduser(), cfg, err, error)
    if this_rank() == 0:
        record_job(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, hydra_cfg.runtime.output_dir, status, error)
    return value


def record_refusal(run_dir: Path, cfg: DictConfig, err: BaseException, error: str) -> bool:
    """A sweep job stopped before its loop wrote ``results.json`` (refused at validation, a benchmark or model
    that cannot be built): write one with status ``failed`` and ``error``, so that the job's folder (and
    ``opr.tools.report``) says why. Nothing is written where a ``results.json`` exists (the loop's own record,
    or an earlier run's: the refusal leaves a run's files as they were) or when another run holds the folder.
    Returns whether it wrote."""
    from opr.results import RunResults, Status
    from opr.rundir import RunDirInUse

    path = run_dir / "results.json"
    if isinstance(err, RunDirInUse) or isinstance(err.__cause__, RunDirInUse) or path.exists():
        return False
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable value (what may have refused the job): as written
        config = OmegaConf.to_container(cfg, resolve=False)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        RunResults(config=config, status=Status.FAILED, error=error).save(path)
    except OSError as write_err:  # e.g. the disk is full: the sweep summary still has the error
        log.error("could not record the failure of %s in %s: %s", run_dir, path, write_err)
        return False
    return True


def record_job(sweep_dir: Path, num: int, run_dir: str, status: str, error: str | None) -> None:
    """Add one job's outcome to ``<sweep dir>/sweep_summary.json`` (jobs by number). Jobs of a SLURM array
    write it concurrently: the read-modify-write holds an ``fcntl`` lock."""
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "sweep_summary.json"
    with open(sweep_dir / ".sweep_summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = json.loads(path.read_text()) if path.is_file() else {"jobs": {}}
        summary["jobs"][str(num)] = {"dir": run_dir, "status": status, "error": error}
        summary["failed"] = sorted(int(k) for k, v in summary["jobs"].items() if v["status"] != "complete")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(path)


if __name__ == "__main__":
    main()
    if FAILED_JOBS:
        for job in FAILED_JOBS:
            print(f"sweep job {job['job']} failed ({job['dir']}): {job['error']}", file=sys.stderr)
        sys.exit(1)
