"""python -m opr.tools.evaluate: saved model folders scored as the run scored its stages."""

from __future__ import annotations

import json

import pytest

from opr.run import run_experiment
from opr.tools import evaluate

RUN = ["method=seq_sft", "analysis.drift=false", "analysis.diagnostics=false", "checkpoint.save=true",
       "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import TINY, compose_cfg

    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run_experiment(compose_cfg(TINY + RUN, run_dir))
    return run_dir


def test_a_runs_stage_checkpoint_reproduces_its_row(run_dir, tmp_path, capsys):
    record = json.loads((run_dir / "results.json").read_text())
    out = tmp_path / "scores.json"
    folders = [run_dir / "checkpoints" / "stage1", run_dir / "checkpoints" / "stage2"]
    assert evaluate.main([*map(str, folders), "--run", str(run_dir), "--out", str(out),
                          "--predictions", str(tmp_path / "pred")]) == 0
    models = json.loads(out.read_text())["models"]
    for t, model in zip((1, 2), models):
        expected = dict(zip(record["tasks"], record["matrix"][t])) | dict(
            zip(record["general"]["tasks"], record["general"]["matrix"][t]))
        assert model["scores"] == expected
    # the answers are the run's own, line for line
    for task in record["tasks"] + record["general"]["tasks"]:
        ours = [json.loads(x)["prediction"] for x in (tmp_path / "pred" / "stage2" / f"{task}.jsonl").read_text().splitlines()]
        theirs = [json.loads(x)["prediction"]
                  for x in (run_dir / "predictions" / "stage2" / f"{task}.jsonl").read_text().splitlines()]
        assert ours == theirs
    printed = capsys.readouterr().out
    assert "task mean" in printed and "stage2" in printed


def test_overrides_compose_the_project_config(run_dir, tmp_path):
    from conftest import TINY

    out = tmp_path / "scores.json"
    args = [str(run_dir / "checkpoints" / "stage2"), "--out", str(out)]
    for o in TINY + RUN:
        args += ["--set", o]
    assert evaluate.main(args) == 0
    record = json.loads((run_dir / "results.json").read_text())
    assert json.loads(out.read_text())["models"][0]["scores"][record["tasks"][0]] == record["matrix"][2][0]


def test_bad_input_is_named(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(tmp_path), "--run", str(run_dir)])
    assert exit_.value.code == 2 and "not a model folder (no config.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([str(run_dir / "checkpoints" / "stage1"), "--run", str(run_dir), "--set", "seed=1"])
    assert "the run's settings are used as recorded" in capsys.readouterr().err
    assert evaluate.main([str(run_dir / "checkpoints" / "stage1"), "--run", str(tmp_path)]) == 2
    assert "no results.json there" in capsys.readouterr().err
    assert evaluate.main([str(run_dir / "checkpoints" / "stage1"), "--set", "benchmark.num_tasks=99"]) == 2
    assert "num_tasks" in capsys.readouterr().err


def test_a_bad_override_is_one_line_as_train_py_gives_it(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # a model folder by its marker; the override fails first
    cases = {"benchmark.nope=3": "error: --set benchmark.nope=3: Could not override 'benchmark.nope'. To append to "
                                 "your config use +benchmark.nope=3 (Key 'nope' is not in struct)\n",
             "benchmark=nope": "error: --set benchmark=nope: In 'config': Could not find 'benchmark/nope'"}
    for override, message in cases.items():
        assert evaluate.main([str(model), "--set", override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err, err
