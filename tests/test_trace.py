"""Tests of the TRACE loader: synthetic trees (always) and the real LLM-CL-Benchmark_500 (when present)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from opr.benchmarks import trace as T
from opr.types import Example

REPO = Path(__file__).resolve().parents[1]


def _trace_candidate() -> Path:
    env = os.environ.get("OPR_TRACE_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "data" / "trace" / "LLM-CL-Benchmark_500"


TRACE_ROOT = _trace_candidate() if _trace_candidate().is_dir() else None
needs_data = pytest.mark.skipif(
    TRACE_ROOT is None,
    reason=f"TRACE data not found at {_trace_candidate()} (set OPR_TRACE_ROOT to an LLM-CL-Benchmark_500 "
    "directory; the data is not shipped with the repository)",
)

# Counts from shared/data/trace/README.md (MeetingBank has no train.json in the 500 release).
COUNTS = {
    "C-STANCE": (500, 100, 100),
    "FOMC": (500, 100, 100),
    "MeetingBank": (None, 100, 100),
    "Py150": (500, 100, 100),
    "ScienceQA": (500, 100, 100),
    "NumGLUE-cm": (500, 41, 81),
    "NumGLUE-ds": (500, 100, 100),
    "20Minuten": (500, 100, 100),
}
WITH_TRAIN = [t for t in T.DEFAULT_ORDER if t != "MeetingBank"]


# ------------------------------------------------------------------------------------ synthetic tree
def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _records(n: int, prefix: str) -> list[dict]:
    return [{"prompt": f"{prefix} question {i}\nAnswer:", "answer": f"{i}"} for i in range(n)]


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A TRACE tree with FOMC, NumGLUE-ds and 20Minuten (5 train, 3 eval, 2 test each)."""
    for task in ("FOMC", "NumGLUE-ds"):
        for split, n in (("train", 5), ("eval", 3), ("test", 2)):
            _write(tmp_path / task / f"{split}.json", _records(n, f"{task}-{split}"))
    for split, n in (("train", 5), ("eval", 3), ("test", 2)):
        rows = [
            {
                "prompt": "Provide a simplified version of the following paragraph in German.\n\n"
                f"Paragraph:\nDer lange Satz Nummer {i} ist schwer.\n\nSimplification:",
                "answer": f"Satz {i} ist leicht.",
            }
            for i in range(n)
        ]
        _write(tmp_path / "20Minuten" / f"{split}.json", rows)
    return tmp_path


def test_loads_selected_tasks_in_order_with_ids_metrics_and_settings(tiny_root: Path) -> None:
    bench = T.load_trace(str(tiny_root), tasks=["NumGLUE-ds", "FOMC"], chat=True)
    assert bench.name == "trace"
    assert [t.name for t in bench.tasks] == ["NumGLUE-ds", "FOMC"]
    task = bench.tasks[0]
    assert (len(task.train), len(task.eval), len(task.test)) == (5, 3, 2)
    assert task.train[4] == Example(
        "NumGLUE-ds/train/4", "NumGLUE-ds", "NumGLUE-ds-train question 4\nAnswer:", "4"
    )
    assert task.test[1].id == "NumGLUE-ds/test/1"
    assert task.chat is True
    assert task.max_new_tokens == T.MAX_NEW_TOKENS["NumGLUE-ds"]
    # exact match on raw strings, as TRACE
    assert task.reward("4", task.train[4]) == 100.0
    assert task.reward(" 4", task.train[4]) == 0.0
    assert bench.general == []


def test_caps_take_the_first_records(tiny_root: Path) -> None:
    bench = T.load_trace(str(tiny_root), tasks=["FOMC"], max_train=2, max_eval=1, max_test=None)
    task = bench.tasks[0]
    assert [e.id for e in task.train] == ["FOMC/train/0", "FOMC/train/1"]
    assert [e.answer for e in task.train] == ["0", "1"]
    assert [e.id for e in task.eval] == ["FOMC/eval/0"]
    assert len(task.test) == 2
    assert bench.manifest["FOMC"]["train"]["records"] == 5
    assert bench.manifest["FOMC"]["train"]["used"] == 2


