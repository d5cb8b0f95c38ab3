"""Predictions and replay dumps kept gzip-compressed (``x.jsonl.gz``, as under docs/results/) read exactly as the
plain files: the report's evaluation standard error, ``rescore`` and ``ngrams`` give the same answers."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from conftest import TINY, compose_cfg

from opr import jsonl


def test_resolve_read_and_list_either_form(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"x": 2}\n')
    assert jsonl.resolve(tmp_path / "b.jsonl") == tmp_path / "b.jsonl.gz"
    assert jsonl.resolve(tmp_path / "c.jsonl") == tmp_path / "c.jsonl"  # missing: the plain name, for the message
    assert [json.loads(jsonl.read_text(p)) for p in jsonl.files(tmp_path)] == [{"x": 1}, {"x": 2}]
    assert [p.name for p in jsonl.files(tmp_path)] == ["a.jsonl", "b.jsonl"]
    assert jsonl.exists(tmp_path / "b.jsonl") and not jsonl.exists(tmp_path / "c.jsonl")
    with pytest.raises(OSError):
        jsonl.read_text(tmp_path / "c.jsonl")


def _gzip_tree(folder):
    for path in list(folder.rglob("*.jsonl")):
        with open(path, "rb") as src, gzip.open(path.with_name(path.name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()


def test_tools_read_compressed_runs_as_plain_ones(tmp_path):
    from opr.run import run_experiment
    from opr.tools.ngrams import run_shifts
    from opr.tools.report import run_eval_standard_error
    from opr.tools.rescore import rescore_run

    plain = tmp_path / "plain"
    run_experiment(compose_cfg(TINY + ["method=vanilla_replay", "budget=0.5", "analysis.drift=false"], plain))
    packed = tmp_path / "packed"
    shutil.copytree(plain, packed)
    _gzip_tree(packed)
    assert not list(packed.rglob("*.jsonl")) and list(packed.rglob("*.jsonl.gz"))

    def record(folder):
        return {**json.loads((folder / "results.json").read_text()), "_source": str(folder)}

    assert run_eval_standard_error(record(packed)) == run_eval_standard_error(record(plain)) is not None
    assert rescore_run(packed)["matrix"] == rescore_run(plain)["matrix"]
    assert run_shifts(packed, stages="all") == run_shifts(plain, stages="all")
