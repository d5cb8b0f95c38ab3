"""Phrases a run's training spread through its answers: amplified n-grams per stage and task.

    python -m opr.tools.ngrams RUN [RUN ...] [--n 3] [--top 5] [--opening] [--min-after 0.1]
                               [--stages all|last] [--out FILE.json]

For each run and task, the greedy answers after a stage (``predictions/stage{t}/{task}.jsonl``) are compared with
the answers to the same prompts before any training (``predictions/stage0``): the word n-grams whose share of
answers rose the most (``opr.metrics.ngrams.amplified_ngrams``). ``--opening`` counts only how answers start
(a collapsed register shows there first). A run copied with its last stage only (as under ``docs/results/``)
has no ``stage0`` folder; the error says so. Reads files only: no model, no torch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from opr import jsonl
from opr.metrics.ngrams import amplified_ngrams

__all__ = ["read_answers", "run_shifts", "main"]


def read_answers(path: Path) -> dict[str, str]:
    """``{example id: prediction}`` of one predictions file (``x.jsonl`` or ``x.jsonl.gz``)."""
    out = {}
    for number, line in enumerate(jsonl.read_text(path).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                out[row["id"]] = row["prediction"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{path}:{number}: not a predictions line ({err})") from None
    return out


def _stages(run: Path) -> list[int]:
    found = [int(m.group(1)) for p in (run / "predictions").glob("stage*")
             if p.is_dir() and (m := re.fullmatch(r"stage(\d+)", p.name))]
    return sorted(found)


def run_shifts(run: Path, n: int = 3, top: int = 5, opening: bool = False, min_after: float = 0.1,
               stages: str = "last") -> list[dict]:
    """One row per (stage, task): ``{"stage", "task", "answers", "shifts": [{"ngram", "before", "after"}]}``,
    comparing the stage's answers with stage 0's on the prompts both answered."""
    found = _stages(run)
    if 0 not in found:
        raise ValueError(f"{run}: no predictions/stage0 (the answers before training); a run copied with its last "
                         "stage only cannot be compared")
    later = [t for t in found if t > 0]
    if not later:
        raise ValueError(f"{run}: no stage after stage 0 has predictions")
    chosen = later if stages == "all" else later[-1:]
    rows = []
    for t in chosen:
        for path in jsonl.files(run / "predictions" / f"stage{t}"):
            base_path = run / "predictions" / "stage0" / path.name
            if not jsonl.exists(base_path):
                continue
            before, after = read_answers(base_path), read_answers(path)
            ids = [i for i in after if i in before]
            shifts = amplified_ngrams([before[i] for i in ids], [after[i] for i in ids], n=n, top=top,
                                      opening=opening, min_after=min_after)
            rows.append({"stage": t, "task": path.stem, "answers": len(ids),
                         "shifts": [{"ngram": s.ngram, "before": s.before, "after": s.after} for s in shifts]})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opr.tools.ngrams", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (with predictions/stage0 and later)")
    ap.add_argument("--n", type=int, default=3, help="words per n-gram (default 3)")
    ap.add_argument("--top", type=int, default=5, help="n-grams listed per stage and task (default 5)")
    ap.add_argument("--opening", action="store_true", help="count only the first n words of each answer")
    ap.add_argument("--min-after", type=float, default=0.1,
                    help="list an n-gram only if at least this share of answers has it after (default 0.1)")
    ap.add_argument("--stages", choices=("last", "all"), default="last", help="the last stage (default) or every one")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.n < 1 or args.top < 1:
        ap.error(f"--n and --top must be >= 1, got {args.n} and {args.top}")
    if not 0 <= args.min_after <= 1:
        ap.error(f"--min-after must be in [0, 1], got {args.min_after}")
    result = {}
    for run in args.runs:
        try:
            result[str(run)] = rows = run_shifts(run, args.n, args.top, args.opening, args.min_after, args.stages)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{run}  ({'openings' if args.opening else 'anywhere'}, n = {args.n}; share of answers before -> after)")
        for row in rows:
            listed = "; ".join(f"'{s['ngram']}' {s['before']:.0%} -> {s['after']:.0%}" for s in row["shifts"])
            print(f"  stage {row['stage']} {row['task']} ({row['answers']} answers): {listed or 'no phrase spread'}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
