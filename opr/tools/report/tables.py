"""The report's Markdown sections and CSV rows: the cell table, paired differences, measures, what was
replayed, learning inside each stage, and the runs left out."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from opr.results import RunResults
from opr.tools.report.cells import CellSummary, Collected, PairedComparison, series_name, varying_keys
from opr.tools.report.runs import EVAL_SE, MEASURE_NOTES, MEASURES, TABLE_METRICS, own_task_curve, record_of
from opr.tools.report.stats import PairedDifference, paired_difference


def _fmt(stat: tuple[float, float, int] | None, runs: int | None = None) -> str:
    """``mean ± std``; ``mean ± n/a`` for one value (the spread is undefined); `` (n=k)`` when the metric has
    k values of the cell's ``runs`` (a run without it, e.g. FWT null, adds nothing)."""
    if stat is None:
        return "n/a"
    mean, std, n = stat
    text = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} ± n/a"
    return text if runs is None or n == runs else f"{text} (n={n})"


def _md_row(cells: Sequence[str]) -> str:
    """One Markdown table row; ``|`` and line breaks inside a value (a prompt template ...) are escaped."""
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _fmt_eval_se(summary: CellSummary) -> str:
    """The ``eval SE (OP)`` entry: the mean over the runs with prediction files, "(k of n runs)" when not all
    have them, blank when none has."""
    stat = summary.stats.get(EVAL_SE)
    if stat is None:
        return ""
    mean, _, k = stat
    return f"{mean:.2f}" if k == len(summary.runs) else f"{mean:.2f} ({k} of {len(summary.runs)} runs)"


def markdown_table(
    summaries: Sequence[CellSummary], metrics: Sequence[str] = TABLE_METRICS, columns: Sequence[str] | None = None,
    eval_se: bool = True,
) -> str:
    """The Markdown table: one row per cell, ``mean ± std`` per metric, n = number of seeds. ``columns``: the
    settings keys shown after the benchmark (default: those that differ between the cells, :func:`varying_keys`).
    ``eval SE (OP)`` comes last when ``eval_se`` and any cell has it."""
    if columns is None:
        columns = varying_keys(s.cell for s in summaries)
    with_eval_se = eval_se and any(EVAL_SE in s.stats for s in summaries)
    head = ["method", "budget", "backbone", "benchmark", *columns, "n", "seeds", *metrics]
    head += ["eval SE (OP)"] if with_eval_se else []
    lines = [_md_row(head), "|" + "|".join("---" for _ in head) + "|"]
    for s in summaries:
        seeds = ",".join("?" if x is None else str(x) for x in s.seeds)
        row = [s.cell.method, s.cell.budget_label, s.cell.backbone, s.cell.benchmark]
        row += [s.cell.setting(k) for k in columns] + [str(len(s.runs)), seeds]
        row += [_fmt(s.stats.get(m), len(s.runs)) for m in metrics]
        row += [_fmt_eval_se(s)] if with_eval_se else []
        lines.append(_md_row(row))
    return "\n".join(lines)


def csv_rows(
    summaries: Sequence[CellSummary], columns: Sequence[str] | None = None
) -> tuple[list[str], list[dict]]:
    """CSV header and rows: cell columns, the settings keys that differ between cells (``columns``, default
    :func:`varying_keys`), n, seeds (``;``-joined), ``{metric}_mean``/``{metric}_std``/``{metric}_n`` for every
    metric (OP, BWT, FWT first, ``eval_SE_OP`` among them); an absent metric is an empty field."""
    if columns is None:
        columns = varying_keys(s.cell for s in summaries)
    names: list[str] = list(TABLE_METRICS)
    for s in summaries:
        names.extend(k for k in s.stats if k not in names)
    if EVAL_SE not in names:
        names.append(EVAL_SE)
    header = ["method", "budget", "backbone", "benchmark", *columns, "n", "seeds"]
    for name in names:
        header += [f"{name}_mean", f"{name}_std", f"{name}_n"]
    rows = []
    for s in summaries:
        row: dict = {
            "method": s.cell.method,
            "budget": s.cell.budget_label,
            "backbone": s.cell.backbone,
            "benchmark": s.cell.benchmark,
            **{k: s.cell.setting(k) for k in columns},
            "n": len(s.runs),
            "seeds": ";".join("?" if x is None else str(x) for x in s.seeds),
        }
        for name in names:
            stat = s.stats.get(name)
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_n"] = stat if stat else ("", "", 0)
            if stat and stat[2] < 2:
                row[f"{name}_std"] = ""  # undefined for one value
        rows.append(row)
    return header, rows


