"""Sweeps and run directories never mix, lose or hide work: unique job folders, a failing job does not stop a
sweep, one run per directory (lock), a refused rerun leaves the run's files as they were, and a run that stops
early says how in results.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, compose_cfg

from opr import checkpoint as ckpt
from opr.config import ConfigError
from opr.loop import ContinualLoop
from opr.run import run_experiment
from opr.rundir import RunDirLock

SMOKE = ["backbone=tiny", "experiment=smoke", "benchmark.num_tasks=1"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_sweep_gives_every_job_its_folder_and_runs_past_failing_jobs(tmp_path):
    # engine.lr=1e30 diverges; budget=0 is refused by validation: neither stops the other jobs
    done = _train("-m", *SMOKE, "budget=0,0.1", "engine.lr=1e30,1e-4", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 1, done.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert len(summary["jobs"]) == 4 and summary["failed"] == [0, 1, 2]
    dirs = [Path(j["dir"]) for j in summary["jobs"].values()]
    assert len(set(dirs)) == 4  # engine.lr differs between jobs of one method, budget and seed: two folders
    ok = Path(summary["jobs"]["3"]["dir"])
    assert ok.name == "opr_budget0.1_seed0_backbone=tiny,benchmark.num_tasks=1,engine.lr=0.0001"
    assert json.loads((ok / "results.json").read_text())["status"] == "complete"
    diverged = json.loads((Path(summary["jobs"]["2"]["dir"]) / "results.json").read_text())
    assert diverged["status"] == "diverged"
    assert "budget must be in (0, 1]" in summary["jobs"]["0"]["error"]
    assert "sweep job 2 failed" in done.stdout + done.stderr


def test_plain_sweep_keeps_readable_folder_names(tmp_path):
    from train import job_suffix

    assert job_suffix("") == ""
    assert job_suffix("benchmark.num_tasks=2") == "_benchmark.num_tasks=2"
    assert job_suffix("backbone.path=/models/x") == "_backbone.path=%models%x"
    long = job_suffix("x=" + "a" * 300)
    assert len(long) <= 121 and long != job_suffix("x=" + "a" * 299 + "b")


def test_a_second_run_in_a_held_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+ on .*since"):
            run_experiment(compose_cfg(TINY + ["method=seq_sft"], run_dir))
    assert not (run_dir / "results.json").exists()
    assert run_experiment(compose_cfg(TINY + ["method=seq_sft"], run_dir))["status"] == "complete"  # released


def test_a_dead_holder_leaves_no_lock(tmp_path):
    code = ("import sys, os; from opr.rundir import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); os.kill(os.getpid(), 9)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == -9 and "held" in done.stdout
    RunDirLock(tmp_path).acquire().release()  # the kernel dropped the dead process's lock


def test_refused_rerun_restores_hydra_files(tmp_path):
    run_dir = tmp_path / "run"
    first = _train(*SMOKE, "checkpoint.save=true", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_text() for p in (run_dir / ".hydra").glob("*.yaml")}
    refused = _train(*SMOKE, "seed=1", "method=seq_sft", f"hydra.run.dir={run_dir}")
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "different config" in said and "restored" in said
    after = {p.name: p.read_text() for p in (run_dir / ".hydra").glob("*.yaml")}
    assert after == before
    assert yaml.safe_load(after["config.yaml"])["seed"] == 0
    assert json.loads((run_dir / "results.json").read_text())["config"]["method"]["name"] == "opr"


def test_an_error_is_recorded_as_failed(tmp_path, monkeypatch):
    real = ContinualLoop._evaluate

    def disk_full(self, stage, entry):
        if stage == 1:
            raise OSError(28, "No space left on device")
        return real(self, stage, entry)

    monkeypatch.setattr(ContinualLoop, "_evaluate", disk_full)
    with pytest.raises(OSError):
        run_experiment(compose_cfg(TINY + ["method=seq_sft"], tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "No space left on device" in results["error"]


def test_ctrl_c_saves_a_state_records_interrupted_and_resumes(tmp_path, monkeypatch):
    from opr.engine.torch_engine import TorchTrainer

    overrides = TINY + ["method=seq_sft", "engine.epochs=2"]
    reference = run_experiment(compose_cfg(overrides, tmp_path / "ref"))
    real = TorchTrainer.optimizer_step

    def interrupted_step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.stage == 2 and self.stage_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of stage 2
        return out

    monkeypatch.setattr(TorchTrainer, "optimizer_step", interrupted_step)
    with pytest.raises(SystemExit) as stopped:
        run_experiment(compose_cfg(overrides, tmp_path / "run"))
    assert stopped.value.code == 128 + signal.SIGINT
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "interrupted" and "SIGINT" in results["error"] and "resume" in results["error"]
    info = json.loads((ckpt.latest_train_state(tmp_path / "run") / ckpt.STATE_MARKER).read_text())
    assert info["kind"] == "mid_stage" and info["stage"] == 2
    monkeypatch.setattr(TorchTrainer, "optimizer_step", real)
    resumed = run_experiment(compose_cfg(overrides, tmp_path / "run"))
    assert resumed["status"] == "complete" and resumed["matrix"] == reference["matrix"]
    assert [s["train"]["last_loss"] for s in resumed["stages"][1:]] == \
        [s["train"]["last_loss"] for s in reference["stages"][1:]]


def _finished_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_experiment(compose_cfg(TINY + ["method=seq_sft"], run_dir))
    return run_dir


def test_a_corrupt_training_state_is_named_and_resume_false_keeps_the_results(tmp_path):
    run_dir = _finished_run(tmp_path)
    state = ckpt.latest_train_state(run_dir) / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    with pytest.raises(ConfigError, match=r"state\.pt is unreadable .*resume=false"):
        run_experiment(compose_cfg(TINY + ["method=seq_sft"], run_dir))
    again = run_experiment(compose_cfg(TINY + ["method=seq_sft", "resume=false"], run_dir))
    assert again["status"] == "complete"
    kept = list(run_dir.glob("results.json.bak-*"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["status"] == "complete"


def test_a_state_without_its_marker_does_not_silently_restart(tmp_path):
    run_dir = _finished_run(tmp_path)
    (ckpt.latest_train_state(run_dir) / ckpt.STATE_MARKER).unlink()
    before = (run_dir / "results.json").read_text()
    with pytest.raises(ConfigError, match=r"holds results of 2 finished stage\(s\) but its training state .* no "
                                          r"COMPLETE marker"):
        run_experiment(compose_cfg(TINY + ["method=seq_sft"], run_dir))
    assert (run_dir / "results.json").read_text() == before


def test_a_full_disk_names_itself_and_leaves_no_half_written_files(tmp_path, monkeypatch):
    import torch

    run_dir = tmp_path / "run"

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 * 2**20})())
    with pytest.raises(OSError, match=r"could not write a training state to .* 10 MiB free on that disk: no "
                                      r"space left"):
        run_experiment(compose_cfg(TINY + ["method=seq_sft"], run_dir))
    assert not list((run_dir / ckpt.STATE_DIR).glob(".tmp-*"))  # the half-written state was removed
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"


def test_predictions_are_written_aside_then_renamed(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def failing_open(path, mode="r", *args, **kwargs):
        if str(path).endswith(".jsonl.tmp"):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(OSError, match=r"could not write the predictions .*emotion\.jsonl: No space left"):
        run_experiment(compose_cfg(TINY + ["method=seq_sft"], tmp_path / "run"))
    assert not list((tmp_path / "run" / "predictions").rglob("*.jsonl*"))  # no empty or partial file


def test_a_sweep_job_refused_at_validation_says_why_in_its_results_json(tmp_path):
    from opr.tools import report

    done = _train("-m", *SMOKE, "engine.lr=-1,-2", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 1, done.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert summary["failed"] == [0, 1]
    for num, lr in (("0", "-1.0"), ("1", "-2.0")):
        record = json.loads((Path(summary["jobs"][num]["dir"]) / "results.json").read_text())
        assert record["status"] == "failed" and f"engine.lr must be > 0, got {lr}" in record["error"]
        assert record["error"] == summary["jobs"][num]["error"]
        assert record["config"]["engine"]["lr"] == float(lr) and record["config"]["backbone"]["name"] == "tiny"
    md, _ = report.build_report([tmp_path], tmp_path / "report")
    missing = md.split("## Missing / partial runs")[1]
    assert missing.count("failed, ConfigError: engine.lr must be > 0") == 2 and "no results.json" not in missing


def test_a_refusal_never_overwrites_a_runs_record_nor_writes_into_a_held_folder(tmp_path):
    from omegaconf import OmegaConf

    from opr.rundir import RunDirInUse
    from train import record_refusal

    cfg = OmegaConf.create({"seed": 0})
    held = ConfigError("run directory is in use by another run")
    held.__cause__ = RunDirInUse("held")
    assert not record_refusal(tmp_path / "held", cfg, held, "ConfigError: in use")
    assert not (tmp_path / "held").exists()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text('{"status": "complete"}')
    assert not record_refusal(tmp_path / "done", cfg, ConfigError("x"), "ConfigError: x")
    assert (tmp_path / "done" / "results.json").read_text() == '{"status": "complete"}'
    assert record_refusal(tmp_path / "new", cfg, ConfigError("x"), "ConfigError: x")
    assert json.loads((tmp_path / "new" / "results.json").read_text())["error"] == "ConfigError: x"
