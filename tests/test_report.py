"""Tests of the run-comparison report (``python -m opr.tools.report``) on synthetic run directories."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from opr.tools import report as R

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
    table = md.split("## Paired differences")[0]  # the paired tables follow the cell table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows == [
        "| opr | 0.05 | tiny | mini_trace | 3 | 0,1,2 | 52.00 ± 2.00 | -2.00 ± 1.00 | 1.00 ± 0.00 |",
        "| opr | 0.1 | tiny | mini_trace | 3 | 0,1,2 | 62.00 ± 2.65 | -1.00 ± 1.00 | 4.00 ± 2.00 |",
        "| seq_sft | - | tiny | mini_trace | 1 | 0 | 50.00 ± n/a | -15.00 ± n/a | 2.50 ± n/a |",
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
    assert s["OP_std"] == "" and s["OP_n"] == "1" and s["n"] == "1"  # one seed: the spread is undefined
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
        "paired_vanilla_replay.png",
        "paired_seq_sft.png",
    }
    assert expected <= set(pngs)
    assert len(pngs) == 5 * 2 + 2 + 2  # heatmap + tasks per cell; BWT vs budget, drift; paired per reference
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
    assert "| opr | 0.05 | tiny | mini_trace | 1 | 3 | 1.00 ± n/a | 2.00 ± n/a | 3.00 ± n/a |" in printed
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


# ------------------------------------------------------------------------------------------ t quantile
@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (29, 2.045), (1000, 1.962)])
def test_t_quantile_matches_the_t_table(df: int, table: float) -> None:
    assert R.t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)
    assert R.t_quantile(0.025, df) == pytest.approx(-table, abs=1e-3)


def test_t_cdf_closed_forms() -> None:
    assert R.student_t_cdf(0.0, 7) == 0.5
    assert R.student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert R.student_t_cdf(1.0, 2) == pytest.approx(0.5 + 1 / (2 * math.sqrt(3)))  # 1/2 + t / (2 sqrt(2 + t^2))
    assert R.student_t_cdf(math.sqrt(3), 3) == pytest.approx(0.75 + 1 / (2 * math.pi))  # theta = pi/4
    assert R.student_t_cdf(-1.0, 2) == pytest.approx(0.5 - 1 / (2 * math.sqrt(3)))
    with pytest.raises(ValueError):
        R.student_t_cdf(1.0, 0)


# ------------------------------------------------------------------------------------------ paired differences
def _config_with(method: str, budget: float, seed: int, settings: dict[str, object]) -> dict:
    """``_config`` with dotted keys set, e.g. ``{"engine.lr": 1e-3}``."""
    cfg = _config(method, budget, seed)
    for dotted, value in settings.items():
        *groups, last = dotted.split(".")
        node = cfg
        for g in groups:
            node = node.setdefault(g, {})
        node[last] = value
    return cfg


def _write_metrics_run(root: Path, method: str, budget: float, seed: int, op: float, bwt: float,
                       settings: dict[str, object] | None = None) -> Path:
    return _write_run(root, method, budget, seed, config=_config_with(method, budget, seed, settings or {}),
                      metrics={"OP": op, "BWT": bwt, "FWT": 0.0})


# (method, budget) -> {seed: (OP, BWT)}. Pairs by hand, t_{0.975,2} = 4.302653, t_{0.975,1} = 12.706205:
# opr 0.1 vs vanilla_replay 0.1, seeds 0-2 (opr's seed 5 and vanilla's seed 3 have no partner):
#   BWT diffs 3, 2, 4: mean 3, sd 1, half-width 4.302653 / sqrt(3) = 2.484138
#   OP diffs 1, 3, 5: mean 3, sd 2, half-width 4.302653 * 2 / sqrt(3) = 4.968275
# opr 0.1 vs seq_sft (budget-free: its budget 0.3 does not matter), seeds 0-1:
#   BWT diffs 8, 9: mean 8.5, sd sqrt(0.5), half-width 12.706205 * sqrt(0.5) / sqrt(2) = 6.353102
#   OP diffs 10, 13: mean 11.5, sd sqrt(4.5), half-width 12.706205 * 1.5 = 19.059307
# vanilla_replay 0.1 vs seq_sft: BWT 5, 7 -> 6 ± 12.706205; OP 9, 10 -> 9.5 ± 6.353102
# vanilla_replay 0.2 vs seq_sft: one pair (seed 0), BWT 9, OP 5, no interval; opr 0.2 (seed 7) pairs with nothing.
PAIRED_RUNS = {
    ("opr", 0.1): {0: (50, -2), 1: (53, -4), 2: (56, -3), 5: (0, 100)},
    ("vanilla_replay", 0.1): {0: (49, -5), 1: (50, -6), 2: (51, -7), 3: (90, -20)},
    ("seq_sft", 0.3): {0: (40, -10), 1: (40, -13)},
    ("vanilla_replay", 0.2): {0: (45, -1)},
    ("opr", 0.2): {7: (0, 0)},
}


@pytest.fixture(scope="module")
def paired_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("paired")
    for (method, budget), per_seed in PAIRED_RUNS.items():
        for seed, (op, bwt) in per_seed.items():
            _write_metrics_run(root / "runs", method, budget, seed, op, bwt)
    out = root / "rep"
    assert R.main([str(root / "runs"), "--out", str(out)]) == 0
    return out, (out / "report.md").read_text(encoding="utf-8")


def test_paired_differences_match_hand_computation(paired_report: tuple[Path, str]) -> None:
    out, md = paired_report
    section = md.split("## Paired differences")[1].split("## Drift, artifacts and in-stage learning")[0]
    assert "95% confidence interval by paired t" in section and "no bootstrap" in section
    vs_replay, vs_seq = section.split("### vs vanilla_replay")[1].split("### vs seq_sft")
    assert [line for line in vs_replay.splitlines() if line.startswith("|")] == [
        "| cell | n pairs | mean diff BWT [lo, hi] | mean diff OP [lo, hi] |",
        "|---|---|---|---|",
        "| opr budget=0.1 tiny mini_trace | 3 | 3.00 [0.52, 5.48] | 3.00 [-1.97, 7.97] |",
        "| opr budget=0.2 tiny mini_trace | 0 | n/a | n/a |",
    ]
    assert [line for line in vs_seq.splitlines() if line.startswith("| ") and "cell" not in line] == [
        "| opr budget=0.1 tiny mini_trace | 2 | 8.50 [2.15, 14.85] | 11.50 [-7.56, 30.56] |",
        "| opr budget=0.2 tiny mini_trace | 0 | n/a | n/a |",
        "| vanilla_replay budget=0.1 tiny mini_trace | 2 | 6.00 [-6.71, 18.71] | 9.50 [3.15, 15.85] |",
        "| vanilla_replay budget=0.2 tiny mini_trace | 1 | 9.00 [n/a] | 5.00 [n/a] |",
    ]
    with open(out / "paired.csv", newline="", encoding="utf-8") as fh:
        rows = {(r["reference"], r["method"], r["budget"]): r for r in csv.DictReader(fh)}
    assert len(rows) == 6
    r = rows[("vanilla_replay", "opr", "0.1")]
    assert r["seeds"] == "0;1;2" and r["n_pairs"] == "3"
    assert r["reference_cell"] == "vanilla_replay budget=0.1 tiny mini_trace"
    assert float(r["BWT_diff_mean"]) == pytest.approx(3.0)
    assert float(r["BWT_diff_low"]) == pytest.approx(3 - 2.484138, abs=1e-5)
    assert float(r["BWT_diff_high"]) == pytest.approx(3 + 2.484138, abs=1e-5)
    assert float(r["OP_diff_high"]) == pytest.approx(3 + 4.968275, abs=1e-5)
    assert float(r["FWT_diff_mean"]) == 0.0 and r["FWT_n"] == "3"
    s = rows[("seq_sft", "opr", "0.1")]
    assert s["seeds"] == "0;1" and float(s["BWT_diff_low"]) == pytest.approx(8.5 - 6.353102, abs=1e-5)
    one = rows[("seq_sft", "vanilla_replay", "0.2")]
    assert float(one["BWT_diff_mean"]) == 9.0 and one["BWT_diff_low"] == "" and one["BWT_n"] == "1"
    assert {p.name for p in out.glob("paired_*.png")} == {"paired_vanilla_replay.png", "paired_seq_sft.png"}


def test_paired_difference_function() -> None:
    d = R.paired_difference([5.0, 6.0, 9.0], [1.0, 2.0, 3.0])  # diffs 4, 4, 6: mean 14/3, sd sqrt(4/3)
    half = 4.302653 * math.sqrt(4 / 3) / math.sqrt(3)
    assert (d.n, d.mean) == (3, pytest.approx(14 / 3))
    assert (d.low, d.high) == (pytest.approx(14 / 3 - half, abs=1e-5), pytest.approx(14 / 3 + half, abs=1e-5))
    assert R.paired_difference([1.0], [0.5]).text() == "0.50 [n/a]"
    assert R.paired_difference([], []).text() == "n/a"


def test_reference_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for method, bwt in (("opr", -1.0), ("vanilla_replay", -3.0)):
        _write_metrics_run(tmp_path / "runs", method, 0.1, 0, 50.0, bwt)
    out = tmp_path / "rep"
    assert R.main([str(tmp_path / "runs"), "--out", str(out), "--reference", "opr"]) == 0
    printed = capsys.readouterr().out
    assert "### vs opr" in printed and "### vs seq_sft" not in printed and "### vs vanilla_replay" not in printed
    assert "| vanilla_replay budget=0.1 tiny mini_trace | 1 | -2.00 [n/a] | 0.00 [n/a] |" in printed
    with open(out / "paired.csv", newline="", encoding="utf-8") as fh:
        assert [r["reference"] for r in csv.DictReader(fh)] == ["opr"]


# ------------------------------------------------------------------------------------------ cell keys
def test_cells_split_by_engine_lr_not_by_logging(tmp_path: Path) -> None:
    import os

    base = {"engine.name": "torch", "engine.batch_size": 8}
    a = _write_metrics_run(tmp_path / "a", "opr", 0.1, 0, 10.0, -1.0,
                           {**base, "engine.lr": 1e-4, "engine.epochs": 1.0, "logger.project": "p1", "run_dir": "/x/a"})
    _write_metrics_run(tmp_path / "b", "opr", 0.1, 0, 20.0, -2.0,
                       {**base, "engine.lr": 1e-3, "engine.epochs": 1.0, "logger.project": "p2", "run_dir": "/x/b"})
    # the same experiment as a: other run dir, logger, checkpointing and name, epochs written as an int; newer
    c = _write_metrics_run(tmp_path / "c", "opr", 0.1, 0, 30.0, -3.0,
                           {**base, "engine.lr": 0.0001, "engine.epochs": 1, "logger.mode": "online",
                            "checkpoint.save": False, "experiment_name": "again", "run_dir": "/x/c"})
    os.utime(a / "results.json", (1_000_000, 1_000_000))
    md, collected = R.build_report([tmp_path], tmp_path / "rep")
    assert [(s.cell.setting("engine.lr"), s.stats["OP"]) for s in collected.summaries] == [
        ("0.0001", (30.0, 0.0, 1)),
        ("0.001", (20.0, 0.0, 1)),
    ]
    (p,) = collected.problems
    assert p["status"] == "superseded" and p["source"] == str(a) and str(c) in p["detail"]
    assert p["cell"] == "opr budget=0.1 tiny mini_trace engine.lr=0.0001"
    table = md.split("## Paired differences")[0]
    assert "| method | budget | backbone | benchmark | engine.lr | n | seeds | OP | BWT | FWT |" in table
    assert "| opr | 0.1 | tiny | mini_trace | 0.001 | 1 | 0 | 20.00 ± n/a | -2.00 ± n/a | 0.00 ± n/a |" in table
    assert "logger" not in table and "batch_size" not in table
    pngs = {p.name for p in (tmp_path / "rep").glob("heatmap_*.png")}
    assert pngs == {"heatmap_opr_b0.1_tiny_mini_trace_engine.lr_0.0001.png",
                    "heatmap_opr_b0.1_tiny_mini_trace_engine.lr_0.001.png"}
    with open(tmp_path / "rep" / "report.csv", newline="", encoding="utf-8") as fh:
        assert [r["engine.lr"] for r in csv.DictReader(fh)] == ["0.0001", "0.001"]


def test_method_options_split_cells_and_pair_with_one_reference(tmp_path: Path) -> None:
    opr = {"method._target_": "opr.methods.opr.OnPolicyReplay", "method.top_p": 0.95}
    for seed, (bwt_pool, bwt_prompts, bwt_replay) in enumerate([(-1.0, -2.0, -4.0), (-2.0, -3.0, -6.0)]):
        _write_metrics_run(tmp_path / "pool", "opr", 0.1, seed, 50.0, bwt_pool,
                           {**opr, "method.selection": "ranked_pool"})
        _write_metrics_run(tmp_path / "prompts", "opr", 0.1, seed, 50.0, bwt_prompts,
                           {**opr, "method.selection": "budgeted_prompts"})
        _write_metrics_run(tmp_path / "vanilla", "vanilla_replay", 0.1, seed, 50.0, bwt_replay,
                           {"method._target_": "opr.methods.vanilla_replay.VanillaReplay"})
    # seq_sft ignores the budget: two budgets of one seed are one cell, the older run superseded
    _write_metrics_run(tmp_path / "seq1", "seq_sft", 0.1, 0, 40.0, -10.0)
    _write_metrics_run(tmp_path / "seq2", "seq_sft", 0.2, 0, 40.0, -10.0)
    collected = R.collect(R.load_runs([tmp_path]))
    assert R.varying_keys(s.cell for s in collected.summaries) == ("method.selection",)
    assert [s.label for s in collected.summaries] == [
        "opr budget=0.1 tiny mini_trace method.selection=budgeted_prompts",
        "opr budget=0.1 tiny mini_trace method.selection=ranked_pool",
        "seq_sft budget=- tiny mini_trace",  # method.selection varies among opr cells only: not in these labels
        "vanilla_replay budget=0.1 tiny mini_trace",
    ]
    assert [p["status"] for p in collected.problems] == ["superseded"]
    pairs = R.paired_comparisons(collected.summaries, "vanilla_replay")
    # BWT diffs: budgeted_prompts 2, 3 (mean 2.5); ranked_pool 3, 4 (mean 3.5); sd sqrt(0.5), half-width 6.353102
    assert [(c.summary.cell.setting("method.selection"), c.seeds, c.diffs["BWT"].mean) for c in pairs] == [
        ("budgeted_prompts", [0, 1], 2.5),
        ("ranked_pool", [0, 1], 3.5),
    ]
    assert pairs[1].diffs["BWT"].low == pytest.approx(3.5 - 6.353102, abs=1e-5)
    assert all(c.reference_summary.cell.method == "vanilla_replay" for c in pairs)


# ------------------------------------------------------------------------------------------ evaluation SE
def _write_predictions(run: Path, stage: int, scores: dict[str, list[float]]) -> None:
    folder = run / "predictions" / f"stage{stage}"
    folder.mkdir(parents=True, exist_ok=True)
    for task, values in scores.items():
        lines = [json.dumps({"id": f"{task}-{i}", "prediction": "x", "score": v}) for i, v in enumerate(values)]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")


# By hand, final stage T = 3: emotion 0,100,100,100: mean 75, sample var (75² + 3·25²)/3 = 2500, SE 50/2 = 25;
# arithmetic 0,100: var 5000, SE sqrt(5000/2) = 50; topic 50,50,50: SE 0. OP's SE = sqrt(25² + 50² + 0)/3.
FINAL_SCORES = {"emotion": [0, 100, 100, 100], "arithmetic": [0, 100], "topic": [50, 50, 50]}
OP_EVAL_SE = math.sqrt(3125) / 3  # 18.6339


def test_eval_standard_error_from_predictions(tmp_path: Path) -> None:
    assert R.op_eval_standard_error(list(FINAL_SCORES.values())) == pytest.approx(OP_EVAL_SE)
    assert R.op_eval_standard_error([[0, 100], [50]]) is None  # one example: no sample std
    run = _write_metrics_run(tmp_path / "a", "opr", 0.1, 0, 50.0, -1.0)
    _write_predictions(run, 3, {**FINAL_SCORES, "general_chat": [0, 100, 0]})  # general sets are no OP task
    _write_predictions(run, 0, {task: [0, 0, 100] for task in TASKS})  # an earlier stage: not used
    assert R.run_eval_standard_error(json.loads((run / "results.json").read_text()) | {"_source": str(run)}) == (
        pytest.approx(OP_EVAL_SE)
    )
    _write_metrics_run(tmp_path / "b", "opr", 0.1, 1, 52.0, -1.0)  # no predictions: adds nothing
    broken = _write_metrics_run(tmp_path / "c", "opr", 0.1, 2, 54.0, -1.0)
    _write_predictions(broken, 3, FINAL_SCORES)
    (broken / "predictions" / "stage3" / "topic.jsonl").write_text('{"score": 50}\n{not json\n')
    md, collected = R.build_report([tmp_path], tmp_path / "rep")
    (s,) = collected.summaries
    assert s.stats[R.EVAL_SE] == (pytest.approx(OP_EVAL_SE), 0.0, 1)
    assert "| OP | BWT | FWT | eval SE (OP) |" in md
    assert "| 52.00 ± 2.00 | -1.00 ± 0.00 | 0.00 ± 0.00 | 18.63 (1 of 3 runs) |" in md
    with open(tmp_path / "rep" / "report.csv", newline="", encoding="utf-8") as fh:
        (row,) = csv.DictReader(fh)
    assert float(row["eval_SE_OP_mean"]) == pytest.approx(OP_EVAL_SE) and row["eval_SE_OP_n"] == "1"


def test_eval_se_column_absent_without_predictions(built: tuple[Path, str, R.Collected]) -> None:
    out, md, collected = built
    assert "eval SE" not in md
    with open(out / "report.csv", newline="", encoding="utf-8") as fh:
        assert all(r["eval_SE_OP_mean"] == "" for r in csv.DictReader(fh))


def test_run_known_by_its_hydra_config_joins_the_resolved_cell(tmp_path: Path) -> None:
    # results.json holds the validated config (defaults filled in); .hydra/config.yaml only what the config
    # files set, with interpolations unresolved and numbers as YAML wrote them
    _write_metrics_run(tmp_path / "done", "opr", 0.1, 0, 10.0, -1.0,
                       {"engine.lr": 1e-4, "engine.warmup_ratio": 0.0, "run_dir": "/x/done"})
    for name, seed, lr in (("again", 0, "1e-4"), ("other", 1, "0.001")):
        attempt = tmp_path / name
        (attempt / ".hydra").mkdir(parents=True)
        (attempt / ".hydra" / "config.yaml").write_text(
            f"seed: {seed}\nbudget: 0.1\nrun_dir: ${{hydra:runtime.output_dir}}\nmethod:\n  name: opr\n"
            f"backbone:\n  name: tiny\nbenchmark:\n  name: mini_trace\nengine:\n  lr: {lr}\n"
        )
    collected = R.collect(R.load_runs([tmp_path]))
    assert len(collected.summaries) == 1
    problems = {Path(p["source"]).name: p for p in collected.problems}
    assert problems["again"]["detail"] == "no results.json; a complete run of this cell and seed exists"
    assert problems["again"]["cell"] == "opr budget=0.1 tiny mini_trace engine.lr=0.0001 engine.warmup_ratio=0"
    assert problems["other"]["cell"] == "opr budget=0.1 tiny mini_trace engine.lr=0.001 engine.warmup_ratio=-"
    assert [(collected.label(c), seeds) for c, seeds in collected.missing_seeds] == [
        ("opr budget=0.1 tiny mini_trace engine.lr=0.0001 engine.warmup_ratio=0", [1]),
        ("opr budget=0.1 tiny mini_trace engine.lr=0.001 engine.warmup_ratio=-", [0, 1]),
    ]


def test_replay_section_averages_what_was_replayed(tmp_path: Path) -> None:
    """Hand-computed: two OPR seeds kept 8 and 6 of 10 requested at stage 2, 50% and 100% of them not the gold
    string, 4 and 12 of 40 rollouts cut off -> kept 7.0, differs 75%, cut off 20%."""
    root = tmp_path / "runs"
    for seed, (kept, differs, cut) in enumerate([(8, 0.5, 4), (6, 1.0, 12)]):
        stages = [{"stage": 0}, {"stage": 1, "replay": {"requested": 0}},
                  {"stage": 2, "replay": {"requested": 10, "rollouts": 40, "kept": kept,
                                          "differs_from_gold": differs, "unfinished": cut}}]
        _write_run(root, "opr", 0.1, seed, stages=stages)
    _write_run(root, "seq_sft", 0.1, 0)
    md, collected = R.build_report([root], tmp_path / "rep")
    rows = R.replay_rows(collected.summaries)
    assert len(rows) == 1 and rows[0]["stage"] == 2 and rows[0]["runs"] == 2
    assert rows[0]["kept"] == 7.0 and rows[0]["differs_from_gold"] == 0.75
    assert rows[0]["unfinished_fraction"] == pytest.approx(0.2)
    assert "| 2 | 2 | 10.0 | 40.0 | 7.0 | 75% | 20% |" in md


def test_failed_and_interrupted_runs_are_listed_with_their_error(tmp_path):
    from opr.tools.report import collect

    base = {"tasks": ["a", "b"], "matrix": [[0, 0], [50, 0]], "general": {"tasks": [], "matrix": [[], []]},
            "config": {"method": {"name": "opr"}, "backbone": {"name": "tiny"}, "benchmark": {"name": "m"},
                       "budget": 0.1, "seed": 0}}
    runs = [{**base, "_source": "x", "status": "failed", "error": "OSError: No space left on device"},
            {**base, "_source": "y", "status": "interrupted", "error": "stopped by SIGINT"}]
    problems = collect(runs).problems
    assert [(p["status"], p["detail"]) for p in problems] == [
        ("failed", "1 of 2 stages evaluated; OSError: No space left on device"),
        ("interrupted", "1 of 2 stages evaluated; stopped by SIGINT")]


def test_an_option_added_later_at_its_default_joins_the_earlier_runs_cell(tmp_path: Path) -> None:
    """Runs recorded before ``engine.device`` existed pair with later runs that have it at its default
    ("auto"); a run at another value stays apart."""
    engine = {"engine._target_": "opr.engine.torch_engine.TorchTrainer", "engine.name": "torch"}
    for seed, op in ((0, 10.0), (1, 12.0)):  # before the option: no engine.device
        _write_metrics_run(tmp_path / "old", "opr", 0.1, seed, op, -1.0, engine)
        _write_metrics_run(tmp_path / "new", "vanilla_replay", 0.1, seed, op - 2, -3.0,
                           {**engine, "engine.device": "auto"})
    _write_metrics_run(tmp_path / "cpu", "vanilla_replay", 0.1, 2, 5.0, -9.0, {**engine, "engine.device": "cpu"})
    _, collected = R.build_report([tmp_path], tmp_path / "rep")
    cells = {(s.cell.method, s.cell.setting("engine.device")): s.stats["OP"][2] for s in collected.summaries}
    assert cells == {("opr", "auto"): 2, ("vanilla_replay", "auto"): 2, ("vanilla_replay", "cpu"): 1}
    (comparison,) = [c for c in R.paired_comparisons(collected.summaries, "vanilla_replay")
                     if c.summary.cell.method == "opr"]
    assert comparison.reference_summary.cell.setting("engine.device") == "auto"  # paired across code versions
    assert comparison.seeds == [0, 1] and comparison.diffs["OP"].mean == pytest.approx(2.0)
    assert R.with_code_defaults({"engine": {"_target_": "no.such.Target", "lr": 1}})["engine"] == {
        "_target_": "no.such.Target", "lr": 1}


def test_inside_stage_curves_of_the_own_task(tmp_path: Path) -> None:
    """Hand-computed: two grpo seeds scored their stage-1 task (TASKS[0]) 10 -> 30 -> 50 and 20 -> 40 -> 70 at
    stage steps 0, 10 and the end (global step 25, the stage started at global step 5, so x = 20): means 15,
    35, 60; a second task in the curve and a stage without a curve are ignored."""
    root = tmp_path / "runs"
    own, other = TASKS[0], TASKS[1]
    for seed, (a, b, c) in enumerate([(10, 30, 50), (20, 40, 70)]):
        curve = [{"step": 5, "stage_step": 0, "loss": 1.0, "scores": {own: a, other: 99}},
                 {"step": 15, "stage_step": 10, "loss": 0.5, "scores": {own: b, other: 98}},
                 {"step": 25, "stage_step": "end", "loss": None, "scores": {own: c, other: 97}}]
        stages = [{"stage": 0}, {"stage": 1, "task": own, "curve": curve}, {"stage": 2, "task": other}]
        _write_run(root, "grpo", 0.1, seed, stages=stages)
    _write_run(root, "seq_sft", 0.1, 0)
    out = tmp_path / "rep"
    md, collected = R.build_report([root], out)
    rows = R.inside_stage_rows(collected.summaries)
    assert len(rows) == 1
    assert (rows[0]["stage"], rows[0]["task"], rows[0]["n"]) == (1, own, 2)
    assert rows[0]["steps"] == [0, 10, 20] and rows[0]["mean"] == [15.0, 35.0, 60.0]
    assert rows[0]["min"] == [10.0, 30.0, 50.0] and rows[0]["max"] == [20.0, 40.0, 70.0]
    assert rows[0]["end"] is None  # both stages end at step 20, the last common step
    assert f"| 1 | {own} | 2 | 0: 15.0, 10: 35.0, 20: 60.0 |" in md
    # without a point at step 0 the curve starts from the matrix's previous row (SEQ_MATRIX[0][0] = 10)
    record = R.RunResults.from_json({"tasks": TASKS, "matrix": SEQ_MATRIX, "stages": [
        {"stage": 0}, {"stage": 1, "task": own, "curve": [
            {"step": 10, "stage_step": 10, "loss": 1.0, "scores": {own: 30}},
            {"step": 20, "stage_step": "end", "loss": None, "scores": {own: 50}}]}]})
    assert R.own_task_curve(record, 1) == [(0, 10.0), (10, 30.0), (20, 50.0)]
    plots = list(out.glob("inside_stage_*.png"))
    assert len(plots) == 1 and plots[0].stat().st_size > 5000


def test_inside_stage_end_points_when_runs_end_at_different_steps(tmp_path: Path) -> None:
    """Hand-computed: seed 0's stage ends at step 20 (score 90), seed 1's at step 24 (score 70); the common
    steps are 0 and 10 (means 15, 35), and the end is reported apart: mean 80 over steps 20-24 (before, the
    table stopped at step 10 and both stage-end scores were lost)."""
    root = tmp_path / "runs"
    own = TASKS[0]
    for seed, (end_step, end_score) in enumerate([(25, 90), (29, 70)]):
        curve = [{"step": 5, "stage_step": 0, "loss": 1.0, "scores": {own: 10 + 10 * seed}},
                 {"step": 15, "stage_step": 10, "loss": 0.5, "scores": {own: 30 + 10 * seed}},
                 {"step": end_step, "stage_step": "end", "loss": None, "scores": {own: end_score}}]
        _write_run(root, "grpo", 0.1, seed, stages=[{"stage": 0}, {"stage": 1, "task": own, "curve": curve}])
    md, collected = R.build_report([root], tmp_path / "rep")
    (row,) = R.inside_stage_rows(collected.summaries)
    assert row["steps"] == [0, 10] and row["mean"] == [15.0, 35.0]
    assert row["end"] == {"steps": (20, 24), "mean": 80.0, "min": 70.0, "max": 90.0}
    assert f"| 1 | {own} | 2 | 0: 15.0, 10: 35.0, end (step 20-24): 80.0 |" in md
    assert len(list((tmp_path / "rep").glob("inside_stage_*.png"))) == 1


def test_inside_stage_paired_differences_by_hand(tmp_path: Path) -> None:
    """Hand-computed: self_distill − grpo at stage 1, seeds 0 and 1. Step 10: 40 − 20 = 20 and 30 − 20 = 10,
    mean 15, sd 7.0711, t_{0.975, 1} = 12.7062 -> 15 ± 63.53; the stage end (step 20 in all four runs): 90 − 50
    = 40 and 70 − 50 = 20, mean 30 ± 127.06; step 0 (both 10): 0 [0, 0]."""
    root = tmp_path / "runs"
    own = TASKS[0]
    scores = {"grpo": [(20, 50), (20, 50)], "self_distill": [(40, 90), (30, 70)]}
    for method, per_seed in scores.items():
        for seed, (at10, end) in enumerate(per_seed):
            curve = [{"step": 5, "stage_step": 0, "loss": 1.0, "scores": {own: 10}},
                     {"step": 15, "stage_step": 10, "loss": 0.5, "scores": {own: at10}},
                     {"step": 25, "stage_step": "end", "loss": None, "scores": {own: end}}]
            _write_run(root, method, 0.1, seed, stages=[{"stage": 0}, {"stage": 1, "task": own, "curve": curve}])
    md, collected = R.build_report([root], tmp_path / "rep", references=["grpo"])
    comparisons = {"grpo": R.paired_comparisons(collected.summaries, "grpo")}
    (row,) = R.inside_stage_paired_rows(comparisons)
    assert (row["stage"], row["task"], row["seeds"], row["steps"]) == (1, own, [0, 1], [0, 10, 20])
    zero, at10, end = row["diffs"]
    assert (zero.mean, zero.low, zero.high) == (0.0, 0.0, 0.0)
    assert at10.mean == 15.0 and at10.high - at10.mean == pytest.approx(12.7062 * 7.0711 / 2 ** 0.5, rel=1e-4)
    assert end.mean == 30.0 and end.low == pytest.approx(30 - 12.7062 * 14.1421 / 2 ** 0.5, rel=1e-4)
    assert f"| grpo | {row['cell']} | 1 | {own} | 2 | 0: 0.00 [0.00, 0.00]; 10: 15.00 [-48.53, 78.53]; " in md


def test_inside_stage_section_without_curves(built: tuple[Path, str, R.Collected]) -> None:
    out, md, _ = built
    assert "(no run has curves: `eval.every_steps` was off)" in md and not list(out.glob("inside_stage_*.png"))


def _general_answers(run: Path, stage: int, answers: list[str]) -> None:
    folder = run / "predictions" / f"stage{stage}"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"g{i}", "prediction": a, "score": 0}) for i, a in enumerate(answers)]
    (folder / "general.jsonl").write_text("\n".join(lines) + "\n")


def test_drift_and_artifact_measures_by_hand(tmp_path: Path) -> None:
    """Hand-computed per run, then paired: LA = mean diagonal of SEQ_MATRIX = (50 + 60 + 70) / 3 = 60;
    inside_mean: stage 1's own task at steps 10 and the end (30, 50) -> 40, stage 2 (no step-0 point: the
    matrix's row 1 gives step 0, not counted) 20 -> 20, mean 30; param_drift 100 x rel_fro; format_errors
    100 x mean(0.1, 0.3) = 20; general_opening: 'the answer is' opens 0 of 4 answers before and 3 of 4 after
    -> 75 points. Seed 1 of self_distill drifts 0.02 more and opens 1 answer fewer: paired differences by hand."""
    root = tmp_path / "runs"
    own1, own2 = TASKS[0], TASKS[1]
    for method, extra_drift, opened in (("grpo", 0.0, 0), ("self_distill", 0.01, 3)):
        for seed in (0, 1):
            curve1 = [{"step": 0, "stage_step": 0, "loss": 1.0, "scores": {own1: 10}},
                      {"step": 10, "stage_step": 10, "loss": 1.0, "scores": {own1: 30}},
                      {"step": 20, "stage_step": "end", "loss": None, "scores": {own1: 50}}]
            curve2 = [{"step": 30, "stage_step": 10, "loss": 1.0, "scores": {own2: 20}}]
            drift = 0.001 + extra_drift * (1 + seed)
            last = {"stage": 3, "task": TASKS[2], "drift": {"param/rel_fro/all": drift},
                    "diagnostics": {"kl_base": {"mean": 0.5 + seed}, "base_logprob": {"mean": -1.0}},
                    "format_error_rate": {own1: 0.1, own2: 0.3}}
            stages = [{"stage": 0}, {"stage": 1, "task": own1, "curve": curve1},
                      {"stage": 2, "task": own2, "curve": curve2}, last]
            run = _write_run(root, method, 0.1, seed, stages=stages)
            _general_answers(run, 0, ["Hello there friend", "I think so", "Well it is", "Yes I do"])
            n_open = opened - seed if opened else 0
            _general_answers(run, 3, ["The answer is: x."] * n_open + ["Plain words here"] * (4 - n_open))
    md, collected = R.build_report([root], tmp_path / "rep", references=["grpo"])
    by = {s.cell.method: s for s in collected.summaries}
    grpo, sd = by["grpo"].stats, by["self_distill"].stats
    assert grpo["LA"][0] == pytest.approx(60.0) and grpo["inside_mean"][0] == pytest.approx(30.0)
    assert grpo["param_drift"][0] == pytest.approx(0.1)
    assert grpo["kl_base"][:2] == pytest.approx((1.0, math.sqrt(0.5)))  # 0.5 and 1.5
    assert grpo["base_logprob"][0] == pytest.approx(-1.0) and grpo["format_errors"][0] == pytest.approx(20.0)
    # grpo's answers become "Plain words here" (4 of 4, none before): that opening rose 100 points
    assert grpo["general_opening"][0] == pytest.approx(100.0)
    # self_distill: seed 0 opens 3 of 4 with "the answer is" (75 points), seed 1 2 of 4 "plain words here"
    # and 2 of 4 "the answer is" (50 points either way)
    assert [R.run_measures(r)["general_opening"] for r in by["self_distill"].runs] == pytest.approx([75.0, 50.0])
    assert sd["param_drift"][0] == pytest.approx(100 * (0.001 + 0.015))  # 1.1 and 2.1 -> 1.6
    (comparison,) = [c for c in R.paired_comparisons(collected.summaries, "grpo", R.MEASURES)
                     if c.summary.cell.method == "self_distill"]
    d = comparison.diffs["param_drift"]  # differences 1.0 and 2.0: mean 1.5, sd 0.7071, t(0.975, 1) 12.706
    assert (d.n, d.mean) == (2, pytest.approx(1.5))
    assert d.high - d.mean == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2), rel=1e-4)
    assert comparison.diffs["LA"].mean == pytest.approx(0.0)
    assert "## Drift, artifacts and in-stage learning" in md and "| self_distill |" in md
    assert "param_drift [lo, hi]" in md and "`general_opening`:" in md
    with open(tmp_path / "rep" / "paired.csv", newline="", encoding="utf-8") as fh:
        row = next(r for r in csv.DictReader(fh) if r["method"] == "self_distill")
    assert float(row["param_drift_diff_mean"]) == pytest.approx(1.5)
    # the drift plot shows the response drift per stage beside the parameter drift
    assert R.drift_keys(collected.summaries)[:3] == ["param/rel_fro/all", "response/kl_base", "response/base_logprob"]
    assert (tmp_path / "rep" / "drift_tiny_mini_trace.png").stat().st_size > 5000


def test_measures_section_without_data_says_so() -> None:
    assert R.measures_section([], {}) == "(no run has them)"


def _set_metric(run: Path, name: str, value: object) -> None:
    res = json.loads((run / "results.json").read_text())
    res["metrics"][name] = value
    (run / "results.json").write_text(json.dumps(res))  # NaN is written as the JSON extension NaN


def test_a_nan_metric_is_listed_and_left_out_of_the_statistics(tmp_path: Path) -> None:
    for seed, op in enumerate((50.0, 52.0, 0.0)):
        _write_metrics_run(tmp_path / "runs", "opr", 0.1, seed, op, -2.0 - seed)
    _set_metric(tmp_path / "runs" / "opr_budget0.1_seed2", "OP", float("nan"))
    out = tmp_path / "rep"
    assert R.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    # OP mean/std of seeds 0 and 1 only: 51 ± sqrt(2); BWT -2, -3: -2.5 ± 0.71
    assert "| opr | 0.1 | tiny | mini_trace | 2 | 0,1 | 51.00 ± 1.41 | -2.50 ± 0.71 | 0.00 ± 0.00 |" in md
    assert "The statistics leave out 1 run(s) (1 non-finite), listed under Missing / partial runs." in md
    missing = md.split("## Missing / partial runs")[1]
    assert "opr_budget0.1_seed2" in missing and "non-finite, non-finite metric(s) OP=nan" in missing


def test_one_seed_has_no_spread_and_each_metric_its_own_count(tmp_path: Path) -> None:
    for seed in range(3):
        _write_metrics_run(tmp_path / "runs", "opr", 0.1, seed, 50.0 + seed, -2.0)
    _write_metrics_run(tmp_path / "runs", "vanilla_replay", 0.1, 0, 53.6, -4.0)
    _set_metric(tmp_path / "runs" / "opr_budget0.1_seed2", "FWT", None)  # FWT null (e.g. no forward transfer)
    _set_metric(tmp_path / "runs" / "opr_budget0.1_seed1", "FWT", 2.0)
    out = tmp_path / "rep"
    assert R.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| vanilla_replay | 0.1 | tiny | mini_trace | 1 | 0 | 53.60 ± n/a | -4.00 ± n/a | 0.00 ± n/a |" in md
    # FWT of seeds 0 and 1 (0, 2): 1 ± 1.41, over 2 of the cell's 3 runs
    assert "| opr | 0.1 | tiny | mini_trace | 3 | 0,1,2 | 51.00 ± 1.00 | -2.00 ± 0.00 | 1.00 ± 1.41 (n=2) |" in md
    with open(out / "report.csv", newline="", encoding="utf-8") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert rows["vanilla_replay"]["OP_std"] == "" and rows["vanilla_replay"]["OP_n"] == "1"
    assert rows["opr"]["FWT_n"] == "2" and rows["opr"]["OP_n"] == "3"


# ------------------------------------------------------------------------------------------ --power
@pytest.mark.parametrize("diffs, p", [
    ([1, 2, 3], 2 / 8),  # sums ±1 ±2 ±3: |6| twice of 8
    ([3, 1, -1], 6 / 8),  # observed |3|: 5, 3, 3, -3, -3, -5 of 5, 3, 3, 1, -1, -3, -3, -5
    ([1, 1, 1, 1], 2 / 16),
    ([1, 2, 3, 4, 5, 6], 2 / 64),  # all of one sign: only the all-+ and all-− patterns reach it
    ([2, -1], 1.0),  # sums 1, 3, -3, -1: all |.| >= 1
    ([0, 0], 1.0),
    ([5], 1.0),
    ([1] * 17, 2 / 2**17),  # more patterns than one chunk of 2^16
])
def test_sign_flip_p_by_hand(diffs: list[float], p: float) -> None:
    assert R.sign_flip_p(diffs) == pytest.approx(p, abs=1e-15)


def test_sign_flip_p_sampled_beyond_the_exact_limit() -> None:
    diffs = [1.0, 2.0, 3.0, 0.5, -0.25]
    exact = R.sign_flip_p(diffs)
    sampled = R.sign_flip_p(diffs, exact_up_to=3, samples=2**16)
    assert exact == pytest.approx(4 / 32)  # |sum| >= 6.25 only for ±(1+2+3+0.5-0.25) and ±(1+2+3+0.5+0.25)
    assert sampled == pytest.approx(exact, abs=0.01) and sampled != exact  # (1 + hits) / (1 + samples)


def test_detectable_difference_by_hand() -> None:
    # df = 2: t_p = (2p - 1) / sqrt(2 p (1 - p)): t_0.975 = 4.302653, t_0.80 = 1.060660; sd 1, n 3
    assert R.detectable_difference(3, 1.0) == pytest.approx((4.302653 + 1.060660) / math.sqrt(3), abs=1e-5)
    # n = 20 (df 19, from the t table: t_0.975 = 2.0930, t_0.80 = 0.8610), sd 6.9 (issue 28's paired spread)
    assert R.detectable_difference(20, 6.9) == pytest.approx((2.0930 + 0.8610) * 6.9 / math.sqrt(20), abs=2e-3)
    assert R.detectable_difference(5, 0.0) == 0.0
    with pytest.raises(ValueError, match="needs n >= 2 pairs, got 1"):
        R.detectable_difference(1, 1.0)


def _noncentral_t_cdf(t: float, df: int, ncp: float) -> float:
    """P(T' <= t), T' noncentral t: E over V ~ chi2_df of Phi(t sqrt(V/df) - ncp), integrated on v = u^2."""
    import numpy as np

    erf = np.frompyfunc(math.erf, 1, 1)
    u = np.linspace(0.0, math.sqrt(df + 40 * math.sqrt(2 * df) + 40), 20001)
    v = u * u
    log_pdf = (df / 2 - 1) * np.log(np.where(v > 0, v, 1e-300)) - v / 2 - (df / 2) * math.log(2) - math.lgamma(df / 2)
    phi = 0.5 * (1 + erf((t * np.sqrt(v / df) - ncp) / math.sqrt(2)).astype(float))
    return float(np.trapezoid(phi * np.exp(log_pdf) * 2 * u, u))


@pytest.mark.parametrize("n, true_power", [(2, 0.731), (3, 0.766), (5, 0.791), (10, 0.799), (20, 0.800)])
def test_detectable_difference_against_the_noncentral_t(n: int, true_power: float) -> None:
    """The power a two-sided paired t-test (alpha 0.05) really has at the printed detectable difference, by the
    noncentral t: the figures its docstring states."""
    df = n - 1
    assert _noncentral_t_cdf(1.0, df, 0.0) == pytest.approx(R.student_t_cdf(1.0, df), abs=1e-4)  # the integral
    crit = R.t_quantile(0.975, df)
    ncp = R.detectable_difference(n, 1.0) * math.sqrt(n)  # delta / (sd / sqrt(n))
    power = 1 - _noncentral_t_cdf(crit, df, ncp) + _noncentral_t_cdf(-crit, df, ncp)
    assert power == pytest.approx(true_power, abs=1.5e-3)


def test_power_columns_by_hand_and_absent_without_the_flag(paired_report: tuple[Path, str], tmp_path: Path) -> None:
    out, plain = paired_report
    assert "perm p" not in plain and "detectable" not in plain
    with open(out / "paired.csv", newline="", encoding="utf-8") as fh:
        assert not any("perm_p" in h or "detectable" in h for h in next(csv.reader(fh)))
    assert R.main([str(out.parent / "runs"), "--out", str(tmp_path / "rep"), "--power"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    section = md.split("## Paired differences")[1].split("## Drift, artifacts and in-stage learning")[0]
    assert "sign-flip permutation p-value" in section and "80% power" in section
    # BWT diffs 3, 2, 4 (sd 1) and OP diffs 1, 3, 5 (sd 2), all positive: p = 2/8; detectable (4.302653 +
    # 1.060660) * sd / sqrt(3) = 3.10 and 6.19. One pair: p = 1, no detectable difference.
    assert ("| opr budget=0.1 tiny mini_trace | 3 | 3.00 [0.52, 5.48] | 0.250 | 3.10 | 3.00 [-1.97, 7.97] | 0.250 "
            "| 6.19 |") in section
    assert "| vanilla_replay budget=0.2 tiny mini_trace | 1 | 9.00 [n/a] | 1.000 | n/a | 5.00 [n/a] | 1.000 | n/a |" \
        in section
    assert "| opr budget=0.2 tiny mini_trace | 0 | n/a | n/a | n/a | n/a | n/a | n/a |" in section
    with open(tmp_path / "rep" / "paired.csv", newline="", encoding="utf-8") as fh:
        rows = {(r["reference"], r["method"], r["budget"]): r for r in csv.DictReader(fh)}
    r = rows[("vanilla_replay", "opr", "0.1")]
    assert float(r["BWT_perm_p"]) == 0.25
    assert float(r["BWT_detectable80"]) == pytest.approx((4.302653 + 1.060660) / math.sqrt(3), abs=1e-5)
    one = rows[("seq_sft", "vanilla_replay", "0.2")]
    assert float(one["BWT_perm_p"]) == 1.0 and one["BWT_detectable80"] == ""