def write_csv(summaries: Sequence[CellSummary], path: Path) -> None:
    _write_rows(*csv_rows(summaries), path)


PAIRED_NOTE = (
    "Mean paired difference cell − reference over the seeds both cells have (n pairs), with its 95% confidence "
    "interval by paired t in brackets (two-sided, t quantile with n − 1 degrees of freedom; n/a for n < 2). "
    "The paired t interval is the only one given (no bootstrap). The reference cell has the same config except "
    "`method.*` (and the budget, for a budget-free reference). Every table metric, FWT too, is in paired.csv."
)


def _paired_row_label(comparison: PairedComparison, comparisons: Sequence[PairedComparison]) -> str:
    """The cell's label, with the reference cell's when the cell matches several cells of the reference."""
    several = sum(c.summary is comparison.summary for c in comparisons) > 1
    return f"{comparison.label} (vs {comparison.reference_summary.label})" if several else comparison.label


POWER_NOTE = (
    "With --power: `perm p` is the two-sided sign-flip permutation p-value of the mean difference (all 2^n sign "
    "patterns of the n differences for n ≤ 20, else 2^20 random ones; no distributional assumption beyond "
    "symmetry under no effect; the smallest possible p is 2/2^n, e.g. 0.0625 at n = 5), and `detectable` the "
    "smallest true difference the design detects with 80% power by a two-sided paired t-test at α = 0.05, "
    "(t_{0.975,n−1} + t_{0.80,n−1}) · sd / √n with the observed paired sd: an approximation of the noncentral-t "
    "value, within 1.2% of it for n ≥ 5 and smaller than it by 5% at n = 3 and 14% at n = 2 (n/a for n < 2)."
)


