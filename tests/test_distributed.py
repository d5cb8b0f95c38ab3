"""Where ranks come from (opr.distributed): a launcher's RANK, SLURM's tasks, or one process; the refusals
before anything loads; the split of generation batches across ranks."""

from __future__ import annotations

import re

import pytest
from conftest import TINY, compose_cfg

from opr import distributed as d
from opr.config import ConfigError, validate


def test_launcher_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    assert d.launch_env(env) == d.LaunchEnv(3, 8, 3, "n1", 1234, "launcher")


def test_slurm_step_tasks_become_ranks():
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16",
           "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    layout = d.launch_env(env)
    assert layout == d.LaunchEnv(11, 16, 3, "gpu07", d.slurm_master_port("77"), "slurm")
    assert 20000 <= layout.master_port < 60000
    assert d.launch_env({**env, "SLURM_PROCID": "0"}).master_port == layout.master_port  # every task agrees
    assert d.launch_env({**env, "MASTER_PORT": "29999"}).master_port == 29999
    out: dict = {}
    d.export(layout, out)
    assert out == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(layout.master_port)}


def test_one_process_and_one_task_steps():
    assert d.launch_env({}) == d.LaunchEnv()
    one = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert d.launch_env(one) == d.LaunchEnv()


def test_batch_script_of_a_multi_task_job_is_refused():
    # sbatch --ntasks=4 without srun: the batch step has SLURM_NTASKS=4 and SLURM_PROCID=0 but no step id
    env = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    with pytest.raises(d.LaunchError, match="SLURM_NTASKS=4 tasks but train.py runs in its batch script"):
        d.launch_env(env)


def test_bad_values_name_the_variable():
    with pytest.raises(d.LaunchError, match="SLURM_PROCID='x' is not an integer"):
        d.launch_env({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "x"})


@pytest.mark.parametrize("nodes,first", [("localhost", "localhost"), ("a1,b2", "a1"), ("node[07-09,12]", "node07"),
                                         ("gpu[3,5],cpu1", "gpu3")])
def test_first_host(nodes, first):
    assert d.first_host(nodes) == first


def test_share_batches_by_cost():
    assert d.share_batches([5, 1, 4, 2], 2) == [[0, 1], [2, 3]]  # loads 6 and 6
    assert d.share_batches([3, 3, 3], 3) == [[0], [1], [2]]
    assert d.share_batches([1], 3) == [[0], [], []]  # fewer batches than ranks: the others idle


@pytest.mark.parametrize("overrides,backend,message", [
    ([], "hf", "this launch has 2 processes (from launcher) but engine='torch' trains in one process"),
    (["engine=deepspeed"], "vllm", "rollout.backend=vllm needs a CUDA GPU per process"),
])
def test_layouts_the_config_cannot_run_are_refused(overrides, backend, message, monkeypatch, tmp_path):
    from opr.run import start_ranks

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = validate(compose_cfg(TINY + overrides, tmp_path / "run"))
    cfg.rollout.backend = backend  # (validation refuses vllm where it is not installed, as here)
    with pytest.raises(ConfigError, match=re.escape(message)):
        start_ranks(cfg)
