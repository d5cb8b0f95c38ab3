"""Compare finished runs: a table of cells (one per experiment, seeds pooled), paired differences, plots.

    python -m opr.tools.report PATH [PATH ...] [--out DIR] [--reference METHOD ...] [--power]

Each PATH is a run directory, a multirun/sweep directory (searched recursively for ``results.json``) or a
``results.json`` file. Writes into DIR (default ``report``):

- ``report.md`` (also printed) and ``report.csv``: per cell the number of seeds and OP / BWT / FWT as mean ±
  sample standard deviation over seeds (ddof=1; a single value shows ``± n/a``: the spread is undefined; a
  metric that only k of the cell's n runs have, e.g. FWT null, says ``(n=k)``), and ``eval SE (OP)``
  (below; in the Markdown only when some run has prediction files). The CSV has every metric found in the
  runs' ``metrics`` as ``{name}_mean``/``{name}_std``/``{name}_n`` (the count per metric; ``_std`` empty for n=1).
- ``paired.csv`` and the Markdown section "Paired differences": for every cell and every reference method
  (``--reference``, repeatable; default ``vanilla_replay`` and ``seq_sft``) the mean paired difference
  cell − reference over the seeds both have, with a 95% confidence interval by paired t (below); with
  ``--power`` also its sign-flip permutation p-value (:func:`sign_flip_p`) and the smallest difference the design
  detects with 80% power (:func:`detectable_difference`), in the Markdown and as ``{m}_perm_p`` /
  ``{m}_detectable80`` in ``paired.csv``.
- The section "Drift, artifacts and in-stage learning" (and the same columns in both CSVs): one number per
  run for what a method does beside OP / BWT (``MEASURES``, defined in ``MEASURE_NOTES``): learning accuracy,
  the in-stage mean of each stage's own task, MaxDrop, general drift, parameter drift, KL to the base model
  and the base model's log-probability of the answers, format errors, and the largest rise of a shared
  opening in the general set's answers; per cell mean ± std, and paired differences to each reference.
- ``heatmap_<cell>.png``: the accuracy matrix averaged over seeds, cells annotated.
- ``tasks_<cell>.png``: each task's score across stages (one line per task).
- ``bwt_vs_budget_<backbone>_<benchmark>.png``: BWT against the replay budget per method, error bars = std.
- ``drift_<backbone>_<benchmark>.png``: drift numbers per stage (``stages[t]["drift"]``, and the response
  drift of ``stages[t]["diagnostics"]``: KL to the base model, its log-prob of the answers) when runs logged them.
- ``paired_<reference>.png``: per cell the mean paired difference in BWT to the reference, 95% CI as bars.
- ``inside_stage_<backbone>_<benchmark>.png`` and the section "Learning inside each stage" (runs with
  ``eval.every_steps``): per stage, the stage's own task's score against the step inside the stage, per cell.

Cells. A cell is one experiment: runs belong to the same cell when their resolved configs (``results.json``'s
``config``; a run without results counts by its ``.hydra/config.yaml``, see ``match_composed_cell``) agree on
every flattened key (``engine.lr``, ``benchmark.train_size``, ``method.selection`` ...) except the seed and
the keys in ``NON_EXPERIMENT_KEYS``, which say where and how a run was stored or logged, not what was run:
``seed``, ``run_dir``, ``experiment_name``, ``resume``, ``checkpoint.*``, ``stage_cache.*``, ``logger.*``, ``hydra.*``,
``_wandb.*``, and the locations of inputs ``benchmark.root`` and ``backbone.cache_dir``. The budget counts
through ``opr.config.run_budget``: methods that ignore it (``seq_sft``, ``sdft``, and ``grpo`` /
``self_distill`` without ``replay_budget``) have budget ``-`` whatever ``budget`` says. Integral floats count
as integers (``epochs=1`` = ``epochs=1.0``); a key that only some runs have (an option added by newer code)
does split cells. The table shows method, budget, backbone and benchmark, plus one column per other key that
differs between cells (a key of a config group such as ``method.top_p`` only where it differs between cells of
the same ``method.name``; ``-`` where a cell lacks the key); cell labels and file names carry those keys'
values too. Only one run per cell and seed counts: of several, the newest ``results.json`` wins and the others
are listed as superseded.

Paired differences. For a cell and a reference method, the reference cell is the cell of that method that
matches the cell on every key except ``method.*`` (and, for a budget-free reference such as ``seq_sft``,
except the budget); the cell itself is left out. Runs pair by seed (seeds in both cells only); with
differences d_1..d_n the row gives mean(d) and mean(d) ± t_{0.975, n−1} · sd(d) / √n (sd with ddof=1); n < 2
gives no interval ("n/a"). The t quantile is exact for the integer degrees of freedom used here: Student's
t CDF as its finite trigonometric series (odd and even degrees of freedom; Abramowitz & Stegun 26.7.3-4),
inverted by bisection; no SciPy needed. There is no bootstrap interval: with the 3-5 seeds of a sweep, a
resampling interval of n paired values is narrower than the t interval and undercovers.

Evaluation standard error. From ``predictions/stage{T}/{task}.jsonl`` of the final stage T (one line per
evaluated example, ``score`` 0-100): SE_j = sample std of task j's scores / √n_j, and OP's evaluation SE =
√(Σ_j SE_j²) / T. ``eval SE (OP)`` is its mean over the cell's runs that have the files (with "k of n runs"
when not all do), to hold against the seed spread of OP; a run without readable prediction files adds
nothing (W&B-only runs have none).

Only runs with ``status == "complete"`` and finite metrics enter the table. Runs that are partial (``running``,
``diverged``, ``failed``, ``interrupted``: with their error), complete but with a NaN / inf metric or matrix
value (``non-finite``: a diverged run),
whose ``results.json`` is missing (a run directory with ``.hydra/`` or ``train.log`` but no results) or
unreadable, and seeds that other cells of the same backbone/benchmark have but a cell lacks, are listed under
"Missing / partial runs"; none of them stops the report, and the report's first lines say how many runs,
by status, the statistics leave out.

The package, by job: ``load`` (finding runs: ``results.json``, run directories, W&B offline runs through
``wandb_offline``), ``runs`` (what one run gives: seed, metrics, measures, eval SE), ``cells`` (grouping runs into
cells and pairing cells with references), ``stats`` (mean and std, Student's t, paired t, power, sign flips),
``tables`` (Markdown and CSV), ``plots`` (PNG figures), ``build`` (``build_report``) and ``cli`` (``main``, run
by ``python -m opr.tools.report`` and ``opr-report``). Every public name of these modules is importable from the package itself
(``from opr.tools.report import collect``).
"""

