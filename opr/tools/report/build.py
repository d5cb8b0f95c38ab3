"""``build_report``: load the runs, group them into cells, compare them, write report.md, the CSVs and the
plots."""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from pathlib import Path

from opr.tools.report.cells import CellSummary, Collected, collect, paired_comparisons
from opr.tools.report.load import load_runs
from opr.tools.report.plots import (
    drift_keys,
    plot_bwt_vs_budget,
    plot_drift,
    plot_heatmap,
    plot_inside_stage,
    plot_paired,
    plot_task_curves,
)
from opr.tools.report.runs import EVAL_SE, MEASURES, TABLE_METRICS
from opr.tools.report.tables import (
    _write_rows,
    inside_stage_paired_rows,
    inside_stage_paired_section,
    inside_stage_rows,
    inside_stage_section,
    markdown_table,
    measures_section,
    missing_section,
    paired_csv_rows,
    paired_section,
    replay_rows,
    replay_section,
    write_csv,
)

DEFAULT_REFERENCES: tuple[str, ...] = ("vanilla_replay", "seq_sft")


def build_report(
    paths: Sequence[str | Path], out_dir: Path, references: Sequence[str] = DEFAULT_REFERENCES, power: bool = False
) -> tuple[str, Collected]:
    """Load, summarise, write report.md / report.csv / paired.csv / PNGs into ``out_dir``; returns the Markdown
    and data. ``references``: the methods that every cell is compared with by paired differences; ``power``:
    add each paired difference's permutation p-value and detectable difference (``--power``)."""
    runs = load_runs(paths)
    if not runs:
        raise ValueError(f"no results.json and no run directory under {', '.join(map(str, paths))}")
    collected = collect(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(collected.summaries, out_dir / "report.csv")
    plots: list[str] = []
    for s in collected.summaries:
        for prefix, fn in (("heatmap", plot_heatmap), ("tasks", plot_task_curves)):
            name = f"{prefix}_{s.slug}.png"
            fn(s, out_dir / name)
            plots.append(name)
    groups: dict[tuple[str, str], list[CellSummary]] = {}
    for s in collected.summaries:
        groups.setdefault((s.cell.backbone, s.cell.benchmark), []).append(s)
    for (backbone, bench), group in groups.items():
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{backbone}_{bench}")
        if any("BWT" in s.stats for s in group):
            name = f"bwt_vs_budget_{slug}.png"
            plot_bwt_vs_budget(group, out_dir / name, f"BWT vs budget: {backbone} on {bench}")
            plots.append(name)
        keys = drift_keys(group)
        if keys:
            name = f"drift_{slug}.png"
            plot_drift(group, out_dir / name, keys, f"drift per stage: {backbone} on {bench}")
            plots.append(name)
    inside = inside_stage_rows(collected.summaries)
    for (backbone, bench), group in groups.items():
        labels = {s.label for s in group}
        rows = [r for r in inside if r["cell"] in labels]
        if rows:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{backbone}_{bench}")
            name = f"inside_stage_{slug}.png"
            plot_inside_stage(rows, out_dir / name, f"learning inside each stage: {backbone} on {bench}")
            plots.append(name)
    metrics = (*TABLE_METRICS, *MEASURES)
    comparisons = {ref: paired_comparisons(collected.summaries, ref, metrics) for ref in dict.fromkeys(references)}
    _write_rows(*paired_csv_rows(comparisons, metrics, power), out_dir / "paired.csv")
    for ref, rows in comparisons.items():
        if any(c.diffs["BWT"].mean is not None for c in rows):
            name = f"paired_{re.sub(r'[^A-Za-z0-9._-]+', '_', ref)}.png"
            plot_paired(rows, out_dir / name, f"BWT difference to {ref}, paired by seed")
            plots.append(name)
    eval_se_note = (
        " eval SE (OP): OP's standard error from the finite evaluation sets (per-example scores of the last "
        "stage), mean over the cell's runs; compare it with OP's std over seeds."
        if any(EVAL_SE in s.stats for s in collected.summaries)
        else ""
    )
    n_complete = sum(len(s.runs) for s in collected.summaries)
    left_out = collections.Counter(p["status"] for p in collected.problems)
    left_out_note = (
        f" The statistics leave out {sum(left_out.values())} run(s) ("
        + ", ".join(f"{k} {v}" for v, k in sorted(left_out.items(), key=lambda kv: (-kv[1], kv[0])))
        + "), listed under Missing / partial runs."
        if left_out
        else ""
    )
    md = (
        "\n\n".join(
            [
                "# Run comparison",
                f"{n_complete} complete run(s) in {len(collected.summaries)} cell(s) from {', '.join(map(str, paths))}. "
                "Values: mean ± sample std (ddof=1) over seeds, 0-100 scale; n = seeds (a metric with fewer values says "
                "(n=k); one value has no std: n/a). More metrics in report.csv."
                + eval_se_note + left_out_note,
                markdown_table(collected.summaries),
                "## Paired differences",
                paired_section(comparisons, power=power),
                "## Drift, artifacts and in-stage learning",
                measures_section(collected.summaries, comparisons),
                "## What was replayed",
                "Per stage, means over the cell's runs: past-task prompts rolled out or requested, replay examples "
                "kept, the fraction of kept replays that are not their prompt's gold answer (whitespace "
                "normalised; vanilla replay: none by construction, shown as -), rollouts cut at the token limit.",
                replay_section(replay_rows(collected.summaries)),
                "## Learning inside each stage",
                "With `eval.every_steps`: the score of each stage's own task at the evaluated steps inside the "
                "stage (the last point is the stage end), mean over the cell's seeds; how fast a method "
                "specialises. Where the runs' stages end at different steps, \"end (step a-b)\" is the mean "
                "stage-end score. Plot: inside_stage_*.png (band: min..max over seeds).",
                inside_stage_section(inside),
                *filter(None, [inside_stage_paired_section(inside_stage_paired_rows(comparisons))]),
                "## Missing / partial runs",
                missing_section(collected),
                "## Plots",
                "\n".join(f"- [{p}]({p})" for p in plots) if plots else "(none)",
            ]
        )
        + "\n"
    )
    (out_dir / "report.md").write_text(md, encoding="utf-8")
    return md, collected
