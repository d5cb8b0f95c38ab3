"""A W&B workspace (and optionally a report) for opr runs, built from code with ``wandb-workspaces``.

    python -m opr.tools.wandb_dashboard --entity E --project P [--group G] [--tasks a,b,c] [--report]
    opr-wandb-dashboard --entity E --project P ...          # the same (pip install -e .[dashboard])

Saves one workspace (a saved view of project E/P) whose runs are grouped by ``method.name`` and ``budget``
(config keys), so that the seeds of one method and budget are one line or bar: the mean over seeds, the band or
error bar their standard deviation. ``--group G`` keeps the runs of W&B group G only (the logger's group is the
run's ``experiment_name``). Sections, named by the metrics ``opr.loggers.wandb.WandbLogger`` writes:

- *Final OP / BWT / FWT*: bar charts of ``final/OP``, ``final/BWT``, ``final/FWT`` per group (mean, std over
  seeds), and ``final/BWT`` against the ``budget`` config (scatter, one point per run).
- *Forgetting curves*: per task, ``by_stage/eval/<task>`` against ``stage`` (the task's score after each stage);
  without ``--tasks``, one panel of every ``by_stage/eval/*`` metric; and the general set's
  ``by_stage/general/*``.
- *Accuracy matrix*: the ``final/accuracy_matrix`` table and the ``final/accuracy_heatmap`` image of each run.
- *Drift and diagnostics*: ``by_stage/drift/<key>`` (relative weight change, spectral drift) and
  ``by_stage/diagnostics/<name>`` (KL to the previous stage's and the base model, the base model's
  log-probability of the answers) against ``stage``; ``by_stage/empty_rate/*``.
- *Learning inside each stage*: ``inside/<task>`` against the optimizer step (runs with ``eval.every_steps``).
- *Training*: ``train/loss``, ``train/grad_norm``, ``train/lr`` against the step.

``--report`` also saves a report with the same panels (one panel grid per section, the same grouping); the
URLs of what was saved are printed. ``--dry-run`` builds everything and prints the workspace's sections and
panels without contacting W&B.

What ran where: the objects (sections, panels, metric names, grouping, filters) are built and checked offline
by ``tests/test_wandb_dashboard.py``, and the save calls (``Workspace.save``, ``Report.save``) ran against a
local HTTP endpoint on 127.0.0.1 that answers W&B's GraphQL requests and records them. Nothing was run against
a real W&B server (no network where this was written): how the W&B app lays the saved panels out is unchecked.
Saving needs an account (``WANDB_API_KEY`` or ``wandb login``); ``WANDB_BASE_URL`` picks a self-hosted server.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from opr.loggers.wandb import BY_STAGE_PREFIX, FINAL_PREFIX, HEATMAP_KEY, MATRIX_KEY, STAGE_AXIS

INSTALL_HINT = "pip install wandb-workspaces (or pip install -e .[dashboard])"
GROUP_BY: tuple[str, ...] = ("method.name", "budget")  # config keys; the seeds of one group are aggregated
FINAL_METRICS: tuple[str, ...] = ("OP", "BWT", "FWT")
# by_stage/drift/<key>: the preferred drift numbers of opr.analysis.drift (the report plots the same ones)
DRIFT_KEYS: tuple[str, ...] = (
    "param/rel_fro/all",
    "param/rel_fro/attn",
    "param/rel_fro/mlp",
    "spectral/angle_left_deg/all",
    "spectral/sv_rel_change/all",
    "spectral/inside_fraction/all",
)
DIAGNOSTICS: tuple[str, ...] = ("kl_prev", "kl_base", "base_logprob")  # by_stage/diagnostics/<name>
TRAIN_METRICS: tuple[str, ...] = ("loss", "grad_norm", "lr")  # train/<name>, at the optimizer step
INSIDE_PREFIX = "inside/"  # opr.observers.InsideStageEvaluation logs inside/<task> at the optimizer step
STEP_AXIS = "Step"  # W&B's own step (the trainer's global optimizer step for opr runs)
AGGREGATE = "mean"
SPREAD = "stddev"
DEFAULT_NAME = "opr: methods and budgets"
_TASK_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise ImportError(f"the W&B dashboard needs the wandb-workspaces package: {INSTALL_HINT}") from err
    return ws, wr


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """``a,b,c`` as a tuple of task names (the stream order); empty for ``None`` or ``""``. Raises
    ``ValueError`` naming a task that is not a plain name (letters, digits, ``_.-``) or appears twice."""
    if not text:
        return ()
    tasks = tuple(t.strip() for t in text.split(","))
    for t in tasks:
        if not _TASK_RE.match(t):
            raise ValueError(f"--tasks: {t!r} is no task name (allowed: letters, digits, '_', '.', '-')")
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise ValueError(f"--tasks: {', '.join(dupes)} given twice in {text!r}; each task once, in stream order")
    return tasks


def _grouped(**kwargs) -> dict:
    """Panel options that aggregate each group's runs: the mean, with the seeds' standard deviation as spread."""
    return {"groupby_aggfunc": AGGREGATE, "groupby_rangefunc": SPREAD, **kwargs}


def _stage_plot(wr, title: str, y: Sequence[str] = (), regex: str | None = None):
    """A line plot against the stage index (the x-axis of every ``by_stage/*`` metric)."""
    extra = {"metric_regex": regex} if regex else {}
    return wr.LinePlot(title=title, x=STAGE_AXIS, y=list(y), title_x="stage (0 = before training)",
                       **_grouped(**extra))


def final_panels(wr) -> list:
    """Bar charts of the final OP / BWT / FWT per group, and BWT against the budget per run."""
    bars = [wr.BarPlot(title=f"final {m} (mean ± std over seeds)", metrics=[FINAL_PREFIX + m], **_grouped())
            for m in FINAL_METRICS]
    scatter = wr.ScatterPlot(title="final BWT against the replay budget", x=wr.Config("budget"),
                             y=wr.SummaryMetric(FINAL_PREFIX + "BWT"))
    return [*bars, scatter]


def forgetting_panels(wr, tasks: Sequence[str]) -> list:
    """Each task's score against the stage (one panel per task; one panel of all without ``tasks``), then the
    general set's scores."""
    prefix = BY_STAGE_PREFIX + "eval/"
    if tasks:
        panels = [_stage_plot(wr, f"{task}: score after each stage", [prefix + task]) for task in tasks]
    else:
        panels = [_stage_plot(wr, "every task's score after each stage", regex=f"^{re.escape(prefix)}.*")]
    general = BY_STAGE_PREFIX + "general/"
    return [*panels, _stage_plot(wr, "general set after each stage", regex=f"^{re.escape(general)}.*")]


def matrix_panels(wr) -> list:
    """The accuracy matrix of each run: the logged table and the heatmap image."""
    return [wr.WeavePanelSummaryTable(table_name=MATRIX_KEY),
            wr.MediaBrowser(title="accuracy matrix heatmap", media_keys=[HEATMAP_KEY], num_columns=3)]


def drift_panels(wr) -> list:
    """Drift and diagnostics per stage, and the share of empty answers per task."""
    panels = [_stage_plot(wr, f"drift: {k}", [f"{BY_STAGE_PREFIX}drift/{k}"]) for k in DRIFT_KEYS]
    panels += [_stage_plot(wr, f"diagnostics: {d}", [f"{BY_STAGE_PREFIX}diagnostics/{d}"]) for d in DIAGNOSTICS]
    empty = BY_STAGE_PREFIX + "empty_rate/"
    return [*panels, _stage_plot(wr, "empty answers per task", regex=f"^{re.escape(empty)}.*")]


def inside_panels(wr, tasks: Sequence[str]) -> list:
    """Each task's score at the evaluations inside the stages, against the optimizer step."""
    if tasks:
        return [wr.LinePlot(title=f"{task}: score inside the stages", x=STEP_AXIS, y=[INSIDE_PREFIX + task],
                            **_grouped()) for task in tasks]
    return [wr.LinePlot(title="scores inside the stages", x=STEP_AXIS, metric_regex=f"^{re.escape(INSIDE_PREFIX)}.*",
                        **_grouped())]


def training_panels(wr) -> list:
    return [wr.LinePlot(title=f"train/{m}", x=STEP_AXIS, y=[f"train/{m}"], **_grouped()) for m in TRAIN_METRICS]


SECTIONS: tuple[str, ...] = ("Final OP / BWT / FWT", "Forgetting curves", "Accuracy matrix",
                             "Drift and diagnostics", "Learning inside each stage", "Training")


def section_panels(wr, tasks: Sequence[str] = ()) -> dict[str, list]:
    """``{section name: panels}`` in the order of :data:`SECTIONS`."""
    return dict(zip(SECTIONS, [final_panels(wr), forgetting_panels(wr, tasks), matrix_panels(wr),
                               drift_panels(wr), inside_panels(wr, tasks), training_panels(wr)]))


def _filters(ws, group: str | None) -> list:
    return [ws.Metric("Group") == group] if group else []


def build_workspace(entity: str, project: str, group: str | None = None, tasks: Sequence[str] = (),
                    name: str = DEFAULT_NAME):
    """The workspace (not saved): :data:`SECTIONS` with their panels, runs grouped by :data:`GROUP_BY`, only W&B
    group ``group`` when given."""
    _check_names(entity, project, group)
    ws, wr = _workspaces()
    sections = [ws.Section(name=title, panels=panels, is_open=True)
                for title, panels in section_panels(wr, tasks).items()]
    runset = ws.RunsetSettings(filters=_filters(ws, group), groupby=[ws.Config(k) for k in GROUP_BY])
    settings = ws.WorkspaceSettings(x_axis=STEP_AXIS, max_runs=100)
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections, settings=settings,
                        runset_settings=runset)


def build_report(entity: str, project: str, group: str | None = None, tasks: Sequence[str] = (),
                 title: str = DEFAULT_NAME):
    """The report (not saved): a heading and a note, then per section a heading and a panel grid over the same
    runs (grouped by :data:`GROUP_BY`, filtered to ``group``)."""
    _check_names(entity, project, group)
    ws, wr = _workspaces()
    scope = f"W&B group `{group}`" if group else "every run of the project"
    blocks = [wr.H1(text=title),
              wr.P(text=f"opr runs of {scope}, grouped by {' and '.join(GROUP_BY)}: lines and bars are the mean "
                        f"over seeds, bands and error bars their standard deviation. Built by "
                        f"opr.tools.wandb_dashboard.")]
    for section, panels in section_panels(wr, tasks).items():
        runset = wr.Runset(entity=entity, project=project, name=section, filters=_filters(ws, group),
                           groupby=list(GROUP_BY))
        blocks += [wr.H2(text=section), wr.PanelGrid(runsets=[runset], panels=panels)]
    return wr.Report(entity=entity, project=project, title=title, blocks=blocks)


def _check_names(entity: str, project: str, group: str | None) -> None:
    for what, value in (("entity", entity), ("project", project)):
        if not value or not value.strip() or "/" in value:
            raise ValueError(f"--{what} {value!r}: a W&B {what} name is non-empty and has no '/'")
    if group is not None and not group.strip():
        raise ValueError(f"--group {group!r}: give a W&B group name (the runs' experiment_name) or leave it out")


def describe(workspace) -> str:
    """The workspace as text: one line per section and per panel (type, title, metrics)."""
    lines = [f"workspace {workspace.name!r} of {workspace.entity}/{workspace.project}"]
    for section in workspace.sections:
        lines.append(f"  {section.name}")
        for panel in section.panels:
            metrics = getattr(panel, "y", None) or getattr(panel, "metrics", None) or getattr(panel, "media_keys", None)
            shown = metrics or getattr(panel, "metric_regex", None) or getattr(panel, "table_name", "")
            lines.append(f"    {type(panel).__name__}: {getattr(panel, 'title', None) or ''} {shown}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opr.tools.wandb_dashboard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--entity", required=True, help="W&B entity (user or team) that owns the project")
    ap.add_argument("--project", required=True, help="W&B project of the runs (logger.project; default opr)")
    ap.add_argument("--group", help="only the runs of this W&B group (the runs' experiment_name)")
    ap.add_argument("--tasks", help="comma-separated task names, stream order: one forgetting and one in-stage "
                                    "panel per task (default: one panel of all tasks)")
    ap.add_argument("--name", default=DEFAULT_NAME, help=f"workspace and report title (default: {DEFAULT_NAME!r})")
    ap.add_argument("--report", action="store_true", help="also save a report with the same panels")
    ap.add_argument("--dry-run", action="store_true", help="build and print the sections and panels; save nothing")
    args = ap.parse_args(argv)
    try:
        tasks = parse_tasks(args.tasks)
        workspace = build_workspace(args.entity, args.project, args.group, tasks, args.name)
        report = build_report(args.entity, args.project, args.group, tasks, args.name) if args.report else None
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(workspace))
        if report is not None:
            print(f"report {report.title!r}: {sum(1 for b in report.blocks if type(b).__name__ == 'PanelGrid')} "
                  "panel grids")
        return 0
    workspace.save()
    print(f"workspace: {workspace.url}")
    if report is not None:
        report.save()
        print(f"report: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
