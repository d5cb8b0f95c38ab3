"""Tests of the re-scoring CLI ``python -m opr.tools.score``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opr.metrics import text as M
from opr.tools import score as S

REPO = Path(__file__).resolve().parents[1]

LINES = [
    {"task": "FOMC", "prediction": "A", "reference": "A"},
    {"task": "FOMC", "prediction": "B", "reference": "A"},
    {"task": "ScienceQA", "prediction": "B\nBecause.", "reference": "B\nA clause ..."},
    {"task": "Py150", "prediction": "x = <NUM_LIT:1>", "reference": "x = 1", "id": "Py150/test/7"},
    {"task": "MeetingBank", "prediction": "the cat sat", "reference": "the cat sat on the mat"},
    {
        "task": "20Minuten",
        "prediction": "Der Hund bellt",
        "reference": "Der Hund bellt",
        "source": "Der Hund bellt laut",
    },
    {"task": "NumGLUE-cm", "prediction": "12.6", "reference": "12.6"},
]


def _jsonl(path: Path, rows: list, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + extra, encoding="utf-8")
    return path


def test_cli_round_trips_a_jsonl_file(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", LINES, extra="\n")  # a trailing blank line is skipped
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "opr.tools.score", "--benchmark", "trace", str(src), "--out", str(out)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(LINES)
    for got, given in zip(rows, LINES):
        assert {k: v for k, v in got.items() if k != "score"} == given  # other keys kept as they were
    scores = [r["score"] for r in rows]
    assert scores[:4] == [100.0, 0.0, 100.0, 100.0]
    assert scores[4] == pytest.approx(75.0, abs=1e-5)
    assert scores[5] == pytest.approx(100.0)
    assert scores[6] == 100.0
    # per-task means on stderr, tasks in first-seen order
    table = [line.split() for line in proc.stderr.strip().splitlines()]
    assert table[0] == ["task", "n", "mean"]
    assert table[1] == ["FOMC", "2", "50.00"]
    assert [row[0] for row in table[1:]] == [
        "FOMC",
        "ScienceQA",
        "Py150",
        "MeetingBank",
        "20Minuten",
        "NumGLUE-cm",
    ]


def test_cli_writes_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "in.jsonl", LINES[:2])
    assert S.main(["--benchmark", "trace", str(src)]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["score"] for line in captured.out.splitlines()] == [100.0, 0.0]
    assert "FOMC" in captured.err


def test_20minuten_uses_prompt_when_source_is_missing() -> None:
    row = {
        "task": "20Minuten",
        "prediction": "Der Hund bellt",
        "reference": "Der Hund",
        "prompt": "Der Hund bellt laut",
    }
    (scored,) = S.score_lines([json.dumps(row)], "trace")
    assert scored["score"] == pytest.approx(M.sari("Der Hund bellt", "Der Hund", "Der Hund bellt laut"))


@pytest.mark.parametrize(
    ("bad_line", "pattern"),
    [
        ("{not json", "line 3: not valid JSON"),
        ("[1, 2]", "line 3: expected a JSON object, got list"),
        (
            '{"task": "GSM8K", "prediction": "1", "reference": "1"}',
            "line 3: unknown trace task 'GSM8K'; allowed: C-STANCE",
        ),
        ('{"task": "FOMC", "reference": "A"}', "line 3: missing key 'prediction'"),
        (
            '{"task": "FOMC", "prediction": 1, "reference": "A"}',
            "line 3: 'prediction' must be a string, got int",
        ),
        (
            '{"task": "20Minuten", "prediction": "a", "reference": "b"}',
            "line 3: task '20Minuten' needs a 'source'",
        ),
    ],
)
def test_bad_lines_are_errors_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad_line: str, pattern: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(LINES[0]) + "\n\n" + bad_line + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(S.ScoreInputError, match=pattern):
        S.score_lines(src.read_text(encoding="utf-8").splitlines(), "trace")
    assert S.main(["--benchmark", "trace", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert pattern in err and str(src) in err
    assert not out.exists()  # nothing written on error


def test_out_in_a_missing_folder_creates_it(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", LINES[:2])
    out = tmp_path / "new" / "deeper" / "out.jsonl"
    assert S.main(["--benchmark", "trace", str(src), "--out", str(out)]) == 0
    assert [json.loads(x)["score"] for x in out.read_text(encoding="utf-8").splitlines()] == [100.0, 0.0]


def test_out_that_cannot_be_written_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "in.jsonl", LINES[:2])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert S.main(["--benchmark", "trace", str(src), "--out", str(blocker / "out.jsonl")]) == 2
    assert f"error: cannot write {blocker / 'out.jsonl'}" in capsys.readouterr().err


def test_missing_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert S.main(["--benchmark", "trace", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_unknown_benchmark() -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'glue'"):
        S.task_scorers("glue")
    with pytest.raises(SystemExit):
        S.main(["--benchmark", "glue", "x.jsonl"])


def test_mini_trace_tasks_are_scored_by_their_rewards() -> None:
    mini = pytest.importorskip("opr.benchmarks.mini_trace")
    metrics = getattr(mini, "TASK_METRICS", None)
    if not metrics:
        pytest.skip("opr.benchmarks.mini_trace has no TASK_METRICS yet")
    scorers = S.task_scorers("mini_trace")
    assert set(metrics) <= set(scorers)
    for task, metric in metrics.items():
        if metric in M.METRICS and not M.needs_source(metric):
            (row,) = S.score_lines(
                [json.dumps({"task": task, "prediction": "x y", "reference": "x y"})], "mini_trace"
            )
            assert row["score"] == pytest.approx(M.compute(metric, "x y", "x y")), task
    with pytest.raises(S.ScoreInputError, match="unknown mini_trace task 'FOMC'"):
        S.score_lines([json.dumps(LINES[0])], "mini_trace")
