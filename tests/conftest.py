"""Shared fixtures: compose the project's Hydra config the way train.py does, on the tiny backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A 2-task stream on the tiny model, small enough for a method to run end-to-end in a few seconds.
TINY = [
    "backbone=tiny",
    "benchmark.num_tasks=2",
    "benchmark.train_size=12",
    "benchmark.eval_size=6",
    "benchmark.test_size=0",
    "benchmark.general_size=4",
    "engine.batch_size=4",
    "engine.max_length=160",
    "eval.batch_size=8",
    "rollout.batch_size=8",
    "analysis.probe_per_task=4",
]


def compose_cfg(overrides: list[str], run_dir: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides) + ([f"run_dir={run_dir}"] if run_dir else []))
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str):
        return compose_cfg(TINY + list(overrides), tmp_path / "run")

    return make