def _fmt_optional(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def paired_section(
    comparisons: dict[str, list[PairedComparison]], metrics: Sequence[str] = ("BWT", "OP"), power: bool = False
) -> str:
    """The "Paired differences" Markdown: a note and one table per reference method (cell, n pairs,
    ``mean diff <metric> [lo, hi]`` per metric; with ``power`` also ``<metric> perm p`` (:func:`sign_flip_p`)
    and ``<metric> detectable`` (:func:`detectable_difference`) after each)."""
    parts = [PAIRED_NOTE + (" " + POWER_NOTE if power else "")]
    for reference, rows in comparisons.items():
        parts.append(f"### vs {reference}")
        if not rows:
            parts.append(f"(no cell has a matching `{reference}` cell)")
            continue
        head = ["cell", "n pairs"]
        for m in metrics:
            head += [f"mean diff {m} [lo, hi]"] + ([f"{m} perm p", f"{m} detectable"] if power else [])
        lines = [_md_row(head), "|" + "|".join("---" for _ in head) + "|"]
        for c in rows:
            diffs = []
            for m in metrics:
                d = c.diffs[m]
                diffs.append(d.text())
                if power:
                    diffs += [_fmt_optional(d.permutation_p, 3), _fmt_optional(d.detectable, 2)]
            lines.append(_md_row([_paired_row_label(c, rows), str(len(c.seeds)), *diffs]))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def measures_section(summaries: Sequence[CellSummary], comparisons: dict[str, list[PairedComparison]]) -> str:
    """The "Drift, artifacts and in-stage learning" Markdown: what each :data:`MEASURES` column means, a table of
    the cells (mean ± std over seeds) and, per reference method, the paired differences of those measures."""
    shown = [m for m in MEASURES if any(m in s.stats for s in summaries)]
    if not shown:
        return "(no run has them)"
    parts = ["\n".join(f"- `{m}`: {MEASURE_NOTES[m]}" for m in shown),
             markdown_table(summaries, metrics=shown, eval_se=False)]
    for reference, rows in comparisons.items():
        if rows:
            head = ["cell", "n pairs", *(f"{m} [lo, hi]" for m in shown)]
            lines = [f"Paired differences vs {reference} (cell − reference, 95% paired-t interval):", "",
                     _md_row(head), "|" + "|".join("---" for _ in head) + "|"]
            for c in rows:
                lines.append(_md_row([_paired_row_label(c, rows), str(len(c.seeds)),
                                      *(c.diffs[m].text() if m in c.diffs else "n/a" for m in shown)]))
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


def paired_csv_rows(
    comparisons: dict[str, list[PairedComparison]], metrics: Sequence[str] = TABLE_METRICS, power: bool = False
) -> tuple[list[str], list[dict]]:
    """CSV header and rows of every comparison: reference method, cell and reference-cell labels, the cell's
    method/budget/backbone/benchmark, n_pairs, seeds (``;``-joined), and per metric ``{m}_diff_mean``,
    ``{m}_diff_low``, ``{m}_diff_high`` (the 95% paired-t interval; empty for n < 2) and ``{m}_n``; with
    ``power`` also ``{m}_perm_p`` (empty for n = 0) and ``{m}_detectable80`` (empty for n < 2)."""
    header = ["reference", "cell", "reference_cell", "method", "budget", "backbone", "benchmark", "n_pairs", "seeds"]
    for m in metrics:
        header += [f"{m}_diff_mean", f"{m}_diff_low", f"{m}_diff_high", f"{m}_n"]
        header += [f"{m}_perm_p", f"{m}_detectable80"] if power else []
    rows = []
    for reference, items in comparisons.items():
        for c in items:
            cell = c.summary.cell
            row: dict = {
                "reference": reference,
                "cell": c.label,
                "reference_cell": c.reference_summary.label,
                "method": cell.method,
                "budget": cell.budget_label,
                "backbone": cell.backbone,
                "benchmark": cell.benchmark,
                "n_pairs": len(c.seeds),
                "seeds": ";".join(map(str, c.seeds)),
            }
            for m in metrics:
                d = c.diffs.get(m) or PairedDifference(0, None)
                row[f"{m}_diff_mean"] = "" if d.mean is None else d.mean
                row[f"{m}_diff_low"] = "" if d.low is None else d.low
                row[f"{m}_diff_high"] = "" if d.high is None else d.high
                row[f"{m}_n"] = d.n
                if power:
                    p, detectable = d.permutation_p, d.detectable
                    row[f"{m}_perm_p"] = "" if p is None else p
                    row[f"{m}_detectable80"] = "" if detectable is None else detectable
            rows.append(row)
    return header, rows


def _write_rows(header: Sequence[str], rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(header))
        writer.writeheader()
        writer.writerows(rows)


def missing_section(collected: Collected) -> str:
    """Markdown list of partial / missing / unreadable / superseded runs and of cells lacking seeds."""
    lines = []
    for p in collected.problems:
        seed = "" if p["seed"] is None else f" seed={p['seed']}"
        lines.append(f"- `{p['source']}` ({p['cell']}{seed}): {p['status']}, {p['detail']}")
    for cell, seeds in collected.missing_seeds:
        lines.append(f"- {collected.label(cell)}: no complete run for seed(s) {', '.join(map(str, seeds))}")
    return "\n".join(lines) if lines else "(none)"


def _stages_with_curves(records: Iterable[RunResults]) -> list[int]:
    """The training stages (>= 1) that have an in-stage curve in any of ``records``."""
    return sorted({e.stage for r in records for e in r.stages or [] if e.curve and e.stage})


def inside_stage_rows(summaries: Sequence[CellSummary]) -> list[dict]:
    """Per cell and stage with curves: the stage's own task's seed-mean score at each step inside the stage
    (steps that every run of the cell has), for the "learning inside a stage" table and plot. Where the runs'
    stages end at different steps (GRPO skips degenerate batches), ``end`` holds the stage-end scores (mean,
    min, max) and the range of their steps; otherwise it is None and the last common step is the end."""
    rows = []
    for s in summaries:
        records = [record_of(r) for r in s.runs]
        for stage in _stages_with_curves(records):
            curves = [dict(own_task_curve(r, stage)) for r in records]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            task = next(e.task for r in records for e in r.stages or [] if e.stage == stage)
            row = {"cell": s.label, "method": series_name(s), "stage": stage, "task": task, "n": len(curves),
                   "steps": steps, "mean": [statistics.fmean(c[x] for c in curves) for x in steps],
                   "min": [min(c[x] for c in curves) for x in steps],
                   "max": [max(c[x] for c in curves) for x in steps], "end": None}
            ends = [max(c) for c in curves]
            if steps and any(e != steps[-1] for e in ends):  # the runs' stages end at different steps
                last = [c[e] for c, e in zip(curves, ends)]
                row["end"] = {"steps": (min(ends), max(ends)), "mean": statistics.fmean(last),
                              "min": min(last), "max": max(last)}
            rows.append(row)
    return rows


def inside_stage_section(rows: Sequence[dict]) -> str:
    """Markdown: per cell and stage, the own task's seed-mean score at each curve step (``step: score``)."""
    if not rows:
        return "(no run has curves: `eval.every_steps` was off)"
    lines = [_md_row(["cell", "stage", "task", "n", "own task's score at step (seed mean)"]),
             _md_row(["---"] * 5)]
    for r in rows:
        lines.append(_md_row([r["cell"], str(r["stage"]), r["task"], str(r["n"]),
                              ", ".join(f"{x}: {m:.1f}" for x, m in zip(r["steps"], r["mean"]))
                              + (_end_text(r["end"]) if r.get("end") else "")]))
    return "\n".join(lines)


def inside_stage_paired_rows(comparisons: dict[str, list[PairedComparison]]) -> list[dict]:
    """Per comparison (cell vs reference) and stage: the paired difference (cell − reference, by seed) of the
    stage's own-task score at each in-stage step that every paired run of both cells has (the stage end where
    all of them end at the same step); how much sooner one method specialises than the other."""
    rows = []
    for reference, items in comparisons.items():
        for c in items:
            mine, theirs = c.summary.runs_by_seed(), c.reference_summary.runs_by_seed()
            records = {seed: (record_of(mine[seed]), record_of(theirs[seed])) for seed in c.seeds}
            for stage in _stages_with_curves([r for pair in records.values() for r in pair]):
                curves = {seed: (dict(own_task_curve(a, stage)), dict(own_task_curve(b, stage)))
                          for seed, (a, b) in records.items()}
                curves = {seed: pair for seed, pair in curves.items() if pair[0] and pair[1]}
                if not curves:
                    continue
                steps = sorted(set.intersection(*(set(a) & set(b) for a, b in curves.values())))
                seeds = sorted(curves)
                diffs = [paired_difference([curves[sd][0][x] for sd in seeds], [curves[sd][1][x] for sd in seeds])
                         for x in steps]
                task = next(e.task for r in records[seeds[0]] for e in r.stages or [] if e.stage == stage)
                rows.append({"reference": reference, "cell": _paired_row_label(c, items), "stage": stage,
                             "task": task, "seeds": seeds, "steps": steps, "diffs": diffs})
    return rows


def inside_stage_paired_section(rows: Sequence[dict]) -> str:
    """Markdown: per comparison and stage, ``step: mean diff [lo, hi]`` of the own task's in-stage score."""
    if not rows:
        return ""
    lines = ["Paired by seed, cell − reference, 95% paired-t interval (steps every paired run of both cells has):",
             "", _md_row(["reference", "cell", "stage", "task", "n pairs", "own task's score difference at step"]),
             _md_row(["---"] * 6)]
    for r in rows:
        lines.append(_md_row([r["reference"], r["cell"], str(r["stage"]), r["task"], str(len(r["seeds"])),
                              "; ".join(f"{x}: {d.text()}" for x, d in zip(r["steps"], r["diffs"]))]))
    return "\n".join(lines)


def _end_text(end: dict) -> str:
    lo, hi = end["steps"]
    return f", end (step {lo}-{hi}): {end['mean']:.1f}"


def _mean_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def replay_rows(summaries: Sequence[CellSummary]) -> list[dict]:
    """What the replay family replayed, per cell and stage (means over the cell's runs): prompts requested,
    replay examples kept, the fraction of kept replays that differ from their gold answer, and the fraction of
    rollouts cut at the token limit. Cells whose runs replayed nothing are left out."""
    rows = []
    for s in summaries:
        stages: dict[int, list[dict]] = {}
        for run in s.runs:
            for entry in record_of(run).stages or []:
                replay = entry.extra.get("replay")  # the replay methods' data statistics
                if isinstance(replay, dict) and replay.get("requested"):
                    stages.setdefault(int(entry.stage if entry.stage is not None else 0), []).append(replay)
        for stage, replays in sorted(stages.items()):
            rollouts = [r.get("rollouts") for r in replays]
            unfinished = [r["unfinished"] / r["rollouts"] if r.get("rollouts") and "unfinished" in r else None
                          for r in replays]
            rows.append({
                "cell": s.label, "stage": stage, "runs": len(replays),
                "requested": _mean_of([r.get("requested") for r in replays]),
                "rollouts": _mean_of(rollouts),
                "kept": _mean_of([r.get("kept") for r in replays]),
                "differs_from_gold": _mean_of([r.get("differs_from_gold") for r in replays]),
                "unfinished_fraction": _mean_of(unfinished),
            })
    return rows


def replay_section(rows: Sequence[dict]) -> str:
    if not rows:
        return "(no run replayed anything)"

    def fmt(v: float | None, pct: bool = False) -> str:
        return "-" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.1f}")

    lines = ["| cell | stage | runs | prompts | rollouts | kept | kept ≠ gold | rollouts cut off |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['stage']} | {r['runs']} | {fmt(r['requested'])} | {fmt(r['rollouts'])} | "
              f"{fmt(r['kept'])} | {fmt(r['differs_from_gold'], True)} | {fmt(r['unfinished_fraction'], True)} |"
              for r in rows]
    return "\n".join(lines)
