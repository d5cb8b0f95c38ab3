"""Sweeps through SLURM (hydra/launcher=slurm_cpu), and a cancelled job that resumes when resubmitted.

Needs a SLURM cluster: `bash launch/slurm_local.sh up` (CI does this first). Skipped when `sbatch` is missing
or the controller does not answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from opr import checkpoint as ckpt


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (no SLURM here); start the local one with `bash launch/slurm_local.sh up`"
    if subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        return "the SLURM controller does not answer; start it with `bash launch/slurm_local.sh up`"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem()))]

# Small stream; the sweep's jobs each take ~10 s (mostly imports) on one CPU.
SMALL = [o for o in TINY if not o.startswith("benchmark.train_size")] + ["benchmark.train_size=8", "analysis.drift=false"]


def _sweep(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", *SMALL, *overrides, "hydra/launcher=slurm_cpu",
            f"hydra.sweep.dir={sweep_dir}"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _job_logs(sweep_dir: Path) -> str:
    out = []
    for f in sorted((sweep_dir / ".submitit").glob("*/*_log.*")):
        out.append(f"== {f.name}\n{f.read_text()[-1500:]}")
    return "\n".join(out)


def _job_dir(sweep_dir: Path, name: str) -> Path:
    """The folder of the sweep job ``name`` (<method>_budget<b>_seed<s>): the sweep's other overrides follow it
    (``_backbone=tiny,...``, see conf/config.yaml's hydra.sweep.subdir), so exactly one folder starts with it."""
    found = [p for p in sweep_dir.glob(name + "_*") if p.is_dir()] + [p for p in [sweep_dir / name] if p.is_dir()]
    assert len(found) == 1, (name, sorted(p.name for p in sweep_dir.iterdir()) if sweep_dir.is_dir() else [])
    return found[0]


def test_sweep_of_four_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run(_sweep(sweep, "method=seq_sft,vanilla_replay", "budget=0.1,0.2"), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:] + _job_logs(sweep)
    for method in ("seq_sft", "vanilla_replay"):
        for budget in ("0.1", "0.2"):
            run_dir = _job_dir(sweep, f"{method}_budget{budget}_seed0")  # no SLURM job id in the path: requeue-safe
            res = json.loads((run_dir / "results.json").read_text())
            assert res["status"] == "complete"
            assert res["config"]["method"]["name"] == method and res["config"]["budget"] == float(budget)
            assert len(res["matrix"]) == 3 and all(0 <= v <= 100 for row in res["matrix"] for v in row)
            assert isinstance(res["metrics"]["OP"], float)


def _mid_stage_info(sweep: Path, stage: int | None = None) -> dict | None:
    """The marker of the sweep's (one) run's latest training state when it is mid-stage (of ``stage`` when
    given), else None."""
    runs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")] if sweep.is_dir() else []
    folder = ckpt.latest_train_state(runs[0]) if runs else None
    if folder is None:
        return None
    try:
        info = json.loads((folder / ckpt.STATE_MARKER).read_text())
    except FileNotFoundError:  # replaced by a newer state meanwhile
        return None
    return info if info["kind"] == "mid_stage" and stage in (None, info["stage"]) else None


def submit_and_cancel_mid_stage(cmd: list[str], sweep: Path, *scancel: str, stage: int | None = None,
                                timeout: float = 240) -> dict:
    """Submit the one-job sweep ``cmd`` and, as soon as its run has a mid-stage training state (of ``stage``),
    ``scancel [scancel...] <job>``; wait for the submitting command to end. Returns the state's marker; fails
    the test if none appeared, or if the command succeeded anyway. No job of ours is left behind."""
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    cancelled = None
    deadline = time.monotonic() + timeout
    try:
        while first.poll() is None and time.monotonic() < deadline and cancelled is None:
            info = _mid_stage_info(sweep, stage)
            if info is not None:
                jobs = [p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)]
                assert len(jobs) == 1, jobs
                subprocess.run(["scancel", *scancel, jobs[0]], check=True)
                cancelled = info
            time.sleep(0.05)
        first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            for p in (sweep / ".submitit").iterdir():  # leave no job of ours behind
                if re.fullmatch(r"\d+(_\d+)?", p.name):
                    subprocess.run(["scancel", p.name], capture_output=True)
    assert cancelled is not None, f"no mid-stage state appeared (rc={first.returncode}): {_job_logs(sweep)}"
    assert first.returncode != 0  # the sweep saw its job end without a result
    return cancelled


def test_cancelled_job_resumes_when_resubmitted(tmp_path):
    sweep = tmp_path / "sweep"
    # ~40 optimizer steps per stage, a training state every 2: the cancel lands mid-stage.
    cmd = _sweep(sweep, "method=seq_sft", "engine.epochs=20", "checkpoint.every_steps=2")
    submit_and_cancel_mid_stage(cmd, sweep)
    run_dir = _job_dir(sweep, "seq_sft_budget0.1_seed0")
    partial = json.loads((run_dir / "results.json").read_text())
    assert partial["status"] == "interrupted"  # scancel sends SIGTERM: a state is saved and the run says so
    # Resubmit the same sweep (same sweep dir): the new job finds the state and continues.
    second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:] + _job_logs(sweep)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete" and len(res["matrix"]) == 3
    assert res["resumed"] and res["resumed"][0]["kind"] in ("mid_stage", "stage_end")
    assert res["stages"][1]["train"]["steps"] == res["stages"][2]["train"]["steps"] == 40