def test_cap_zero_skips_the_split_file(tiny_root: Path) -> None:
    (tiny_root / "FOMC" / "train.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"FOMC[/\\]train\.json"):
        T.load_trace(str(tiny_root), tasks=["FOMC"])
    bench = T.load_trace(str(tiny_root), tasks=["FOMC"], max_train=0)
    assert bench.tasks[0].train == []
    assert set(bench.manifest["FOMC"]) == {"eval", "test"}


@pytest.mark.parametrize(("split", "needs"), [("train", "training"), ("eval", "evaluation")])
def test_empty_train_or_eval_list_names_the_task(tiny_root: Path, split: str, needs: str) -> None:
    # an empty train list trained on nothing and ended "complete"; an empty eval list failed after the model loaded
    _write(tiny_root / "NumGLUE-ds" / f"{split}.json", [])
    with pytest.raises(ValueError, match=rf"TRACE task 'NumGLUE-ds': .*{split}\.json holds no records; every "
                                         f"stream task needs {needs} examples"):
        T.load_trace(str(tiny_root), tasks=["FOMC", "NumGLUE-ds"])
    _write(tiny_root / "NumGLUE-ds" / f"{split}.json", _records(2, split))
    _write(tiny_root / "NumGLUE-ds" / "test.json", [])  # the loop never reads the test split: empty is fine
    assert T.load_trace(str(tiny_root), tasks=["NumGLUE-ds"]).tasks[0].test == []


def test_empty_general_set_is_refused(tiny_root: Path, tmp_path: Path) -> None:
    empty = _write(tmp_path / "gen" / "empty.json", [])
    with pytest.raises(ValueError, match=r"general set 'empty': .*empty\.json holds no records"):
        T.load_trace(str(tiny_root), tasks=["FOMC"], general_files=[str(empty)])


def test_manifest_has_counts_hashes_and_paths(tiny_root: Path) -> None:
    bench = T.load_trace(str(tiny_root), tasks=["FOMC", "20Minuten"])
    for task in ("FOMC", "20Minuten"):
        for split, n in (("train", 5), ("eval", 3), ("test", 2)):
            entry = bench.manifest[task][split]
            path = tiny_root / task / f"{split}.json"
            assert entry == {
                "records": n,
                "used": n,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "path": str(path),
            }


def test_20minuten_source_is_the_prompt_by_default_or_the_paragraph(tiny_root: Path) -> None:
    ex = T.load_trace(str(tiny_root), tasks=["20Minuten"]).tasks[0].eval[1]
    assert ex.source == ex.prompt  # TRACE passes the prompts to SARI as sources
    ex2 = T.load_trace(str(tiny_root), tasks=["20Minuten"], sari_source="paragraph").tasks[0].eval[1]
    assert ex2.source == "Der lange Satz Nummer 1 ist schwer."
    task = T.load_trace(str(tiny_root), tasks=["20Minuten"]).tasks[0]
    assert 0.0 < task.reward("Satz 1 ist leicht.", ex) <= 100.0
    fomc = T.load_trace(str(tiny_root), tasks=["FOMC"]).tasks[0]
    assert all(e.source is None for e in fomc.train + fomc.eval + fomc.test)


def test_sari_paragraph_rejects_other_prompts(tiny_root: Path) -> None:
    _write(tiny_root / "20Minuten" / "test.json", [{"prompt": "Simplify: x", "answer": "x"}])
    with pytest.raises(ValueError, match=r"test\.json: record 0"):
        T.load_trace(str(tiny_root), tasks=["20Minuten"], sari_source="paragraph")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ([{"prompt": "p", "answer": "a"}, {"prompt": "p"}], r"eval\.json: record 1 has no 'answer'"),
        ([{"prompt": "p", "answer": 6}], r"eval\.json: record 0 'answer' is a int"),
        ([{"prompt": "p", "answer": "a"}, ["p", "a"]], r"eval\.json: record 1 is a list"),
        ({"prompt": "p", "answer": "a"}, r"eval\.json: expected a JSON list"),
    ],
)
def test_malformed_records_name_file_and_index(tiny_root: Path, content: object, pattern: str) -> None:
    _write(tiny_root / "FOMC" / "eval.json", content)
    with pytest.raises(T.TraceFormatError, match=pattern):
        T.load_trace(str(tiny_root), tasks=["FOMC"])


def test_invalid_json_names_the_file(tiny_root: Path) -> None:
    (tiny_root / "FOMC" / "test.json").write_text('[{"prompt": "p", "answer": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"FOMC[/\\]test\.json: not valid UTF-8 JSON"):
        T.load_trace(str(tiny_root), tasks=["FOMC"])


def test_unselected_task_files_are_not_needed(tiny_root: Path) -> None:
    # MeetingBank is absent from the tiny tree; selecting other tasks works.
    assert [t.name for t in T.load_trace(str(tiny_root), tasks=["FOMC"]).tasks] == ["FOMC"]
    with pytest.raises(FileNotFoundError, match=r"MeetingBank[/\\]train\.json"):
        T.load_trace(str(tiny_root), tasks=["FOMC", "MeetingBank"])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"tasks": ["FOMC", "GSM8K"]}, r"unknown TRACE task\(s\) \['GSM8K'\]; allowed"),
        ({"tasks": ["FOMC", "FOMC"]}, "twice"),
        ({"tasks": []}, "empty"),
        ({"max_train": -1}, "max_train must be None"),
        ({"max_eval": 1.5}, "max_eval must be None"),
        ({"sari_source": "text"}, "sari_source must be one of"),
        ({"max_new_tokens": {"FOMC": 0}}, "max_new_tokens overrides"),
    ],
)
def test_bad_arguments(tiny_root: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        T.load_trace(str(tiny_root), **kwargs)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="TRACE root directory not found"):
        T.load_trace(str(tmp_path / "nope"))


