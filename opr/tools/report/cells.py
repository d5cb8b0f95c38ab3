"""Cells: which runs are the same experiment (one table row, seeds pooled), their summaries, and the pairing of
a cell with the matching cell of a reference method (the module docstring of ``opr.tools.report`` gives the
rules)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from opr.config import run_budget
from opr.results import UNFINISHED, Status, plain_status
from opr.tools.report.runs import (
    EVAL_SE,
    TABLE_METRICS,
    _is_number,
    _matrix_problem,
    _nonfinite_problem,
    record_of,
    run_eval_standard_error,
    run_metrics,
    seed_of,
)
from opr.tools.report.stats import PairedDifference, mean_std, paired_difference

NO_BUDGET = "-"


# Flattened config keys (and the subtrees below them) that never define an experiment: where a run is written
# and how it is logged, checkpointed and resumed, and where its inputs lie on disk. See the module docstring.
NON_EXPERIMENT_KEYS: tuple[str, ...] = (
    "seed",
    "run_dir",
    "experiment_name",
    "resume",
    "checkpoint",
    "stage_cache",
    "logger",
    "hydra",
    "_wandb",
    "benchmark.root",
    "backbone.cache_dir",
)


# Keys the Cell holds in its own fields (the budget through run_budget, which knows budget-free methods).
CELL_FIELD_KEYS: tuple[str, ...] = ("method.name", "backbone.name", "benchmark.name", "budget")


ABSENT = "-"  # how a cell that lacks a config key shows it


NONFINITE = "non-finite"  # the listed status of a complete run with a NaN / inf metric (left out of the statistics)


def flatten_config(node: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``{"dotted.key": value}``; lists and empty dicts stay values of their own key."""
    flat: dict[str, object] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def _under(key: str, prefixes: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``prefixes`` or lies below one of them (``logger.mode`` under ``logger``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _canonical_number(value: object) -> object:
    """``value`` with integral floats turned into ints, inside lists and dicts too (``1.0`` and ``1`` agree)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_canonical_number(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical_number(v) for k, v in value.items()}
    return value


def experiment_settings(config: dict) -> tuple[tuple[str, str], ...]:
    """The config keys that define the experiment beyond the Cell's own fields, as sorted
    ``(dotted key, canonical JSON value)`` pairs: every flattened key except ``NON_EXPERIMENT_KEYS`` and
    ``CELL_FIELD_KEYS`` (a group given as a plain string, ``backbone: tiny``, is a Cell field too)."""
    flat = flatten_config(config)
    pairs = []
    for key, value in flat.items():
        if _under(key, NON_EXPERIMENT_KEYS) or _under(key, CELL_FIELD_KEYS):
            continue
        if key in ("method", "backbone", "benchmark") and isinstance(value, str):
            continue
        pairs.append((key, json.dumps(_canonical_number(value), sort_keys=True, default=str)))
    return tuple(sorted(pairs))


def _value_sort_key(text: str) -> tuple:
    """Order JSON values numerically where they are numbers (``0.0001`` before ``0.001``), else as text."""
    try:
        value = json.loads(text)
    except ValueError:
        return (2, text)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), text)
    return (1, text)


@dataclass(frozen=True, order=True)
class Cell:
    """One row of the table: one experiment, its seeds pooled. ``budget`` is ``None`` for methods that ignore
    it; ``settings`` are the other experiment-defining config keys (:func:`experiment_settings`)."""

    backbone: str
    benchmark: str
    method: str
    budget: float | None
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def budget_label(self) -> str:
        return NO_BUDGET if self.budget is None else f"{self.budget:g}"

    @property
    def label(self) -> str:
        """Method, budget, backbone and benchmark; :meth:`label_with` adds settings."""
        return f"{self.method} budget={self.budget_label} {self.backbone} {self.benchmark}"

    @property
    def slug(self) -> str:
        """``label`` as a file-name part; :meth:`slug_with` adds settings."""
        raw = f"{self.method}_b{self.budget_label}_{self.backbone}_{self.benchmark}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw.replace(NO_BUDGET, "none"))

    def setting(self, key: str) -> str:
        """The value of config key ``key`` as shown in tables: JSON text, strings without quotes, ``-`` when
        the cell's config lacks the key."""
        text = dict(self.settings).get(key)
        if text is None:
            return ABSENT
        value = json.loads(text)
        return value if isinstance(value, str) else text

    def settings_text(self, keys: Sequence[str], sep: str = " ") -> str:
        """``key=value`` for each of ``keys``, joined by ``sep``."""
        return sep.join(f"{k}={self.setting(k)}" for k in keys)

    def label_with(self, keys: Sequence[str]) -> str:
        """``label`` followed by ``key=value`` for ``keys`` (those that tell this cell from others)."""
        return f"{self.label} {self.settings_text(keys)}" if keys else self.label

    def slug_with(self, keys: Sequence[str]) -> str:
        """``slug`` followed by the values of ``keys``; longer than 150 characters, it is cut and ends in a hash
        of the settings so that file names stay short and distinct."""
        if not keys:
            return self.slug
        raw = f"{self.slug}_{self.settings_text(keys, sep='_')}"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
        if len(slug) > 150:
            import hashlib

            digest = hashlib.sha1(json.dumps(self.settings).encode()).hexdigest()[:10]
            slug = f"{slug[:139]}_{digest}"
        return slug

    def sort_key(self) -> tuple:
        settings = tuple((k, _value_sort_key(v)) for k, v in self.settings)
        return (self.backbone, self.benchmark, self.method, -1.0 if self.budget is None else self.budget, settings)

    def comparison_key(self, ignore_budget: bool) -> tuple:
        """What a reference cell must share with this one: everything but the method and its ``method.*``
        options, and but the budget when ``ignore_budget`` (a budget-free reference)."""
        settings = tuple((k, v) for k, v in self.settings if not _under(k, ("method",)))
        return (self.backbone, self.benchmark, None if ignore_budget else self.budget, settings)


def _group_name(cell: Cell, values: dict[str, str], key: str) -> str | None:
    """The config-group name that ``key`` is compared within (:func:`varying_keys`): ``method.name`` for a
    ``method.*`` option, ``engine.name`` for an ``engine.*`` one ...; ``None`` (compare across all cells) for
    a top-level key or a group's ``name`` itself. ``values``: the cell's settings as a dict."""
    group, dot, rest = key.partition(".")
    if not dot or rest == "name":
        return None
    if group in ("method", "backbone", "benchmark"):
        return getattr(cell, group)
    return values.get(f"{group}.name", ABSENT)


def varying_keys(cells: Iterable[Cell]) -> tuple[str, ...]:
    """The settings keys whose values differ between ``cells`` (sorted): a key of a named config group only
    where it differs between cells of the same group name (opr's ``method.top_p`` is no column just because
    vanilla_replay has none). Together with method, budget, backbone and benchmark these tell every two of
    the cells apart."""
    cells_values = [(c, dict(c.settings)) for c in cells]
    keys = sorted({k for _, values in cells_values for k in values})
    varying = []
    for key in keys:
        seen: dict[str | None, set[str]] = {}  # group name -> values of key
        for cell, values in cells_values:
            seen.setdefault(_group_name(cell, values, key), set()).add(values.get(key, ABSENT))
        if any(len(v) > 1 for v in seen.values()):
            varying.append(key)
    return tuple(varying)


def distinguishing_keys(cell: Cell, cells: Iterable[Cell]) -> tuple[str, ...]:
    """The :func:`varying_keys` that vary within ``cell``'s own group (a ``method.*`` key among the cells of
    its method, a top-level key among all cells): what its label must add to tell it from the others. The
    two OPR selections show ``method.selection`` and its sampling keys; vanilla replay shows none of them."""
    cells = list(cells)
    varying = varying_keys(cells)
    seen: dict[tuple[str, str | None], set[str]] = {}
    for c in cells:
        values = dict(c.settings)
        for key in varying:
            seen.setdefault((key, _group_name(c, values, key)), set()).add(values.get(key, ABSENT))
    mine = dict(cell.settings)
    return tuple(k for k in varying if len(seen.get((k, _group_name(cell, mine, k)), ())) > 1)


def _same_value(composed: str, resolved: str) -> bool:
    """Whether a value of a composed Hydra config (canonical JSON) agrees with a resolved config's: equal, an
    unresolved interpolation (``${...}``), or the same number written as a string (``"1e-4"``)."""
    if composed == resolved or "${" in composed:
        return True
    try:
        a, b = json.loads(composed), json.loads(resolved)
        return isinstance(b, (int, float)) and not isinstance(b, bool) and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def match_composed_cell(composed: Cell, resolved: Iterable[Cell]) -> Cell:
    """The cell of a run known only by its ``.hydra/config.yaml``: the one resolved cell (from results.json)
    with the same method, budget, backbone and benchmark whose settings include every setting of the composed
    config (validation adds the defaults a config file leaves out; interpolations stay unresolved there);
    ``composed`` itself when no cell or several cells fit."""
    fits = []
    for cell in resolved:
        if (cell.backbone, cell.benchmark, cell.method, cell.budget) != (
            composed.backbone, composed.benchmark, composed.method, composed.budget
        ):
            continue
        values = dict(cell.settings)
        if all(k in values and _same_value(v, values[k]) for k, v in composed.settings):
            fits.append(cell)
    return fits[0] if len(fits) == 1 else composed


def _name(cfg: dict, group: str) -> str:
    node = cfg.get(group)
    if isinstance(node, dict) and node.get("name") is not None:
        return str(node["name"])
    if isinstance(node, str):
        return node
    return "?"


def _dataclass_defaults(schema) -> dict:
    """``{field: default}`` of a dataclass, nested dataclasses as dicts; fields without a default are left out."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def with_code_defaults(config: dict) -> dict:
    """``config`` with the options it lacks filled in from today's code defaults (the top level's
    :class:`opr.config.RunConfig`, each group node's ``_target_`` schema). Options are added with the default
    that keeps the earlier behaviour, so a run recorded before an option existed (``engine.device``) is the
    same experiment as a later run that has it at its default, and the two share a cell. Unknown targets are
    left as they are."""
    from opr.config import MISSING

    def fill(node: dict, defaults: dict) -> dict:
        out = dict(node)
        for key, value in defaults.items():
            if value is MISSING or value == "???":
                continue
            if key not in out:
                out[key] = value
            elif isinstance(out[key], dict) and isinstance(value, dict):
                out[key] = fill(out[key], value)
        return out

    filled = fill(config, _target_defaults(None))
    for group, node in filled.items():
        if isinstance(node, dict) and isinstance(node.get("_target_"), str):
            defaults = _target_defaults(node["_target_"])
            if defaults is not None:
                filled[group] = fill(node, defaults)
    return filled


@functools.cache
def _target_defaults(target: str | None) -> dict | None:
    """The code defaults of a group's ``_target_`` (None: the top level's RunConfig), once per target for the
    whole report; None for a target that cannot be loaded."""
    from opr.config import RunConfig, schema_for

    if target is None:
        return _dataclass_defaults(RunConfig)
    try:
        return _dataclass_defaults(schema_for(target))
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def cell_of(config: dict) -> Cell:
    """The table cell of a run config: ``method.name``, the budget (``run_budget``), ``backbone.name``,
    ``benchmark.name`` and every other experiment-defining key (:func:`experiment_settings`).

    Raises ``ValueError`` when the method name is missing or a budgeted method has no numeric ``budget.ratio``.
    """
    method = _name(config, "method")
    if method == "?":
        raise ValueError("config has no method.name")
    budget = run_budget(config)
    return Cell(_name(config, "backbone"), _name(config, "benchmark"), method, budget,
                experiment_settings(with_code_defaults(config)))


@dataclass
class CellSummary:
    """The complete runs of one cell (one per seed) and their metrics' mean, sample std and count (``stats``;
    ``EVAL_SE`` there is OP's evaluation standard error over the runs with prediction files).
    ``shown_keys``: the settings keys that tell the report's cells apart, added to label and slug."""

    cell: Cell
    runs: list[dict]
    stats: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    shown_keys: tuple[str, ...] = ()

    @property
    def seeds(self) -> list[int | None]:
        return [seed_of(r) for r in self.runs]

    @property
    def label(self) -> str:
        return self.cell.label_with(self.shown_keys)

    @property
    def slug(self) -> str:
        return self.cell.slug_with(self.shown_keys)

    def runs_by_seed(self) -> dict[int, dict]:
        """The cell's runs that have a seed, by seed."""
        return {seed: run for seed, run in zip(self.seeds, self.runs) if seed is not None}


def series_name(summary: CellSummary) -> str:
    """The line a cell belongs to in the BWT-vs-budget and drift plots: its method, plus ``key=value`` for the
    settings that tell the report's cells apart."""
    extra = summary.cell.settings_text(summary.shown_keys)
    return f"{summary.cell.method} {extra}" if extra else summary.cell.method


@dataclass
class Collected:
    """Everything the report shows: cell summaries and the runs that did not make it, with reasons."""

    summaries: list[CellSummary]
    problems: list[dict]  # {"source", "cell" (label), "seed", "status", "detail"}
    missing_seeds: list[tuple[Cell, list[int]]]
    # the settings keys that tell apart every cell seen, complete or not: the labels in "Missing / partial runs"
    label_keys: tuple[str, ...] = ()

    def label(self, cell: Cell) -> str:
        """A cell's label in the "Missing / partial runs" list."""
        return cell.label_with(self.label_keys)


def collect(runs: list[dict]) -> Collected:
    """Group complete runs by cell (newest per seed), compute the statistics (and OP's evaluation standard error
    from the runs' prediction files, as ``stats[EVAL_SE]``) and list what is missing."""
    problems: list[dict] = []
    by_cell: dict[Cell, dict] = {}
    known: list[tuple[Cell, int | None]] = []  # every run whose cell is known, complete or not
    resolved: set[Cell] = set()  # the cells of runs with a resolved config, for runs known by .hydra/ only
    for run in runs:
        config = record_of(run).config
        if isinstance(config, dict) and not run.get("_composed_config"):
            try:
                resolved.add(cell_of(config))
            except ValueError:
                pass
    for run in runs:
        record = record_of(run)
        src = run.get("_source", "?")
        cfg = record.config
        cell: Cell | None = None
        detail = record.error
        if isinstance(cfg, dict):
            try:
                cell = cell_of(cfg)
            except ValueError as err:
                detail = str(err)
            if cell is not None and run.get("_composed_config"):
                cell = match_composed_cell(cell, resolved)
        # as written: one of the Status strings, or the report's own "missing" / "unreadable"
        status = plain_status(record.status) if record.status is not None else "?"
        if cell is not None:
            known.append((cell, seed_of(run)))
        bad = None
        if status != Status.COMPLETE:
            bad = detail or f"status {status!r}"
            if status in UNFINISHED and isinstance(record.matrix, list) and record.tasks:
                bad = f"{len(record.matrix) - 1} of {len(record.tasks)} stages evaluated" + (
                    f"; {record.error}" if record.error else ""
                )
        elif cell is None:
            bad = detail or "config missing"
        else:
            bad = _matrix_problem(run)
            nonfinite = _nonfinite_problem(run) if bad is None else None
            if nonfinite is not None:  # a diverged run that finished: listed as such, not averaged
                status, bad = NONFINITE, f"{nonfinite}; left out of the statistics"
        if bad is not None:
            problems.append(
                {
                    "source": src,
                    "cell": "?",  # labelled below, once every cell is known
                    "seed": seed_of(run),
                    "status": status,
                    "detail": bad,
                    "_cell": cell,
                }
            )
            continue
        assert cell is not None
        seeds = by_cell.setdefault(cell, {})
        seed = seed_of(run)
        key = seed if seed is not None else f"_{len(seeds)}"  # runs without a seed are never merged
        old = seeds.get(key)
        if old is not None:
            newer, older = (run, old) if run.get("_mtime", 0) >= old.get("_mtime", 0) else (old, run)
            seeds[key] = newer
            problems.append(
                {
                    "source": older.get("_source", "?"),
                    "cell": "?",  # labelled below
                    "seed": seed,
                    "status": "superseded",
                    "detail": f"same seed as {newer.get('_source', '?')}",
                    "_cell": cell,
                }
            )
        else:
            seeds[key] = run

    summaries = []
    for cell in sorted(by_cell, key=Cell.sort_key):
        cell_runs = sorted(by_cell[cell].values(), key=lambda r: (seed_of(r) is None, seed_of(r) or 0))
        summary = CellSummary(cell, cell_runs, shown_keys=distinguishing_keys(cell, by_cell))
        names: list[str] = []
        metrics_per_run = [run_metrics(r) for r in cell_runs]
        for m in metrics_per_run:
            names.extend(k for k in m if k not in names)
        for name in names:
            vals = [m[name] for m in metrics_per_run if _is_number(m.get(name))]
            if vals:
                summary.stats[name] = mean_std([float(v) for v in vals])
        eval_ses = [se for se in map(run_eval_standard_error, cell_runs) if se is not None]
        if eval_ses:
            summary.stats[EVAL_SE] = mean_std(eval_ses)
        summaries.append(summary)

    # seeds that other cells of the same backbone/benchmark have (from any run, finished or not)
    expected: dict[tuple[str, str], set[int]] = {}
    for cell, seed in known:
        if seed is not None:
            expected.setdefault((cell.backbone, cell.benchmark), set()).add(seed)
    done = {s.cell: {seed_of(r) for r in s.runs} for s in summaries}
    label_keys = varying_keys({c for c, _ in known})
    for p in problems:  # an abandoned attempt whose cell and seed finished elsewhere is no hole in the sweep
        cell = p.pop("_cell", None)
        if cell is None:
            continue
        p["cell"] = cell.label_with(label_keys)
        if p["status"] != "superseded" and p["seed"] is not None and p["seed"] in done.get(cell, set()):
            p["detail"] += "; a complete run of this cell and seed exists"
    missing_seeds = []
    for cell in sorted({c for c, _ in known}, key=Cell.sort_key):
        lack = sorted(expected.get((cell.backbone, cell.benchmark), set()) - done.get(cell, set()))
        if lack:
            missing_seeds.append((cell, lack))
    return Collected(summaries, problems, missing_seeds, label_keys)


@dataclass
class PairedComparison:
    """One cell against the matching cell of a reference method: the seeds both have and, per metric, the
    paired difference over the seeds where both runs have that metric."""

    reference: str  # the reference method
    summary: CellSummary
    reference_summary: CellSummary
    seeds: list[int]
    diffs: dict[str, PairedDifference]

    @property
    def label(self) -> str:
        return self.summary.label


def reference_cells(cell: Cell, reference: str, cells: Iterable[Cell]) -> list[Cell]:
    """The cells of method ``reference`` that match ``cell`` on every key except the method and its ``method.*``
    options, and except the budget when the reference method ignores it (its cells' budget is ``None``);
    never ``cell`` itself."""
    matches = []
    for other in cells:
        if other.method != reference or other == cell:
            continue
        ignore_budget = other.budget is None
        if other.comparison_key(ignore_budget) == cell.comparison_key(ignore_budget):
            matches.append(other)
    return sorted(matches, key=Cell.sort_key)


def paired_comparisons(
    summaries: Sequence[CellSummary], reference: str, metrics: Sequence[str] = TABLE_METRICS
) -> list[PairedComparison]:
    """Every cell of ``summaries`` that has a matching cell of method ``reference`` (:func:`reference_cells`),
    paired with it by seed (seeds in both only) for each of ``metrics``; in the order of ``summaries``."""
    by_cell = {s.cell: s for s in summaries}
    comparisons = []
    for summary in summaries:
        for ref_cell in reference_cells(summary.cell, reference, by_cell):
            ref = by_cell[ref_cell]
            mine, theirs = summary.runs_by_seed(), ref.runs_by_seed()
            seeds = sorted(set(mine) & set(theirs))
            mine_metrics = {s: run_metrics(mine[s]) for s in seeds}
            their_metrics = {s: run_metrics(theirs[s]) for s in seeds}
            diffs = {}
            for metric in metrics:
                pairs = [(mine_metrics[s].get(metric), their_metrics[s].get(metric)) for s in seeds]
                pairs = [(a, b) for a, b in pairs if _is_number(a) and _is_number(b)]
                diffs[metric] = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
            comparisons.append(PairedComparison(reference, summary, ref, seeds, diffs))
    return comparisons
