"""The run record: what ``results.json`` holds, as typed dataclasses.

``RunResults`` is the whole file (one run: its config, the accuracy matrix, the metrics, one ``StageRecord``
per evaluated stage, the status); the loop (:mod:`opr.loop`) builds and writes it after every stage, and the
readers (:mod:`opr.tools.report`, :mod:`opr.tools.report.wandb_offline`, :mod:`opr.tools.bench`) read its fields. The
on-disk format is plain JSON and stays what it was when the record was a dict::

    {"config": {...}, "run": {...}, "tasks": [...], "matrix": [[...]], "general": {"tasks", "matrix"},
     "metrics": {...}, "stages": [{"stage", "task", "seconds", "train_examples", <data statistics>, "train",
     "eval", "general", "empty_rate", "format_error_rate", ...}, ...], "manifest": {...}, "status": "...",
     "seconds_setup", "seconds_elapsed", "resumed", "error", "seconds_total", "stage_cache"}

Round trip: ``RunResults.from_json(d).to_json() == d`` for every record the loop writes and every older one
(key order aside). What makes that hold:

- keys a record does not know (a method's data statistics such as ``replay``, ``prompt_pool``, ``opr``;
  keys written by older or newer code) are kept in ``extra`` and written back as they were;
- a known key absent from the input stays absent: its field is ``None`` and ``to_json`` leaves ``None``
  fields out (except ``StageRecord``'s ``stage`` and ``task``, always written; ``task`` is null at stage 0);
- a known key present with the value null is kept in ``extra`` as ``{key: None}`` (its field reads ``None``)
  and written back as null, unless the field has been given a value since.

``from_json`` checks the structure only (the record is an object, ``stages`` a list of objects, ``general``
an object) and raises ``ValueError`` otherwise; leaf values are taken as they are, so a reader that must
tell a malformed value from a missing one (``opr.tools.report``) still can. Nested values are shared with the
input and output dicts, not copied.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar, Union

R = TypeVar("R", bound="_Record")


class Status(str, enum.Enum):
    """``results.json``'s ``status``: where the run stands. A ``str`` (``Status.COMPLETE == "complete"``),
    written as the lower-case string; ``str()`` and f-strings give the string too."""

    RUNNING = "running"  # the loop is running (or the process was killed before it could say otherwise)
    COMPLETE = "complete"  # every stage trained and evaluated; ``metrics`` and ``seconds_total`` are set
    DIVERGED = "diverged"  # a NaN/inf loss stopped it; ``error`` names the stage
    FAILED = "failed"  # any other error stopped it; ``error`` names it
    INTERRUPTED = "interrupted"  # a signal (SIGTERM, Ctrl-C, pre-emption) stopped it; the same command resumes

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# The statuses of a run that did not finish (its matrix holds the stages evaluated so far).
UNFINISHED: tuple[Status, ...] = (Status.RUNNING, Status.DIVERGED, Status.FAILED, Status.INTERRUPTED)


def parse_status(value: Any) -> Any:
    """A ``Status`` for one of the five strings; any other value as it is (a reader's own marker such as
    ``opr.tools.report``'s "missing", or a status of newer code)."""
    try:
        return Status(value)
    except ValueError:
        return value


def plain_status(value: Any) -> Any:
    """A status as written in results.json: the plain string for a ``Status``, any other value as it is."""
    return value.value if isinstance(value, Status) else value


@dataclass
class _Record:
    """JSON round trip of a dataclass with an ``extra`` dict (see the module docstring)."""

    ALWAYS: ClassVar[tuple[str, ...]] = ()  # fields written even when None
    EXTRA_AFTER: ClassVar[Optional[str]] = None  # extra keys are written after this field (None: at the end)
    DECODE: ClassVar[dict[str, Callable[[Any], Any]]] = {}  # JSON value -> field value, per field
    ENCODE: ClassVar[dict[str, Callable[[Any], Any]]] = {}  # field value -> JSON value, per field

    @classmethod
    def _keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        """The record of a parsed JSON object; raises ``ValueError`` when ``data`` is not an object."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a {cls.__name__} is a JSON object, got {type(data).__name__}")
        record = cls(**{k: None for k in cls._keys()}, extra={})
        record.update(data)
        return record

    def update(self, data: Mapping[str, Any]) -> None:
        """Set each key of ``data`` as ``dict.update`` would on the JSON object: a known key sets its field, any
        other goes to ``extra``."""
        known = self._keys()
        for key, value in data.items():
            if key not in known:
                self.extra[key] = value
            elif value is None and key not in self.ALWAYS:
                setattr(self, key, None)
                self.extra[key] = None  # present and null: written back as null
            else:
                decode = self.DECODE.get(key)
                setattr(self, key, decode(value) if decode is not None else value)
                self.extra.pop(key, None)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (a new dict; nested values are shared with the record)."""
        out: dict[str, Any] = {}
        for key in self._keys():
            value = getattr(self, key)
            if value is not None or key in self.ALWAYS:
                encode = self.ENCODE.get(key)
                out[key] = encode(value) if encode is not None and value is not None else value
            if key == self.EXTRA_AFTER:
                self._put_extra(out)
        self._put_extra(out)
        return out

    def _put_extra(self, out: dict[str, Any]) -> None:
        for key, value in self.extra.items():
            out.setdefault(key, value)  # a field given a value after it was read as null wins


@dataclass
class StageRecord(_Record):
    """One entry of ``results.json``'s ``stages``: stage ``stage`` (0 = the evaluation before any training).

    Scores are percentages (0-100), rates fractions (0-1), times wall-clock seconds, memory MiB. ``None``
    means the key is absent (a stage being trained has no ``eval`` yet; ``drift``, ``diagnostics``,
    ``prompts_cut``, ``stage_cache`` only when enabled or when there is something to say).
    """

    stage: int
    """Stage index: 0 is the base model's evaluation, t >= 1 the stage that trained task ``t``."""
    task: Optional[str] = None
    """The task the stage trained (``None`` at stage 0). Always written."""
    seconds: Optional[dict[str, float]] = field(default_factory=dict)
    """Seconds per part: ``data`` (building the stage's data: rollouts, scoring, selection), ``train``,
    ``eval``, ``drift``, ``diagnostics``, ``checkpoint``; a stage taken from the stage cache has
    ``cached_<part>`` instead: the seconds the computing run measured."""
    train_examples: Optional[int] = None
    """SFT examples the stage trained on (current task plus replay; 0 at stage 0; on-policy methods: 0)."""
    train: Optional[dict[str, Any]] = None
    """What the method's training measured (``TrainStats.as_dict`` for SFT: steps, examples,
    supervised_tokens, seconds, first/last/mean loss, mean_grad_norm, tokens_per_second; on-policy methods
    their own statistics). Open-ended: it differs per method."""
    eval: Optional[dict[str, float]] = None
    """Score (0-100) of every stream task after the stage, by task name: row ``stage`` of the matrix."""
    general: Optional[dict[str, float]] = None
    """Score (0-100) of every general-ability set after the stage, by name."""
    empty_rate: Optional[dict[str, float]] = None
    """Fraction (0-1) of empty responses, per task and general set."""
    format_error_rate: Optional[dict[str, float]] = None
    """Fraction (0-1) of responses outside the task's answer format, per task that defines one."""
    prompts_cut: Optional[dict[str, int]] = None
    """Prompts cut on the left to fit the model's context, per task (only when some were)."""
    prompts_per_rank: Optional[dict[str, list[int]]] = None
    """With several ranks: the prompts each rank generated for the stage, by kind (``eval``: the row's
    evaluation; ``rollouts``: the replay family's rollouts), in rank order."""
    drift: Optional[dict[str, float]] = None
    """Parameter and spectral drift against the base weights (``analysis.drift``), by metric name."""
    diagnostics: Optional[dict[str, Any]] = None
    """Policy diagnostics (``analysis.diagnostics``): ``kl_base``, ``kl_prev`` (None at a stage without
    π_{t-1}), ``base_logprob``, each ``{"mean", "tokens", "sequences", "per_task"}`` in nats."""
    curve: Optional[list[dict[str, Any]]] = None
    """Evaluation inside the stage (``eval.every_steps``): one point per N optimizer steps and one at the stage
    end, each ``{"step" (global), "stage_step" (or "end"), "loss" (that step's training loss, None at the
    end), "scores": {task: 0-100}}``; in a stage trained in phases (``sft_then_grpo``) ``stage_step`` counts
    on across the phases, each point but the end's has its ``"phase"`` and each phase end but the last a point."""
    phase_checkpoints: Optional[dict[str, str]] = None
    """A stage trained in phases with ``checkpoint.save``: the checkpoint saved at the end of each phase but the
    last, by phase, relative to the run directory (``sft_then_grpo``: ``{"sft": "checkpoints/stage{t}_sft"}``);
    a plain ``from_pretrained`` folder like the stage's own, removed with it by ``checkpoint.keep_last``."""
    stage_cache: Optional[dict[str, Any]] = None
    """With a stage cache: ``{"key", "hit": False, "stored"}`` for a computed stage, ``{"key", "hit": True,
    "source" (the run that computed it), "seconds_saved"}`` for one taken from the cache."""
    peak_rss_mb: Optional[float] = None
    """Peak resident memory of the process (MiB) when the stage finished (not recorded at stage 0)."""
    peak_gpu_mb: Optional[float] = None
    """On a GPU: ``torch.cuda.max_memory_allocated`` of rank 0 so far (MiB), when the stage finished."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other key: the method's data statistics (``replay``, ``prompt_pool``, ...), open-ended."""

    ALWAYS: ClassVar[tuple[str, ...]] = ("stage", "task")
    EXTRA_AFTER: ClassVar[Optional[str]] = "train_examples"  # where the loop put the data statistics

    def record_shares(self, kind: str, counts: Sequence[int]) -> None:
        """``prompts_per_rank[kind] = counts``, the prompts each rank generated (one count per rank): kept only
        with several ranks (one process's single count says nothing)."""
        if len(counts) > 1:
            self.prompts_per_rank = {**(self.prompts_per_rank or {}), kind: list(counts)}

    @property
    def cache_hit(self) -> bool:
        """Whether the stage was taken from the stage cache."""
        return bool((self.stage_cache or {}).get("hit"))


@dataclass
class GeneralScores(_Record):
    """``results.json``'s ``general``: general-ability sets evaluated after every stage, not trained on."""

    tasks: Optional[list[str]] = field(default_factory=list)
    """The general sets' names, in column order."""
    matrix: Optional[list[list[float]]] = field(default_factory=list)
    """``matrix[s][j]``: score (0-100) of set ``tasks[j]`` after stage ``s`` (row 0: before training)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _stages(value: Any) -> list[StageRecord]:
    if not isinstance(value, list):
        raise ValueError(f"stages is a JSON list, got {type(value).__name__}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise ValueError(f"stages[{i}] is a JSON object, got {type(entry).__name__}")
        out.append(StageRecord.from_json(entry))
    return out


@dataclass
class RunResults(_Record):
    """A run's ``results.json``. A new record holds what a run starts with; ``from_json`` gives ``None`` for
    every key the file lacks. Scores are percentages (0-100), times wall-clock seconds."""

    config: Optional[dict[str, Any]] = field(default_factory=dict)
    """The resolved, validated Hydra config the run ran with (plain JSON)."""
    run: Optional[dict[str, Any]] = field(default_factory=dict)
    """Facts of the run: world_size, per_device_batch, grad_accum, global_batch, compute_dtype,
    backbone_source, seed, peak_rss_mb (MiB, after setup), packed_attention (the path packed training batches
    take: ``opr.attention.describe``), and the reproduction facts of
    ``opr.provenance.reproduction_facts`` (versions, machine, git commit)."""
    tasks: Optional[list[str]] = field(default_factory=list)
    """The stream's task names in training order: the matrix's columns."""
    matrix: Optional[list[list[float]]] = field(default_factory=list)
    """The accuracy matrix R: ``matrix[s][j]`` = score (0-100) of task ``tasks[j]`` after stage ``s``; row 0
    is before any training. (T+1) x T when complete; fewer rows while running or after an early stop."""
    general: Optional[GeneralScores] = field(default_factory=GeneralScores)
    """General-ability scores, a row per stage like ``matrix``."""
    metrics: Optional[dict[str, Optional[float]]] = field(default_factory=dict)
    """Continual-learning metrics of the matrix (``opr.metrics.continual``: OP, BWT, FWT, ... in score
    points) plus ``general_drift``; empty until the run completes."""
    stages: Optional[list[StageRecord]] = field(default_factory=list)
    """One record per evaluated stage, stage 0 first."""
    manifest: Optional[dict[str, Any]] = field(default_factory=dict)
    """The benchmark's data manifest: per task and split, record count and content hash."""
    status: Optional[Union[Status, str]] = Status.RUNNING
    """Where the run stands (:class:`Status`; another string is kept as it is)."""
    seconds_setup: Optional[dict[str, float]] = None
    """Seconds spent before the loop: ``benchmark`` (building it), ``model_load``."""
    seconds_elapsed: Optional[float] = None
    """Loop seconds up to the last finished stage (across resumptions)."""
    resumed: Optional[list[dict[str, Any]]] = None
    """One ``{"kind": "stage_end" | "mid_stage", "stage", "global_step"}`` per resumption, oldest first."""
    error: Optional[str] = None
    """Why the run stopped early (status diverged, failed or interrupted)."""
    seconds_total: Optional[float] = None
    """Loop seconds of the whole run (across resumptions); set when complete."""
    stage_cache: Optional[dict[str, Any]] = None
    """With a stage cache, when complete: ``{"dir", "hits", "misses", "hit_stages", "seconds_saved"}``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other key (written by older or newer code, or by a reader: ``wandb``, ``_source``, ...)."""

    DECODE: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "stages": _stages,
        "general": GeneralScores.from_json,
        "status": parse_status,
    }
    ENCODE: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "stages": lambda stages: [s.to_json() for s in stages],
        "general": lambda general: general.to_json(),
        "status": plain_status,
    }

    @classmethod
    def coerce(cls, results: Union[RunResults, Mapping[str, Any]]) -> RunResults:
        """``results`` itself when it is a record, else the record of a results.json-format dict."""
        return results if isinstance(results, cls) else cls.from_json(results)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> RunResults:
        """Read a ``results.json``; ``OSError`` when unreadable, ``ValueError`` when not JSON or not a record."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the record to ``path`` atomically (a reader sees the old file or the new one, never half)."""
        write_json_atomic(Path(path), self.to_json())

    @property
    def finished_stages(self) -> int:
        """Trained stages evaluated so far (matrix rows beyond row 0)."""
        return max(0, len(self.matrix or []) - 1)

    @property
    def seconds_spent(self) -> Optional[float]:
        """``seconds_total`` when the run completed, else ``seconds_elapsed`` (None when neither is known)."""
        return self.seconds_total if self.seconds_total is not None else self.seconds_elapsed


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a ``.tmp`` sibling and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as indented JSON (non-ASCII kept), written atomically: how results.json is written."""
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def format_table(results: RunResults | dict) -> str:
    """The accuracy matrix (plus general ability) and the summary metrics as a plain-text table."""
    results = RunResults.coerce(results)
    tasks = results.tasks
    gen_tasks = (results.general.tasks if results.general is not None else None) or []
    header = ["stage"] + tasks + gen_tasks
    width = max(8, *(len(h) for h in header))
    lines = ["  ".join(h.rjust(width) for h in header)]
    for s, row in enumerate(results.matrix):
        g = results.general.matrix[s] if gen_tasks else []
        label = "0 (base)" if s == 0 else f"{s} {tasks[s - 1]}"[:width]
        lines.append("  ".join([label.rjust(width)] + [f"{v:.1f}".rjust(width) for v in list(row) + list(g)]))
    m = results.metrics or {}
    shown = [f"{k}={v:.2f}" for k, v in m.items() if isinstance(v, (int, float))]
    lines.append("  ".join(shown))
    return "\n".join(lines)
