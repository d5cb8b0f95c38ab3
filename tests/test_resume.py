"""Exact resume: a run killed mid-stage (SIGKILL) and restarted ends exactly like an uninterrupted run (SFT
and the on-policy methods)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, assert_same_run, compose_cfg, run_until_mid_stage_then_kill

from opr import checkpoint as ckpt
from opr.config import ConfigError
from opr.run import run_experiment

# OPR, so that stage 2's data holds rollouts (sampled) that a resume must not regenerate differently;
# 3 epochs of 12 examples in batches of 4: 9 optimizer steps per stage, a state after each.
RUN = TINY + ["method=opr", "budget=0.5", "engine.epochs=3", "checkpoint.every_steps=1", "seed=1"]


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sigkill_mid_stage_then_resume_matches_uninterrupted(tiny_cfg, tmp_path):
    reference = run_experiment(compose_cfg(RUN, tmp_path / "ref"))

    run_dir = tmp_path / "killed"
    # stage 2: its data holds rollouts; step 4 of 9: mid-epoch, with optimizer moments in use
    run_until_mid_stage_then_kill(_train_cmd(run_dir), run_dir, _env(), stage=2, min_step=4, timeout=120)
    partial = json.loads((run_dir / "results.json").read_text())
    assert partial["status"] == "running" and len(partial["matrix"]) == 2  # stage 0 and 1 done, 2 not
    latest = json.loads((ckpt.latest_train_state(run_dir) / ckpt.STATE_MARKER).read_text())
    assert latest["kind"] == "mid_stage" and latest["stage"] == 2 and latest["stage_step"] < 9

    # A half-written newer state (no marker, garbage inside) must be ignored.
    broken = run_dir / ckpt.STATE_DIR / "s999999"
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"not a checkpoint")

    # The same command again: it resumes (resume=auto) and finishes.
    done = subprocess.run(_train_cmd(run_dir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["resumed"][0]["kind"] == "mid_stage" and resumed["resumed"][0]["stage"] == 2
    assert_same_run(reference, resumed)
    # the stage-end folders are still plain transformers checkpoints; the broken state was cleaned up
    assert (run_dir / "checkpoints" / "stage2" / "config.json").exists()
    assert not broken.exists()


# The on-policy methods: 3 rollout batches x 2 updates = 6 optimizer steps per stage, a state after each; the
# position then holds the batch between its updates and the extra model (GRPO's KL reference, an EMA teacher).
ON_POLICY = {
    "grpo": ["method=grpo", "method.group_size=4", "method.kl_coef=0.05"],
    "self_distill": ["method=self_distill", "method.teacher=ema", "method.teacher_context=rollout",
                     "method.samples_per_prompt=2"],
}


@pytest.mark.parametrize("method", sorted(ON_POLICY))
def test_on_policy_sigkill_mid_stage_then_resume_matches_uninterrupted(method, tmp_path):
    run = TINY + ON_POLICY[method] + ["method.steps=3", "method.prompts_per_step=4", "method.updates_per_batch=2",
                                      "checkpoint.every_steps=1", "seed=1"]
    reference = run_experiment(compose_cfg(run, tmp_path / "ref"))

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *run, f"hydra.run.dir={run_dir}"]
    run_until_mid_stage_then_kill(cmd, run_dir, _env(), stage=2, min_step=3, timeout=120)
    latest = json.loads((ckpt.latest_train_state(run_dir) / ckpt.STATE_MARKER).read_text())
    assert latest["kind"] == "mid_stage" and latest["stage"] == 2 and latest["stage_step"] < 6

    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["resumed"][0]["kind"] == "mid_stage" and resumed["resumed"][0]["stage"] == 2
    assert_same_run(reference, resumed)  # the matrices and every per-step figure of every stage


# checkpoint.save=false (no stage checkpoints, to spare disk) once switched the training state off too, so a
# sweep job killed at its third stage started over from stage 1; the state follows checkpoint.train_state alone.
@pytest.mark.parametrize("save", [True, False], ids=["checkpoints", "no_checkpoints"])
def test_resume_from_stage_end_skips_finished_stages(save, tmp_path, monkeypatch):
    from opr.loop import ContinualLoop

    base = TINY + ["method=vanilla_replay", "budget=0.2", f"checkpoint.save={str(save).lower()}"]
    reference = run_experiment(compose_cfg(base, tmp_path / "ref"))

    real = ContinualLoop._evaluate

    def dies_in_stage2_eval(self, stage, entry):
        if stage == 2:
            raise KeyboardInterrupt("simulated crash after stage 2's training")
        return real(self, stage, entry)

    monkeypatch.setattr(ContinualLoop, "_evaluate", dies_in_stage2_eval)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(compose_cfg(base, tmp_path / "run"))
    info = json.loads((ckpt.latest_train_state(tmp_path / "run") / ckpt.STATE_MARKER).read_text())
    assert info["kind"] == "stage_end" and info["stage"] == 1  # no every_steps: stage ends only
    assert (tmp_path / "run" / "checkpoints").exists() == save
    monkeypatch.setattr(ContinualLoop, "_evaluate", real)

    evaluated = []
    monkeypatch.setattr(ContinualLoop, "_evaluate", lambda self, stage, entry: evaluated.append(stage) or real(self, stage, entry))
    resumed = run_experiment(compose_cfg(base, tmp_path / "run"))
    assert evaluated == [2]  # stages 0 and 1 were not redone
    assert [{k: v for k, v in r.items() if k != "run"} for r in resumed["resumed"]] == [
        {"kind": "stage_end", "stage": 1, "global_step": 3}]
    assert resumed["resumed"][0]["run"]["git_commit"] == resumed["run"]["git_commit"]  # the same checkout
    assert_same_run(reference, resumed)
    # a finished run resumes to "complete" at once, training nothing
    evaluated.clear()
    again = run_experiment(compose_cfg(base, tmp_path / "run"))
    assert evaluated == [] and again["matrix"] == reference["matrix"]


def test_half_written_state_is_ignored(tmp_path):
    run_dir = tmp_path / "run"
    good = ckpt.save_train_state(run_dir, {"x": torch.ones(2)}, None, {"status": "running"},
                                 {"kind": "stage_end", "stage": 0})
    half = run_dir / ckpt.STATE_DIR / "s000007"
    half.mkdir()
    (half / "state.pt").write_bytes(b"")
    assert ckpt.latest_train_state(run_dir) == good
    with pytest.raises(FileNotFoundError, match="marker"):
        ckpt.load_train_state(half)
    newer = ckpt.save_train_state(run_dir, {"x": torch.zeros(2)}, [], {"status": "running"},
                                  {"kind": "stage_end", "stage": 1})
    assert ckpt.latest_train_state(run_dir) == newer and not good.exists() and not half.exists()
    assert ckpt.load_train_state(newer)["state"]["x"].sum() == 0


def test_resume_true_without_state_and_foreign_state_are_errors(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="resume=true"):
        run_experiment(tiny_cfg("resume=true"))
    ckpt.save_train_state(tmp_path / "run", {}, None, {"config": {"method": {"name": "other"}}},
                          {"kind": "stage_end", "stage": 0})
    with pytest.raises(ConfigError, match="different config"):
        run_experiment(tiny_cfg("method=seq_sft"))
    with pytest.raises(ConfigError, match="resume must be"):
        run_experiment(tiny_cfg("resume=maybe"))


def test_a_changed_option_is_named_with_both_values(tiny_cfg, tmp_path):
    from opr.run import config_differences

    assert config_differences({"method": {"name": "grpo", "lr": 1e-5, "group_size": 4}, "seed": 0},
                              {"method": {"name": "grpo", "lr": 1e-4, "group_size": 8}, "seed": 0}) == [
        "method.group_size: 4 -> 8", "method.lr: 1e-05 -> 0.0001"]
    assert config_differences({"a": {"b": 1}}, {"a": {"c": 2}}) == ["a.b: 1 -> (absent)", "a.c: (absent) -> 2"]
    assert config_differences({"a": None}, {"a": {"b": 1}}) == ["a: None -> {'b': 1}"]
    run_experiment(tiny_cfg("method=seq_sft", "checkpoint.save=false"))
    with pytest.raises(ConfigError, match=r"different config \(saved -> now: engine\.lr: 0\.0001 -> 0\.0002\)"):
        run_experiment(tiny_cfg("method=seq_sft", "checkpoint.save=false", "engine.lr=2e-4"))


def test_a_resume_on_other_code_records_each_attempt_and_warns(tmp_path, monkeypatch, caplog):
    """A run interrupted after stage 1 and resumed on another commit (and CPU) keeps the first attempt's facts
    under ``run`` and records the resuming attempt's under ``resumed[0].run``, with a warning; before, the
    record kept only the first attempt's, so a run finished on other code or another machine did not say so."""
    import logging

    import opr.run as run_module
    from opr.loop import ContinualLoop
    from opr.provenance import reproduction_facts

    base = TINY + ["method=seq_sft", "analysis.drift=false", "analysis.diagnostics=false"]
    real = ContinualLoop._evaluate

    def stop_after_stage_1(self, stage, entry):
        out = real(self, stage, entry)
        if stage == 1:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(ContinualLoop, "_evaluate", stop_after_stage_1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(compose_cfg(base, tmp_path / "run"))
    monkeypatch.setattr(ContinualLoop, "_evaluate", real)
    first = reproduction_facts()
    other = {**first, "git_commit": "0" * 40, "cpu_features": "avx2"}
    monkeypatch.setattr(run_module, "reproduction_facts", lambda: dict(other))
    with caplog.at_level(logging.WARNING, logger="opr"):
        resumed = run_experiment(compose_cfg(base, tmp_path / "run"))
    assert resumed["status"] == "complete"
    assert resumed["run"]["git_commit"] == first["git_commit"]  # the first attempt's
    assert resumed["resumed"][0]["run"]["git_commit"] == "0" * 40 and resumed["resumed"][0]["run"]["cpu_features"] == "avx2"
    assert "resumes on other code or another machine" in caplog.text and "0000000000" in caplog.text
