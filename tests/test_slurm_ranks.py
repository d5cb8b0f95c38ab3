"""SLURM tasks become the ranks of one run: ``hydra/launcher=slurm_cpu hydra.launcher.tasks_per_node=N`` with
``engine=deepspeed`` gives one run of world size N (one run directory, one ``results.json``, status complete)
with the single-process torch engine's matrix and per-stage training figures, each rank evaluating and rolling
out its share of the prompts. The local cluster declares at least 4 CPUs (``launch/slurm_local.sh``), so that
3 one-CPU tasks fit on a 2-core machine.

Needs a SLURM cluster: ``bash launch/slurm_local.sh up`` (CI does this first); skipped without one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose_cfg
from test_slurm import _cluster_problem, _env, _job_logs

pytestmark = [pytest.mark.slurm, pytest.mark.deepspeed,
              pytest.mark.skipif(_cluster_problem() is not None, reason=str(_cluster_problem()))]

GLOBAL_BATCH = 6  # per-rank batch 3 on 2 ranks, 2 on 3 ranks: the same global batch as the one process
BASE = [o for o in TINY if not o.startswith(("engine.batch_size", "eval.batch_size", "rollout.batch_size"))] + [
    "analysis.drift=false", "eval.batch_size=4", "rollout.batch_size=2", "budget=0.5", "seed=1"]
METHODS = {
    "seq_sft": ["method=seq_sft"],
    "opr": ["method=opr"],
    "grpo": ["method=grpo", "method.group_size=4", "method.steps=2", "method.prompts_per_step=3",
             "method.kl_coef=0.05"],
    "self_distill": ["method=self_distill", "method.steps=2", "method.prompts_per_step=3",
                     "method.samples_per_prompt=2"],
}


def _measured(key: str) -> bool:
    """Fields that measure the machine (times, speeds, memory) or the layout, not the training."""
    layout = ("prompts_per_rank", "micro_batches_per_rank", "peak_rss_mb")
    return key.startswith("seconds") or key.endswith("per_second") or key in layout


def _numbers_match(got, ref, where: str) -> None:
    """``got`` equals ``ref`` field by field: floats to 1e-4 relative (ZeRO's reductions add in another order, and
    a stage's later steps carry the difference: GRPO's entropy after one update differs by 1e-5 relative),
    everything else exactly; the machine-dependent fields are left out."""
    if isinstance(ref, dict):
        keys = {k for k in ref if not _measured(k)}
        assert isinstance(got, dict) and {k for k in got if not _measured(k)} == keys, (where, sorted(got), sorted(ref))
        for k in keys:
            _numbers_match(got[k], ref[k], f"{where}.{k}")
    elif isinstance(ref, list):
        assert isinstance(got, list) and len(got) == len(ref), where
        for i, (g, r) in enumerate(zip(got, ref)):
            _numbers_match(g, r, f"{where}[{i}]")
    elif isinstance(ref, float) and not (isinstance(got, float) and math.isnan(got) and math.isnan(ref)):
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-6), where
    else:
        assert got == ref, where


def _slurm_run(tmp_path: Path, method: str, ranks: int) -> dict:
    sweep = tmp_path / "sweep"
    per_rank = GLOBAL_BATCH // ranks
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *BASE, *METHODS[method], "engine=deepspeed",
           "engine.zero_stage=3", f"engine.batch_size={per_rank}", "hydra/launcher=slurm_cpu",
           f"hydra.launcher.tasks_per_node={ranks}",
           f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + _job_logs(sweep)
    runs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, sorted(p.name for p in runs)  # one run directory for all the ranks
    return json.loads((runs[0] / "results.json").read_text())


@pytest.mark.parametrize("method,ranks", [("seq_sft", 2), ("opr", 2), ("grpo", 2), ("self_distill", 2),
                                          ("seq_sft", 3), ("opr", 3)])
def test_slurm_tasks_are_the_ranks_of_one_run(method, ranks, tmp_path):
    got = _slurm_run(tmp_path, method, ranks)
    ref = __import__("opr.run", fromlist=["run_experiment"]).run_experiment(compose_cfg(
        BASE + METHODS[method] + [f"engine.batch_size={GLOBAL_BATCH}"], tmp_path / "one_process"))
    assert got["status"] == ref["status"] == "complete"
    assert got["run"]["world_size"] == ranks and ref["run"]["world_size"] == 1
    assert got["run"]["global_batch"] == ref["run"]["global_batch"] == GLOBAL_BATCH
    _numbers_match(got["matrix"], ref["matrix"], "matrix")
    _numbers_match(got["general"]["matrix"], ref["general"]["matrix"], "general")
    for g, r in zip(got["stages"], ref["stages"], strict=True):
        for key in ("train", "replay", "train_examples", "eval", "general", "empty_rate", "diagnostics"):
            _numbers_match(g.get(key), r.get(key), f"stage {g['stage']} {key}")
        # every rank evaluated its share of the row's prompts (whole batches of 4, dealt by cost)
        shares = g["prompts_per_rank"]["eval"]
        assert len(shares) == ranks and sum(shares) == 16 and min(shares) >= 4, shares
        assert "prompts_per_rank" not in r
        if g["stage"] > 0:  # the policy diagnostics' probe (4 prompts per task seen, batch 4): shared too
            probe = g["prompts_per_rank"]["diagnostics"]
            assert len(probe) == ranks and sum(probe) == 4 * g["stage"], probe
        if method in ("grpo", "self_distill") and g["stage"] > 0:  # each rank trained on its part of every update
            micro = g["train"]["micro_batches_per_rank"]
            assert len(micro) == ranks and min(micro) > 0 and "micro_batches_per_rank" not in r["train"], micro
    if method == "opr":  # stage 2 rolled out the past task's replay prompts, shared across the ranks
        rollouts = got["stages"][2]["prompts_per_rank"]["rollouts"]
        assert sum(rollouts) == got["stages"][2]["replay"]["requested"] and len(rollouts) == ranks


# ------------------------------------------------------------------------------------------------ kill and resubmit
def test_sigkilled_two_task_job_resumes_to_the_uninterrupted_results(tmp_path):
    """SIGKILL to every task of a 2-rank job mid-stage (``scancel --signal=KILL``: no chance to save), then the
    same submission: the new job resumes from the last complete training state (each rank's ZeRO partition in
    ``ranks/``) and ends with the uninterrupted 2-rank run's ``results.json``."""
    from conftest import assert_same_run
    from test_slurm import submit_and_cancel_mid_stage

    from opr import checkpoint as ckpt

    run = [*BASE, "method=seq_sft", "engine.epochs=3", "checkpoint.every_steps=1", "engine=deepspeed",
           "engine.zero_stage=3", "engine.batch_size=3", "hydra/launcher=slurm_cpu",
           "hydra.launcher.tasks_per_node=2"]

    def submit(sweep: Path) -> list[str]:
        return [sys.executable, str(ROOT / "train.py"), "-m", *run, f"hydra.sweep.dir={sweep}"]

    def only_run(sweep: Path) -> Path:
        runs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert len(runs) == 1, sorted(p.name for p in runs)
        return runs[0]

    ref_sweep, sweep = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(submit(ref_sweep), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + _job_logs(ref_sweep)
    reference = json.loads((only_run(ref_sweep) / "results.json").read_text())

    submit_and_cancel_mid_stage(submit(sweep), sweep, "--signal=KILL", stage=2, timeout=400)
    folder = ckpt.latest_train_state(only_run(sweep))
    assert sorted(p.name for p in (folder / ckpt.RANKS_DIR).iterdir()) == ["rank0.pt", "rank1.pt"]

    second = subprocess.run(submit(sweep), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:] + _job_logs(sweep)
    resumed = json.loads((only_run(sweep) / "results.json").read_text())
    assert resumed["run"]["world_size"] == 2 and resumed["resumed"][0]["stage"] == 2
    assert_same_run(reference, resumed)
