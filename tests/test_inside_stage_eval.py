"""Evaluation inside a stage (eval.every_steps): a curve of scores and losses per stage, cached, checked."""

from __future__ import annotations

import pytest
from conftest import TINY, compose_cfg

from opr.config import ConfigError
from opr.run import run_experiment

RUN = TINY + ["method=seq_sft", "engine.epochs=2", "eval.every_steps=2", "eval.max_examples=3"]


def test_curve_has_a_point_every_n_steps_and_at_the_end(tmp_path):
    out = run_experiment(compose_cfg(RUN + ["eval.inside_stage_tasks=[emotion,general]"], tmp_path / "run"))
    for entry in out["stages"][1:]:
        steps = entry["train"]["steps"]
        curve = entry["curve"]
        assert [p["stage_step"] for p in curve] == list(range(2, steps + 1, 2)) + ["end"]
        assert all(set(p["scores"]) == {"emotion", "general"} for p in curve)
        assert all(isinstance(p["loss"], float) for p in curve[:-1]) and curve[-1]["loss"] is None
        assert curve[-1]["scores"]["emotion"] == entry["eval"]["emotion"]  # the stage end is the stage's row
        assert curve[-1]["step"] == curve[-2]["step"] + (steps % 2 != 0)
        assert entry["seconds"]["eval_inside"] > 0


def test_evaluating_inside_changes_no_result(tmp_path):
    plain = run_experiment(compose_cfg(TINY + ["method=seq_sft", "engine.epochs=2", "eval.max_examples=3"],
                                       tmp_path / "plain"))
    inside = run_experiment(compose_cfg(RUN, tmp_path / "inside"))
    assert inside["matrix"] == plain["matrix"] and inside["metrics"] == plain["metrics"]
    assert [s["train"]["last_loss"] for s in inside["stages"][1:]] == [s["train"]["last_loss"] for s in plain["stages"][1:]]


def test_the_curve_is_cached_with_its_stage(tmp_path):
    cache = tmp_path / "cache"
    first = run_experiment(compose_cfg(RUN + [f"stage_cache.dir={cache}"], tmp_path / "a"))
    second = run_experiment(compose_cfg(RUN + [f"stage_cache.dir={cache}"], tmp_path / "b"))
    assert second["stage_cache"]["hit_stages"] == [0, 1, 2]
    assert [s.get("curve") for s in second["stages"]] == [s.get("curve") for s in first["stages"]]


def test_unknown_inside_task_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.inside_stage_tasks names \['nope'\]"):
        run_experiment(compose_cfg(RUN + ["eval.inside_stage_tasks=[nope]"], tmp_path / "run"))
    with pytest.raises(ConfigError, match="eval.every_steps must be >= 1"):
        run_experiment(compose_cfg(RUN + ["eval.every_steps=0"], tmp_path / "run2"))
