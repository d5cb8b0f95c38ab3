"""Tests of the run-comparison report (``python -m opr.report``) on synthetic run directories."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from opr import report as R

TASKS = ["emotion", "arithmetic", "topic"]

# (method, budget) -> per seed (OP, BWT, FWT); the means/stds below are worked out by hand.
METRICS = {
    ("opr", 0.05): [(50, -3, 1), (52, -1, 1), (54, -2, 1)],
    ("opr", 0.1): [(60, 0, 2), (61, -1, 4), (65, -2, 6)],
    ("vanilla_replay", 0.05): [(40, -5, 0), (44, -7, 0), (42, -6, 3)],
    ("vanilla_replay", 0.1): [(45, -4, 1), (47, -2, 2)],  # seed 2 never wrote results.json
}
# seq_sft (budget-less) has no "metrics": they come from this matrix. By hand (T = 3):
# OP = (30+50+70)/3 = 50; BWT = ((30-50) + (50-60))/2 = -15; FWT = ((25-20) + (30-30))/2 = 2.5.
SEQ_MATRIX = [[10, 20, 30], [50, 25, 35], [40, 60, 30], [30, 50, 70]]


def _config(method: str, budget: float, seed: int) -> dict:
    return {
        "seed": seed,
        "method": {"name": method},
        "budget": {"ratio": budget},
        "backbone": {"name": "tiny"},
        "benchmark": {"name": "mini_trace"},
    }


def _matrix(op: float, seed: int) -> list[list[float]]:
    return [[10.0 + seed, 20.0, 30.0], [70.0, 25.0, 35.0], [60.0, 75.0, 40.0], [op - 5, op, op + 5]]


def _write_run(root: Path, method: str, budget: float, seed: int, **extra) -> Path:
    d = root / f"{method}_budget{budget}_seed{seed}"
    d.mkdir(parents=True)
    (d / "train.log").write_text("log\n")
    res = {
        "config": _config(method, budget, seed),
        "tasks": TASKS,
        "matrix": SEQ_MATRIX,
        "stages": [{"stage": t, "task": None if t == 0 else TASKS[t - 1]} for t in range(4)],
        "status": "complete",
    }
    res.update(extra)
    (d / "results.json").write_text(json.dumps(res))
    return d


def make_sweep(base: Path) -> Path:
    """Synthetic sweep under ``base/multirun``: the METRICS runs, one missing, seq_sft complete + diverged,
    one unreadable results.json."""
    root = base / "multirun" / "sweep1"
    for (method, budget), per_seed in METRICS.items():
        for seed, (op, bwt, fwt) in enumerate(per_seed):
            stages = [
                {
                    "stage": t,
                    "task": None if t == 0 else TASKS[t - 1],
                    "drift": {
                        "param/rel_fro/all": 0.01 * t * (1 + seed),
                        "spectral/inside_fraction/all": 0.5,
                    },
                }
                for t in range(1, 4)
            ]
            _write_run(
                root,
                method,
                budget,
                seed,
                matrix=_matrix(op, seed),
                stages=stages,
                metrics={"OP": op, "BWT": bwt, "FWT": fwt, "BWT_1overT": bwt * 2 / 3},
            )
    # the missing run: a run directory with Hydra's config but no results.json
    missing = root / "vanilla_replay_budget0.1_seed2"
    (missing / ".hydra").mkdir(parents=True)
    (missing / ".hydra" / "config.yaml").write_text(
        "seed: 2\nmethod:\n  name: vanilla_replay\nbudget:\n  ratio: 0.1\nbackbone:\n  name: tiny\n"
        "benchmark:\n  name: mini_trace\n"
    )
    # seq_sft ignores the budget; seed 0 complete (metrics from the matrix), seed 1 diverged after one stage
    _write_run(root, "seq_sft", 0.1, 0)
    _write_run(root, "seq_sft", 0.1, 1, matrix=SEQ_MATRIX[:2], status="diverged", error="stage 2: nan loss")
    # a results.json that is not JSON
    broken = root / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    return base / "multirun"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def built(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, R.Collected]:
    """The report of the sweep, built once for the tests that only read it."""
    out = tmp_path_factory.mktemp("rep")
    md, collected = R.build_report([sweep], out)
    return out, md, collected


def test_table_values_match_hand_computation(built: tuple[Path, str, R.Collected]) -> None:
    out, md, collected = built
    rows = [line for line in md.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows == [
        "| opr | 0.05 | tiny | mini_trace | 3 | 0,1,2 | 52.00 ± 2.00 | -2.00 ± 1.00 | 1.00 ± 0.00 |",
        "| opr | 0.1 | tiny | mini_trace | 3 | 0,1,2 | 62.00 ± 2.65 | -1.00 ± 1.00 | 4.00 ± 2.00 |",
        "| seq_sft | - | tiny | mini_trace | 1 | 0 | 50.00 ± 0.00 | -15.00 ± 0.00 | 2.50 ± 0.00 |",
        "| vanilla_replay | 0.05 | tiny | mini_trace | 3 | 0,1,2 | 42.00 ± 2.00 | -6.00 ± 1.00 | 1.00 ± 1.73 |",
        "| vanilla_replay | 0.1 | tiny | mini_trace | 2 | 0,1 | 46.00 ± 1.41 | -3.00 ± 1.41 | 1.50 ± 0.71 |",
    ]
    assert (out / "report.md").read_text(encoding="utf-8") == md
    missing = md.split("## Missing / partial runs")[1].split("## Plots")[0]
    assert "vanilla_replay_budget0.1_seed2" in missing and "missing, no results.json" in missing
    assert "vanilla_replay budget=0.1 tiny mini_trace: no complete run for seed(s) 2" in missing
    assert "seq_sft budget=- tiny mini_trace: no complete run for seed(s) 1, 2" in missing
    assert "diverged, 1 of 3 stages evaluated; stage 2: nan loss" in missing
    assert "broken" in missing and "unreadable" in missing
    assert "a complete run of this cell and seed exists" not in missing
    assert len(collected.summaries) == 5


def test_csv_parses_back(built: tuple[Path, str, R.Collected]) -> None:
    out = built[0]
    with open(out / "report.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by = {(r["method"], r["budget"]): r for r in rows}
    assert set(by) == {
        ("opr", "0.05"),
        ("opr", "0.1"),
        ("vanilla_replay", "0.05"),
        ("vanilla_replay", "0.1"),
        ("seq_sft", "-"),
    }
    r = by[("opr", "0.1")]
    assert float(r["OP_mean"]) == pytest.approx(62.0)
    assert float(r["OP_std"]) == pytest.approx(math.sqrt(7.0))  # deviations -2, -1, 3: 14 / (3 - 1)
    assert int(r["n"]) == 3 and r["seeds"] == "0;1;2"
    assert float(r["BWT_1overT_mean"]) == pytest.approx(-2 / 3)
    s = by[("seq_sft", "-")]
    assert (float(s["OP_mean"]), float(s["BWT_mean"]), float(s["FWT_mean"])) == (50.0, -15.0, 2.5)
    assert float(s["OP_std"]) == 0.0 and s["n"] == "1"
    assert float(by[("vanilla_replay", "0.1")]["FWT_std"]) == pytest.approx(math.sqrt(0.5))


def test_plots_exist_with_content(built: tuple[Path, str, R.Collected]) -> None:
    out = built[0]
    pngs = {p.name: p.stat().st_size for p in out.glob("*.png")}
    expected = {
        "heatmap_opr_b0.1_tiny_mini_trace.png",
        "tasks_opr_b0.1_tiny_mini_trace.png",
        "heatmap_seq_sft_bnone_tiny_mini_trace.png",
        "bwt_vs_budget_tiny_mini_trace.png",
        "drift_tiny_mini_trace.png",
    }
    assert expected <= set(pngs)
    assert len(pngs) == 5 * 2 + 2
    for name, size in pngs.items():
        assert size > 8000, name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean_matrix_averages_seeds(sweep: Path) -> None:
    collected = R.collect(R.load_runs([sweep]))
    s = next(x for x in collected.summaries if x.cell.method == "opr" and x.cell.budget == 0.05)
    tasks, mat, n = R._mean_matrix(s)
    assert tasks == TASKS and n == 3
    assert mat[0][0] == pytest.approx(11.0)  # 10 + seed, seeds 0..2
    assert mat[3] == pytest.approx([47.0, 52.0, 57.0])


def test_newest_run_wins_for_a_repeated_seed(tmp_path: Path) -> None:
    import os

    a = _write_run(tmp_path / "a", "opr", 0.1, 0, metrics={"OP": 10.0, "BWT": 0.0, "FWT": 0.0})
    b = _write_run(tmp_path / "b", "opr", 0.1, 0, metrics={"OP": 20.0, "BWT": 0.0, "FWT": 0.0})
    os.utime(a / "results.json", (1_000_000, 1_000_000))
    collected = R.collect(R.load_runs([tmp_path]))
    (s,) = collected.summaries
    assert s.stats["OP"] == (20.0, 0.0, 1)
    assert [p["status"] for p in collected.problems] == ["superseded"]
    assert collected.problems[0]["source"] == str(a) and str(b) in collected.problems[0]["detail"]
    # an earlier attempt of the same cell and seed that died without results is flagged as such
    attempt = tmp_path / "c" / "attempt"
    (attempt / ".hydra").mkdir(parents=True)
    (attempt / ".hydra" / "config.yaml").write_text(json.dumps(R.load_runs([b])[0]["config"]))  # JSON is YAML
    collected = R.collect(R.load_runs([tmp_path]))
    (p,) = [p for p in collected.problems if p["status"] == "missing"]
    assert p["detail"] == "no results.json; a complete run of this cell and seed exists"
    assert collected.missing_seeds == []


def test_training_state_copies_are_not_runs(tmp_path: Path) -> None:
    run = _write_run(tmp_path, "opr", 0.1, 0, metrics={"OP": 10.0, "BWT": 0.0, "FWT": 0.0})
    state = run / "train_state" / "s000003"
    state.mkdir(parents=True)
    (state / "results.json").write_text(json.dumps({**json.loads((run / "results.json").read_text()),
                                                     "status": "running"}))
    collected = R.collect(R.load_runs([tmp_path]))
    assert [s.stats["OP"] for s in collected.summaries] == [(10.0, 0.0, 1)]
    assert collected.problems == []


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "runs", "opr", 0.05, 3, metrics={"OP": 1.0, "BWT": 2.0, "FWT": 3.0})
    out = tmp_path / "cli"
    assert R.main([str(run / "results.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| opr | 0.05 | tiny | mini_trace | 1 | 3 | 1.00 ± 0.00 | 2.00 ± 0.00 | 3.00 ± 0.00 |" in printed
    assert (out / "report.csv").exists()
    assert R.main([str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert R.main([str(empty), "--out", str(out)]) == 2


def test_bad_budget_is_reported() -> None:
    with pytest.raises(ValueError, match="budget.ratio must be a number, got 'lots'"):
        R.cell_of({"method": {"name": "opr"}, "budget": {"ratio": "lots"}})
    assert R.cell_of({"method": {"name": "seq_sft"}, "budget": {"ratio": 0.2}}).budget is None
    # the on-policy baselines ignore the budget unless they add replay prompts (method.replay_budget)
    assert R.cell_of({"method": {"name": "sdft"}, "budget": 0.1}).budget is None
    assert R.cell_of({"method": {"name": "grpo", "replay_budget": False}, "budget": 0.1}).budget is None
    assert R.cell_of({"method": {"name": "grpo", "replay_budget": True}, "budget": 0.1}).budget == 0.1
