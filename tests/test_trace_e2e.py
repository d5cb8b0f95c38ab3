"""``experiment=trace_cpu_smoke`` end to end on the shared TRACE copy (skipped where it is absent)."""

import json

import pytest
from conftest import compose_cfg
from test_trace import TRACE_ROOT, needs_data

from opr.config import ConfigError
from opr.run import run_experiment


@needs_data
def test_trace_cpu_smoke_runs(tmp_path):
    cfg = compose_cfg(["experiment=trace_cpu_smoke", f"benchmark.root={TRACE_ROOT}"], tmp_path / "run")
    res = run_experiment(cfg)
    assert res["status"] == "complete" and res["tasks"] == ["C-STANCE", "FOMC", "ScienceQA"]
    assert len(res["matrix"]) == 4
    man = res["manifest"]["FOMC"]["train"]
    assert man["used"] == 16 and len(man["sha256"]) == 64
    line = json.loads((tmp_path / "run" / "predictions" / "stage1" / "ScienceQA.jsonl").open().readline())
    assert line["id"].startswith("ScienceQA/eval/")


def test_trace_needs_a_root(tmp_path, monkeypatch):
    monkeypatch.delenv("OPR_TRACE_ROOT", raising=False)
    cfg = compose_cfg(["experiment=trace_cpu_smoke"], tmp_path / "run")
    with pytest.raises(ConfigError, match="benchmark.*root"):
        run_experiment(cfg)


def test_missing_split_file_is_named(tmp_path):
    root = tmp_path / "trace"
    (root / "FOMC").mkdir(parents=True)
    (root / "FOMC" / "eval.json").write_text(json.dumps([{"prompt": "p Answer:", "answer": "A"}]))
    cfg = compose_cfg(["experiment=trace_cpu_smoke", f"benchmark.root={root}", "benchmark.tasks=[FOMC]"], tmp_path / "r")
    with pytest.raises(ConfigError, match="FOMC/train.json"):
        run_experiment(cfg)


@needs_data
@pytest.mark.parametrize("method,extra", [
    ("sdft", []),
    ("self_distill", ["method.steps=2", "method.prompts_per_step=2"]),
    ("grpo", ["method.steps=2", "method.prompts_per_step=2", "method.group_size=2"]),
])
def test_on_policy_baselines_run_on_trace(method, extra, tmp_path):
    """The self-distillation and RL baselines run on TRACE's data and metrics too (two stages)."""
    cfg = compose_cfg(["experiment=trace_cpu_smoke", f"benchmark.root={TRACE_ROOT}", f"method={method}",
                       "benchmark.tasks=[FOMC,ScienceQA]", "benchmark.max_train=8", "analysis.drift=false",
                       *extra], tmp_path / "run")
    res = run_experiment(cfg)
    assert res["status"] == "complete" and res["config"]["method"]["name"] == method
    assert len(res["matrix"]) == 3 and all(len(row) == 2 for row in res["matrix"])
    assert {"OP", "BWT", "FWT"} <= set(res["metrics"])
