"""python -m opr.tools.rescore: finished runs scored again with the benchmark's current rewards."""

from __future__ import annotations

import json

import pytest

from opr.run import run_experiment
from opr.tools import report, rescore


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import TINY, compose_cfg

    run_dir = tmp_path_factory.mktemp("rescore") / "runs" / "seq_sft_s0"
    run_experiment(compose_cfg(TINY + ["method=seq_sft", "analysis.drift=false", "analysis.diagnostics=false",
                                       "checkpoint.save=false"], run_dir))
    return run_dir


def _rewrite_general(run_dir, stage, make_prediction):
    path = run_dir / "predictions" / f"stage{stage}" / "general.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r["prediction"] = make_prediction(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_rescore_recomputes_general_and_keeps_tasks(finished_run, tmp_path):
    original = (finished_run / "results.json").read_text()
    before = json.loads(original)
    # The varied stream's general reward reads the named answer: "The answer is X." now scores 100.
    rows = _rewrite_general(finished_run, 0, lambda r: f"The answer is {r['reference']}.")
    out = tmp_path / "rescored"
    assert rescore.main([str(finished_run.parent), "--out", str(out)]) == 0
    data = json.loads((out / "seq_sft_s0" / "results.json").read_text())
    assert data["matrix"] == before["matrix"]  # task rewards did not change: same scores
    assert data["general"]["matrix"][0] == [100.0] and data["general"]["matrix"][1:] == before["general"]["matrix"][1:]
    end = before["general"]["matrix"][-1][0]
    assert data["metrics"]["general_drift"] == pytest.approx(end - 100.0)
    assert data["rescored"]["changed"] == {"stage0/general": [before["general"]["matrix"][0][0], 100.0]}
    assert len(rows) == 4
    assert (finished_run / "results.json").read_text() == original  # the run's own record is never touched
    runs = report.read_results_json_runs(out)  # the report reads the re-scored records
    assert len(runs) == 1 and runs[0]["status"] == "complete"


def test_rescore_names_a_missing_stage_file(finished_run, tmp_path):
    copy = tmp_path / "runs" / "partial"
    copy.mkdir(parents=True)
    (copy / "results.json").write_text((finished_run / "results.json").read_text())
    (copy / "predictions" / "stage2").mkdir(parents=True)  # only the last stage kept, as under docs/results/
    for f in (finished_run / "predictions" / "stage2").iterdir():
        (copy / "predictions" / "stage2" / f.name).write_text(f.read_text())
    with pytest.raises(rescore.RescoreError, match=r"stage0.*missing: every stage's predictions are needed"):
        rescore.rescore_run(copy)
    assert rescore.main([str(copy.parent), "--out", str(tmp_path / "out")]) == 1  # nothing re-scored


def test_rescore_refuses_an_unknown_example(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "runs" / "changed"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("checkpoints", "*.lock"))
    path = copy / "predictions" / "stage1" / "general.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["id"] = "general/eval/999"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(rescore.RescoreError, match=r"general/eval/999.*not in the rebuilt 'general' task"):
        rescore.rescore_run(copy)


def test_a_truncated_results_json_is_skipped_and_named_and_state_copies_are_no_runs(finished_run, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    good = runs / "good"
    shutil.copytree(finished_run, good, ignore=shutil.ignore_patterns("checkpoints", "*.lock"))
    bad = runs / "truncated"
    shutil.copytree(finished_run, bad, ignore=shutil.ignore_patterns("checkpoints", "*.lock"))
    text = (bad / "results.json").read_text()
    (bad / "results.json").write_text(text[: len(text) // 2])  # cut off, as by a full disk
    assert list(good.glob("train_state/*/results.json"))  # the run keeps a copy in its training state
    capsys.readouterr()
    assert rescore.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "out" / "good" / "results.json").is_file()
    assert not (tmp_path / "out" / "truncated").exists()
    assert f"skipped: {bad / 'results.json'}: unreadable (JSONDecodeError" in err
    assert "train_state" not in err and "status 'running'" not in err
    assert "re-scored 1 runs" in err and "skipped 1" in err
