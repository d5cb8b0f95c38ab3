"""launch/gpu_check.sh --dry-run: the GPU check's steps and its table, on the CPU with the tiny backbone (the vLLM
step skipped, with its reason)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from opr.tools.bench.gpu_check import rows


def test_dry_run_runs_all_three_steps_and_prints_one_table(tmp_path):
    pytest.importorskip("deepspeed", reason="the check's third step runs engine=deepspeed")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": str(Path(os.sys.executable))}
    done = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "failed" not in done.stdout, done.stdout
    found = rows(out)
    steps = {(r["step"], r["what"].split(" ")[0]) for r in found}
    assert {("sft", "opr"), ("rollout", "opr"), ("rollout", "hf_sorted"), ("deepspeed", "ZeRO-3"),
            ("attention", "per_sequence_loop")} <= steps  # the CPU's path
    assert not any("missing" in r["what"] for r in found)
    ds = json.loads((out / "ds_stage" / "results.json").read_text())
    assert ds["status"] == "complete" and ds["config"]["engine"]["zero_stage"] == 3
    assert "ZeRO-3 stage 1" in done.stdout and "tokens_per_s" in done.stdout
    assert "skipped: dry run: vLLM needs a CUDA GPU" in done.stdout
    assert [r for r in found if r["step"] == "vllm"] == [{"step": "vllm", "what": "skipped",
                                                           "note": "dry run: vLLM needs a CUDA GPU"}]


def test_table_names_a_missing_step(tmp_path):
    found = rows(tmp_path)
    assert [r["what"] for r in found] == ["missing (see sft.log)", "missing (see rollout.log)",
                                         "missing (see ds_stage.log)", "missing (see attention.log)",
                                         "missing (see vllm_stage.log)"]


def test_the_attention_row_reads_the_selected_path_against_plain_sdpa(tmp_path):
    (tmp_path / "attention.json").write_text(json.dumps({
        "device": "cuda", "dtype": "bfloat16", "selected": "flash_attn_varlen",
        "results": {"per_sequence_loop": {"ms": 9.0, "max_abs_diff_vs_loop": 0.0},
                    "flash_attn_varlen": {"ms": 2.0, "max_abs_diff_vs_loop": 0.0078125},
                    "sdpa_block_mask": {"ms": 8.0, "max_abs_diff_vs_loop": 0.01}}}))
    (row,) = [r for r in rows(tmp_path) if r["step"] == "attention"]
    assert row == {"step": "attention", "what": "flash_attn_varlen (cuda, bfloat16)",
                   "note": "2.0 ms fwd+bwd, 0.25x the time of sdpa with the block mask, max |diff| vs the loop 7.8e-03"}


def test_the_vllm_row_reads_the_stage_and_counts_engine_builds(tmp_path):
    stage = {"train": {"tokens_per_second": 900.0, "steps": 4, "last_loss": 2.5}, "seconds": {"train": 8.0, "eval": 3.0}}
    results = {"status": "complete", "config": {"engine": {"zero_stage": 3}},
               "run": {"world_size": 1, "compute_dtype": "bfloat16"}, "stages": [{}, stage]}
    (tmp_path / "vllm_stage").mkdir()
    (tmp_path / "vllm_stage" / "results.json").write_text(json.dumps(results))
    (tmp_path / "vllm_stage.log").write_text("INFO vLLM engine built beside the trainer (seed=0)\nINFO done\n")
    (row,) = [r for r in rows(tmp_path) if r["step"] == "vllm"]
    assert row == {"step": "vllm", "what": "ZeRO-3 stage 1, 1 rank(s), bfloat16, rollout.backend=vllm",
                   "tokens_per_s": 900.0, "s_per_step": 2.0,
                   "note": "status complete, train 8.0 s, eval 3.0 s, last loss 2.5, vLLM engines built: 1"}


def test_smollm2_random_has_smollm2_shapes():
    from opr.backbones import load_smollm2_135m_random

    bb = load_smollm2_135m_random()
    assert sum(p.numel() for p in bb.model.parameters()) == 134_515_008  # SmolLM2-135M's parameter count
    assert bb.model.config.num_hidden_layers == 30 and bb.model.config.vocab_size == 49152


def test_the_deepspeed_row_reads_the_measured_gpu_peak_beside_the_plan(tmp_path):
    from opr.tools.bench.gpu_check import _memory_note

    (tmp_path / "plan.txt").write_text("item ...\npeak per GPU: 2.5 GB (fits in 80 GB)\n")
    assert _memory_note(tmp_path, {"peak_gpu_mb": 1024.0}) == ", GPU peak 1.07 GB (plan 2.50 GB)"
    assert _memory_note(tmp_path, {}) == ", GPU peak n/a (plan 2.50 GB)"
    (tmp_path / "plan.txt").unlink()
    assert _memory_note(tmp_path, {}) == ""