from __future__ import annotations

from opr.results import RunResults
from opr.tools.report.build import (
    DEFAULT_REFERENCES,
    build_report,
)
from opr.tools.report.cells import (
    ABSENT,
    CELL_FIELD_KEYS,
    NO_BUDGET,
    NON_EXPERIMENT_KEYS,
    NONFINITE,
    Cell,
    CellSummary,
    Collected,
    PairedComparison,
    _canonical_number,
    _dataclass_defaults,
    _group_name,
    _name,
    _same_value,
    _target_defaults,
    _under,
    _value_sort_key,
    cell_of,
    collect,
    distinguishing_keys,
    experiment_settings,
    flatten_config,
    match_composed_cell,
    paired_comparisons,
    reference_cells,
    series_name,
    varying_keys,
    with_code_defaults,
)
from opr.tools.report.cli import (
    main,
)
from opr.tools.report.load import (
    _OFFLINE_RUN_RE,
    PRUNE_DIRS,
    RUN_MARKERS,
    WANDB_OFFLINE_READER,
    Reader,
    _offline_attempt,
    _read_hydra_config,
    load_runs,
    read_results_json_runs,
    read_wandb_offline_runs,
)
from opr.tools.report.plots import (
    DRIFT_KEYS,
    _figure,
    _mean_matrix,
    _paired_plot_label,
    drift_keys,
    plot_bwt_vs_budget,
    plot_drift,
    plot_heatmap,
    plot_inside_stage,
    plot_paired,
    plot_task_curves,
    stage_drift,
)
from opr.tools.report.runs import (
    EVAL_SE,
    MEASURE_NOTES,
    MEASURES,
    TABLE_METRICS,
    _is_number,
    _matrix_problem,
    _nonfinite_problem,
    general_opening_rise,
    inside_mean,
    last_stage_measures,
    op_eval_standard_error,
    own_task_curve,
    read_prediction_scores,
    record_of,
    run_eval_standard_error,
    run_measures,
    run_metrics,
    seed_of,
)
from opr.tools.report.stats import (
    ALPHA,
    CONFIDENCE,
    EXACT_SIGN_FLIPS,
    POWER,
    SAMPLED_SIGN_FLIPS,
    PairedDifference,
    detectable_difference,
    mean_std,
    paired_difference,
    sign_flip_p,
    student_t_cdf,
    t_quantile,
)
from opr.tools.report.tables import (
    PAIRED_NOTE,
    POWER_NOTE,
    _end_text,
    _fmt,
    _fmt_eval_se,
    _fmt_optional,
    _md_row,
    _mean_of,
    _paired_row_label,
    _stages_with_curves,
    _write_rows,
    csv_rows,
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
from opr.tools.report.wandb_offline import (
    WandbReadError,
    _number,
    read_offline_run,
    results_from_records,
    wandb_records,
)

__all__ = [
    "ABSENT",
    "ALPHA",
    "CELL_FIELD_KEYS",
    "CONFIDENCE",
    "Cell",
    "CellSummary",
    "Collected",
    "DEFAULT_REFERENCES",
    "DRIFT_KEYS",
    "EVAL_SE",
    "EXACT_SIGN_FLIPS",
    "MEASURES",
    "MEASURE_NOTES",
    "NONFINITE",
    "NON_EXPERIMENT_KEYS",
    "NO_BUDGET",
    "PAIRED_NOTE",
    "POWER",
    "POWER_NOTE",
    "PRUNE_DIRS",
    "PairedComparison",
    "PairedDifference",
    "RUN_MARKERS",
    "Reader",
    "RunResults",
    "SAMPLED_SIGN_FLIPS",
    "TABLE_METRICS",
    "WANDB_OFFLINE_READER",
    "WandbReadError",
    "_OFFLINE_RUN_RE",
    "_canonical_number",
    "_dataclass_defaults",
    "_end_text",
    "_figure",
    "_fmt",
    "_fmt_eval_se",
    "_fmt_optional",
    "_group_name",
    "_is_number",
    "_matrix_problem",
    "_md_row",
    "_mean_matrix",
    "_mean_of",
    "_name",
    "_nonfinite_problem",
    "_number",
    "_offline_attempt",
    "_paired_plot_label",
    "_paired_row_label",
    "_read_hydra_config",
    "_same_value",
    "_stages_with_curves",
    "_target_defaults",
    "_under",
    "_value_sort_key",
    "_write_rows",
    "build_report",
    "cell_of",
    "collect",
    "csv_rows",
    "detectable_difference",
    "distinguishing_keys",
    "drift_keys",
    "experiment_settings",
    "flatten_config",
    "general_opening_rise",
    "inside_mean",
    "inside_stage_paired_rows",
    "inside_stage_paired_section",
    "inside_stage_rows",
    "inside_stage_section",
    "last_stage_measures",
    "load_runs",
    "main",
    "markdown_table",
    "match_composed_cell",
    "mean_std",
    "measures_section",
    "missing_section",
    "op_eval_standard_error",
    "own_task_curve",
    "paired_comparisons",
    "paired_csv_rows",
    "paired_difference",
    "paired_section",
    "plot_bwt_vs_budget",
    "plot_drift",
    "plot_heatmap",
    "plot_inside_stage",
    "plot_paired",
    "plot_task_curves",
    "read_offline_run",
    "read_prediction_scores",
    "read_results_json_runs",
    "read_wandb_offline_runs",
    "record_of",
    "reference_cells",
    "replay_rows",
    "replay_section",
    "results_from_records",
    "run_eval_standard_error",
    "run_measures",
    "run_metrics",
    "seed_of",
    "series_name",
    "sign_flip_p",
    "stage_drift",
    "student_t_cdf",
    "t_quantile",
    "varying_keys",
    "wandb_records",
    "with_code_defaults",
    "write_csv",
]
