"""Shared pieces of the benchmark scripts: a fixed prompt/example mix, peak memory, tables and JSON output."""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from opr.backbones import Backbone
from opr.provenance import environment_facts
from opr.types import Example, Task

# Compute dtypes the benchmarks offer (--dtype): fp32, or bf16 autocast with fp32 master weights
# (engine.compute_dtype=bfloat16). float16 needs loss scaling, which the torch engine does not do.
DTYPES = ("float32", "bfloat16")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def machine_info() -> dict:
    """What a timing depends on: load average, threads, versions (:func:`opr.provenance.environment_facts`)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "load_average": [round(x, 2) for x in load],
        **environment_facts(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def mixed_examples(tasks: Sequence[Task], n: int, split: str = "eval") -> list[tuple[Task, Example]]:
    """``n`` examples taken round-robin over ``tasks`` (first example of each task, then the second ...):
    a fixed mix with the stream's spread of prompt and answer lengths."""
    if n < 1:
        raise ValueError(f"number of examples must be >= 1, got {n}")
    pools = [(t, getattr(t, split)) for t in tasks if getattr(t, split)]
    if not pools:
        raise ValueError(f"no task has examples in split {split!r}")
    out: list[tuple[Task, Example]] = []
    k = 0
    while len(out) < n:
        added = False
        for task, rows in pools:
            if k < len(rows) and len(out) < n:
                out.append((task, rows[k]))
                added = True
        if not added:
            raise ValueError(f"asked for {n} examples, the {split} splits hold only {len(out)}")
        k += 1
    return out


def load_mini_trace_all(size: int):
    """All seven mini_trace tasks with ``size`` train and eval examples each (fixed data seed)."""
    from opr.benchmarks.mini_trace import load_mini_trace

    return load_mini_trace(num_tasks=None, train_size=size, eval_size=size, test_size=0, general_size=1)


def formatted_prompts(backbone: Backbone, pairs: Sequence[tuple[Task, Example]]) -> list[str]:
    return [backbone.format_prompt(ex.prompt, task.chat) for task, ex in pairs]


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None) -> str:
    """A plain-text table of ``rows`` (dicts), one column per key (or per ``columns``)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: Optional[str], payload: dict) -> None:
    """Write ``payload`` (indented) to ``path``; nothing when ``path`` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