def test_max_new_tokens_override(tiny_root: Path) -> None:
    bench = T.load_trace(str(tiny_root), tasks=["FOMC", "NumGLUE-ds"], max_new_tokens={"FOMC": 3})
    assert [t.max_new_tokens for t in bench.tasks] == [3, T.MAX_NEW_TOKENS["NumGLUE-ds"]]


# ------------------------------------------------------------------------------------- general sets
def test_general_files_default_and_named_with_metric(tiny_root: Path, tmp_path: Path) -> None:
    plain = _write(tmp_path / "gen" / "instruct.json", [{"prompt": "Say yes.", "answer": "yes"}] * 3)
    summ = _write(tmp_path / "gen" / "sum.json", [{"prompt": "Sum up: a b c.", "answer": "a b c"}])
    bench = T.load_trace(
        str(tiny_root),
        tasks=["FOMC"],
        max_eval=2,
        general_files=[str(plain), f"summaries={summ}:rouge_l"],
    )
    assert [g.name for g in bench.general] == ["instruct", "summaries"]
    instruct, summaries = bench.general
    assert [e.id for e in instruct.eval] == ["instruct/eval/0", "instruct/eval/1"]  # capped by max_eval
    assert instruct.train == [] and instruct.test == []
    assert instruct.reward("yes", instruct.eval[0]) == 100.0
    assert instruct.reward("Yes", instruct.eval[0]) == 0.0  # exact_match
    assert summaries.reward("a b c", summaries.eval[0]) == pytest.approx(99.9999995)  # rouge_l
    assert bench.manifest["summaries"]["eval"]["sha256"] == hashlib.sha256(summ.read_bytes()).hexdigest()
    assert bench.manifest["instruct"]["eval"]["records"] == 3


def test_parse_general_entry() -> None:
    assert T.parse_general_entry("/d/alpaca.json") == ("alpaca", "/d/alpaca.json", "exact_match")
    assert T.parse_general_entry("qa=/d/x.json:rouge_l") == ("qa", "/d/x.json", "rouge_l")
    assert T.parse_general_entry("/d/x.json:first_char_accuracy") == ("x", "/d/x.json", "first_char_accuracy")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        T.parse_general_entry("qa=/d/x.json:bleu")
    with pytest.raises(ValueError, match="needs a source"):
        T.parse_general_entry("qa=/d/x.json:sari")


def test_general_name_clash_and_missing_file(tiny_root: Path, tmp_path: Path) -> None:
    f = _write(tmp_path / "FOMC.json", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match="repeats a task"):
        T.load_trace(str(tiny_root), tasks=["FOMC"], general_files=[str(f)])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        T.load_trace(str(tiny_root), tasks=["FOMC"], general_files=[str(tmp_path / "missing.json")])


# ------------------------------------------------------------------------------------- real data
@needs_data
def test_real_data_all_tasks_load_with_readme_counts() -> None:
    bench = T.load_trace(str(TRACE_ROOT), tasks=WITH_TRAIN)
    assert [t.name for t in bench.tasks] == WITH_TRAIN
    for task in bench.tasks:
        assert (len(task.train), len(task.eval), len(task.test)) == COUNTS[task.name], task.name
    meeting = T.load_trace(str(TRACE_ROOT), tasks=["MeetingBank"], max_train=0).tasks[0]
    assert (len(meeting.eval), len(meeting.test)) == (100, 100)


@needs_data
def test_real_data_default_order_needs_meetingbank_train() -> None:
    with pytest.raises(FileNotFoundError, match=r"MeetingBank[/\\]train\.json"):
        T.load_trace(str(TRACE_ROOT))
    bench = T.load_trace(str(TRACE_ROOT), max_train=0, max_eval=5, max_test=5)
    assert [t.name for t in bench.tasks] == list(T.DEFAULT_ORDER)


@needs_data
def test_real_data_gold_answers_score_top_and_pass_format() -> None:
    bench = T.load_trace(str(TRACE_ROOT), max_train=0, max_eval=20, max_test=0)
    for task in bench.tasks:
        for ex in task.eval:
            score = task.reward(ex.answer, ex)
            if task.name == "20Minuten":
                assert 50.0 < score <= 100.0, ex.id  # SARI of the reference itself, source = prompt
            else:
                assert score == pytest.approx(100.0, abs=1e-6), ex.id
            assert task.format_ok is not None and task.format_ok(ex.answer), ex.id
        assert task.reward("", task.eval[0]) < 100.0
