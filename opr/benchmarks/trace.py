"""TRACE (Wang et al., 2023): loader for the benchmark's own directory layout.

Layout: ``<root>/<Task>/{train,eval,test}.json``, each file a JSON list of ``{"prompt": str, "answer": str}``
records (e.g. the ``LLM-CL-Benchmark_500`` release). Every task is scored with the metric TRACE's own
evaluation code uses as its main score (``evaluations/eval_*.py``), reproduced in :mod:`opr.metrics.text`.

Prompts are used exactly as stored: they already carry the instruction and end with the cue the model
continues from (``Answer:``, ``Summary:``, ...), and TRACE compares the raw generated text with the raw
answer (no stripping), so nothing is added or removed here either.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from opr.metrics import text as M
from opr.types import Benchmark, Example, Task

__all__ = [
    "DEFAULT_ORDER",
    "MAX_NEW_TOKENS",
    "SPLITS",
    "TASK_METRICS",
    "TraceFormatError",
    "load_trace",
    "parse_general_entry",
    "read_records",
    "sari_paragraph",
]

# TRACE's task order (scripts/infer_seq.sh: --inference_tasks C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,
# NumGLUE-cm,NumGLUE-ds,20Minuten).
DEFAULT_ORDER: tuple[str, ...] = (
    "C-STANCE",
    "FOMC",
    "MeetingBank",
    "Py150",
    "ScienceQA",
    "NumGLUE-cm",
    "NumGLUE-ds",
    "20Minuten",
)

# Task -> metric name in opr.metrics.text.METRICS: the main score of TRACE's eval_*.py for the task.
TASK_METRICS: dict[str, str] = {
    "C-STANCE": "exact_match",  # caculate_accuracy
    "FOMC": "exact_match",  # caculate_accuracy
    "MeetingBank": "rouge_l",  # eval_MeetingBank: rouge-L
    "Py150": "edit_similarity",  # eval_Py150: fuzz.ratio after postprocess
    "ScienceQA": "first_char_accuracy",  # eval_ScienceQA: accuracy of datium[0]
    "NumGLUE-cm": "exact_match",  # caculate_accuracy
    "NumGLUE-ds": "exact_match",  # caculate_accuracy
    "20Minuten": "sari",  # eval_20Minuten: HF sari with the prompts as sources
}

# Max new tokens per task. TRACE generates up to --max_ans_len 512 tokens for every task
# (scripts/infer_seq.sh) and stops at EOS. For exact-match tasks any cap longer than the longest answer
# gives the same score as 512 (an output that runs on past the answer is wrong either way), so those get
# a small cap with room to see a run-on (answers: 1 character for C-STANCE/FOMC, at most 18 for
# NumGLUE). Py150 answers are single lines of at most 143 characters. The free-text tasks keep TRACE's
# 512 so that long outputs are scored as TRACE scores them (MeetingBank answers up to ~1,100 characters,
# 20Minuten up to ~700, ScienceQA explanations up to ~3,400, of which TRACE also saw at most 512 tokens).
MAX_NEW_TOKENS: dict[str, int] = {
    "C-STANCE": 8,
    "FOMC": 8,
    "MeetingBank": 512,
    "Py150": 128,
    "ScienceQA": 512,
    "NumGLUE-cm": 16,
    "NumGLUE-ds": 16,
    "20Minuten": 512,
}

SPLITS: tuple[str, ...] = ("train", "eval", "test")

# 20Minuten prompts are "<instruction>\n\nParagraph:\n<text>\n\nSimplification:".
_PARAGRAPH_START = "Paragraph:\n"
_PARAGRAPH_END = "\n\nSimplification:"

_SARI_SOURCES = ("prompt", "paragraph")


def _abc_letter(prediction: str) -> bool:
    return prediction.strip() in ("A", "B", "C")


def _first_char_format(prediction: str) -> bool:
    return prediction[:1] in set("ABCDE")


def _one_line(prediction: str) -> bool:
    return prediction.strip() != "" and "\n" not in prediction.strip()


def _non_empty(prediction: str) -> bool:
    return prediction.strip() != ""


# Format checks (not correctness): the output has the shape the task's answer has.
_FORMAT_OK = {
    "C-STANCE": _abc_letter,
    "FOMC": _abc_letter,
    "MeetingBank": _non_empty,
    "Py150": _one_line,
    "ScienceQA": _first_char_format,
    "NumGLUE-cm": _one_line,
    "NumGLUE-ds": _one_line,
    "20Minuten": _non_empty,
}


class TraceFormatError(ValueError):
    """A TRACE-format file or record is malformed; the message names the file and the record index."""


def sari_paragraph(prompt: str) -> str:
    """The paragraph to simplify inside a 20Minuten prompt (between ``Paragraph:\\n`` and the cue).

    Raises ``ValueError`` when the prompt does not have that shape.
    """
    start = prompt.find(_PARAGRAPH_START)
    end = prompt.rfind(_PARAGRAPH_END)
    if start < 0 or end < start + len(_PARAGRAPH_START):
        raise ValueError(
            f"20Minuten prompt does not contain {_PARAGRAPH_START!r} ... {_PARAGRAPH_END!r}: {prompt[:80]!r}..."
        )
    return prompt[start + len(_PARAGRAPH_START) : end]


def read_records(path: str | os.PathLike) -> tuple[list[tuple[str, str]], str]:
    """Read a TRACE-format JSON file: a list of ``{"prompt": str, "answer": str}`` objects.

    Returns ``([(prompt, answer), ...], sha256 of the file bytes)``. Extra keys in a record are ignored.
    Raises ``FileNotFoundError`` naming the file when it is missing, and ``TraceFormatError`` (a ``ValueError``) naming the file
    (and the record index) when the JSON is invalid, not a list, or a record lacks a string
    ``prompt``/``answer``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TRACE data file not found: {path}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TraceFormatError(f"{path}: not valid UTF-8 JSON ({err})") from err
    if not isinstance(data, list):
        raise TraceFormatError(
            f"{path}: expected a JSON list of {{'prompt', 'answer'}} records, got {type(data).__name__}"
        )
    records: list[tuple[str, str]] = []
    for index, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise TraceFormatError(f"{path}: record {index} is a {type(rec).__name__}, expected an object")
        for key in ("prompt", "answer"):
            if key not in rec:
                raise TraceFormatError(f"{path}: record {index} has no {key!r} key (keys: {sorted(rec)})")
            if not isinstance(rec[key], str):
                raise TraceFormatError(
                    f"{path}: record {index} {key!r} is a {type(rec[key]).__name__}, expected a string"
                )
        records.append((rec["prompt"], rec["answer"]))
    return records, digest


def _cap(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None (all records) or an integer >= 0, got {value!r}")
    return value


def parse_general_entry(entry: str) -> tuple[str, str, str]:
    """Parse a ``general_files`` entry ``[name=]path[:metric]`` into ``(name, path, metric)``.

    ``name`` defaults to the file stem and ``metric`` to ``exact_match``. A trailing ``:word`` is read as
    the metric only when ``word`` is a metric name; otherwise the whole text is the path, and when that
    path does not exist either the error names the unknown metric.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(
            f"general_files entry must be a non-empty string '[name=]path[:metric]', got {entry!r}"
        )
    name, rest = entry.split("=", 1) if "=" in entry else ("", entry)
    path, metric = rest, "exact_match"
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if tail in M.METRICS:
            path, metric = head, tail
        elif not Path(rest).exists():
            raise ValueError(
                f"general_files entry {entry!r}: unknown metric {tail!r}; allowed: {', '.join(sorted(M.METRICS))}"
            )
    if M.needs_source(metric):
        raise ValueError(
            f"general_files entry {entry!r}: metric {metric!r} needs a source text, not supported"
        )
    name = name.strip() or Path(path).stem
    if not path:
        raise ValueError(f"general_files entry {entry!r} has an empty path")
    return name, path, metric


def load_trace(
    root: str,
    tasks: list[str] | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    max_test: int | None = None,
    chat: bool = False,
    general_files: Sequence[str] = (),
    seed: int = 0,
    *,
    sari_source: str = "prompt",
    max_new_tokens: dict[str, int] | None = None,
) -> Benchmark:
    """Load TRACE tasks from ``<root>/<Task>/{train,eval,test}.json`` into a :class:`Benchmark`.

    Args:
        root: directory holding one sub-directory per task (e.g. ``.../LLM-CL-Benchmark_500``).
        tasks: task names in stream order; ``None`` = :data:`DEFAULT_ORDER` (all 8). Unknown or repeated
            names raise ``ValueError``.
        max_train, max_eval, max_test: caps per split. A cap keeps the *first* N records of the file
            (TRACE's order; no sampling); ``None`` keeps all. A cap of 0 does not read that split at all
            (so e.g. ``max_train=0`` loads MeetingBank, which has no ``train.json`` in the 500 release, for
            evaluation only: a training run refuses ``benchmark.max_train=0``, see ``opr.config.RANGES``).
        chat: ``Task.chat`` for every task (wrap prompts in the backbone's chat template). TRACE feeds the
            raw prompt, i.e. ``chat=False``.
        general_files: held-out general-ability sets, each a JSON file in the same format, given as
            ``path`` or ``name=path:metric`` (:func:`parse_general_entry`); each becomes a task of
            ``Benchmark.general`` whose records are its ``eval`` split (capped by ``max_eval``), ids
            ``"{name}/eval/{i}"``, scored by ``exact_match`` unless a metric is given.
        seed: accepted for a uniform benchmark signature; loading is deterministic (first N records) and
            does not use it.
        sari_source: ``Example.source`` for 20Minuten (SARI's source text). ``"prompt"`` (default) is the
            whole prompt, as in TRACE (``eval_20Minuten.eval(sources_sequences, ...)`` gets the prompts);
            ``"paragraph"`` is only the paragraph to simplify (:func:`sari_paragraph`), which gives
            different, non-TRACE SARI values.
        max_new_tokens: per-task overrides of :data:`MAX_NEW_TOKENS`.

    Every example has id ``"{task}/{split}/{index}"`` (index in the file). ``Benchmark.manifest`` is
    ``{task: {split: {"records": records in the file, "used": records loaded, "sha256": sha256 of the
    file bytes, "path": file path}}}`` for every split read.

    Raises:
        FileNotFoundError: ``root`` or a needed split file is missing (names the path).
        ValueError: bad arguments, a malformed file/record (names the file and record index), or a train or
            eval split (or general set) that holds no records (names the task and the file).
    """
    if sari_source not in _SARI_SOURCES:
        raise ValueError(f"sari_source must be one of {_SARI_SOURCES}, got {sari_source!r}")
    caps = {
        "train": _cap("max_train", max_train),
        "eval": _cap("max_eval", max_eval),
        "test": _cap("max_test", max_test),
    }
    names = list(DEFAULT_ORDER) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in TASK_METRICS]
    if unknown:
        raise ValueError(f"unknown TRACE task(s) {unknown}; allowed: {list(DEFAULT_ORDER)}")
    if not names:
        raise ValueError("tasks is empty; give at least one TRACE task or None for all")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks lists a task twice: {names}")
    overrides = dict(max_new_tokens or {})
    bad = {k: v for k, v in overrides.items() if k not in TASK_METRICS or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"max_new_tokens overrides must map TRACE task names to integers >= 1, got {bad}")
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"TRACE root directory not found: {root_path}")

    stream: list[Task] = []
    manifest: dict = {}
    for name in names:
        splits: dict[str, list[Example]] = {}
        manifest[name] = {}
        for split in SPLITS:
            cap = caps[split]
            if cap == 0:
                splits[split] = []
                continue
            path = root_path / name / f"{split}.json"
            records, digest = read_records(path)
            used = records if cap is None else records[:cap]
            if not used and split != "test":  # training on nothing would end "complete"; evaluating nothing fails
                raise ValueError(f"TRACE task {name!r}: {path} holds no records; every stream task needs "
                                 f"{'training' if split == 'train' else 'evaluation'} examples")
            splits[split] = [
                _example(name, split, i, prompt, answer, path, sari_source)
                for i, (prompt, answer) in enumerate(used)
            ]
            manifest[name][split] = {
                "records": len(records),
                "used": len(used),
                "sha256": digest,
                "path": str(path),
            }
        stream.append(
            Task(
                name=name,
                train=splits["train"],
                eval=splits["eval"],
                test=splits["test"],
                reward=M.make_reward(TASK_METRICS[name]),
                max_new_tokens=overrides.get(name, MAX_NEW_TOKENS[name]),
                chat=chat,
                format_ok=_FORMAT_OK[name],
            )
        )

    general: list[Task] = []
    for entry in general_files:
        gname, gpath, metric = parse_general_entry(entry)
        if gname in manifest:
            raise ValueError(
                f"general set name {gname!r} (from {entry!r}) repeats a task or general set name"
            )
        records, digest = read_records(gpath)
        used = records if caps["eval"] is None else records[: caps["eval"]]
        if not used:
            raise ValueError(f"general set {gname!r}: {gpath} holds no records to evaluate")
        examples = [Example(f"{gname}/eval/{i}", gname, p, a) for i, (p, a) in enumerate(used)]
        general.append(
            Task(
                name=gname,
                train=[],
                eval=examples,
                test=[],
                reward=M.make_reward(metric),
                max_new_tokens=_general_max_new_tokens(used),
                chat=chat,
            )
        )
        manifest[gname] = {
            "eval": {"records": len(records), "used": len(used), "sha256": digest, "path": str(gpath)}
        }
    return Benchmark(name="trace", tasks=stream, general=general, manifest=manifest)


def _general_max_new_tokens(records: list[tuple[str, str]]) -> int:
    """Room for the longest answer of a general set: ~3 characters per token, plus 16, at most 512."""
    longest = max((len(answer) for _, answer in records), default=0)
    return min(512, longest // 3 + 16)


def _example(
    task: str, split: str, index: int, prompt: str, answer: str, path: Path, sari_source: str
) -> Example:
    source = None
    if M.needs_source(TASK_METRICS[task]):
        if sari_source == "prompt":
            source = prompt
        else:
            try:
                source = sari_paragraph(prompt)
            except ValueError as err:
                raise ValueError(f"{path}: record {index}: {err}") from err
    return Example(id=f"{task}/{split}/{index}", task=task, prompt=prompt, answer=answer, source=source)
