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
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from opr.config import run_budget
from opr.metrics.continual import continual_metrics, learning_accuracy
from opr.metrics.ngrams import amplified_ngrams
from opr.results import UNFINISHED, RunResults, Status, plain_status

TABLE_METRICS: tuple[str, ...] = ("OP", "BWT", "FWT")
RUN_MARKERS: tuple[str, ...] = (".hydra", "train.log")
# A run's sub-folders that hold no run of their own: train_state/s*/ keeps a copy of results.json as it was
# when the state was taken, which must not count as a (partial) run.
PRUNE_DIRS: frozenset[str] = frozenset(
    {"checkpoints", "predictions", "replay", "train_state", "wandb", ".hydra", "__pycache__", ".git"}
)
DRIFT_KEYS: tuple[str, ...] = (
    "param/rel_fro/all",
    "response/kl_base",
    "response/base_logprob",
    "spectral/inside_fraction/all",
    "spectral/angle_left_deg/all",
    "spectral/angle_right_deg/all",
    "spectral/sv_rel_change/all",
    "response/next_token_kl",
)
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
EVAL_SE = "eval_SE_OP"  # the stats / CSV name of OP's evaluation standard error
CONFIDENCE = 0.95
DEFAULT_REFERENCES: tuple[str, ...] = ("vanilla_replay", "seq_sft")
# One number per run for what a method does beside its scores (the contrast of "Denser != Better": how far it
# specialises, how it forgets, how far it drifts, which artifacts it spreads), paired by seed like OP and BWT
# (:func:`run_measures`). Shown when some run has them.
MEASURES: tuple[str, ...] = ("LA", "inside_mean", "MaxDrop", "general_drift", "param_drift", "kl_base",
                             "base_logprob", "format_errors", "general_opening")
MEASURE_NOTES: dict[str, str] = {
    "LA": "learning accuracy: mean score of each task right after its own stage",
    "inside_mean": "mean score of each stage's own task at its in-stage evaluations after step 0 (stage end "
                   "included), averaged over stages: higher = learnt sooner or further (`eval.every_steps`)",
    "MaxDrop": "mean deepest fall of a task after its own stage",
    "general_drift": "general-set score after the last stage minus before training",
    "param_drift": "relative Frobenius distance of all weights to the base model after the last stage, in %",
    "kl_base": "KL(model || base) per token on the model's greedy answers to the probe prompts, last stage (nats)",
    "base_logprob": "the base model's log-probability per token of those answers, last stage (nats)",
    "format_errors": "answers that break their task's format after the last stage, mean over tasks, in %",
    "general_opening": "largest rise (points) in the share of general-set answers that open with the same three "
                       "words, before training -> last stage",
}


# ------------------------------------------------------------------------------------------ loading
def _read_hydra_config(run_dir: Path) -> dict | None:
    """The run's composed config from ``.hydra/config.yaml`` when it exists and parses, else ``None``."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # a half-written or templated file: the run is still listed, just without its cell
        return None
    return cfg if isinstance(cfg, dict) else None


def read_results_json_runs(root: Path) -> list[dict]:
    """Runs under ``root`` (a ``results.json`` file or a directory searched recursively).

    Every ``results.json`` gives its parsed dict plus ``_source`` (the run directory) and ``_mtime``; one that
    cannot be read, or is no run record (:meth:`opr.results.RunResults.from_json` refuses its structure), gives
    ``{"_source", "status": "unreadable", "error"}``. A run directory (holding ``.hydra/`` or
    ``train.log``) without ``results.json`` gives ``{"_source", "status": "missing", "error", "config"?,
    "_composed_config"?}`` with the config from ``.hydra/config.yaml`` when available (``_composed_config``:
    the config is Hydra's composition, without the defaults that validation adds; see :func:`match_composed_cell`).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"report input {str(root)!r} does not exist")
    files: list[Path] = []
    marked: list[Path] = []  # run directories by their markers
    if root.is_file():
        files.append(root)
    else:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in PRUNE_DIRS)  # a run's bulky sub-folders
            here = Path(dirpath)
            if "results.json" in filenames:
                files.append(here / "results.json")
            elif any((here / m).exists() for m in RUN_MARKERS):
                marked.append(here)
    runs: list[dict] = []
    for f in files:
        src = str(f.parent)
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"top level is {type(data).__name__}, not an object")
            RunResults.from_json(data)  # a run record: every later read of its fields goes through one
        except (OSError, ValueError) as err:
            runs.append({"_source": src, "status": "unreadable", "error": f"{f.name}: {err}"})
            continue
        data["_source"] = src
        data["_mtime"] = f.stat().st_mtime
        runs.append(data)
    have = [f.parent for f in files]
    for d in marked:
        if any(h.is_relative_to(d) for h in have):  # a parent of finished runs, e.g. a sweep root
            continue
        entry: dict = {"_source": str(d), "status": "missing", "error": "no results.json"}
        cfg = _read_hydra_config(d)
        if cfg is not None:
            entry["config"] = cfg
            entry["_composed_config"] = True  # as Hydra composed it: not validated, interpolations unresolved
        runs.append(entry)
    return runs


_OFFLINE_RUN_RE = re.compile(r"^offline-run-(\d{8}_\d{6})-(.+)$")


def _offline_attempt(f: Path) -> tuple[tuple[Path, str], tuple[str, int, float]]:
    """(run key, attempt order) of the ``.wandb`` file ``f``.

    The run id is the file's (``run-<id>.wandb``), not the folder's: W&B names a second attempt that starts
    in the same second as the first ``offline-run-<time>-<id>-1``. Attempts sort by start time, then that
    suffix, then the file's modification time.
    """
    m = _OFFLINE_RUN_RE.match(f.parent.name)
    if m is None or not (f.name.startswith("run-") and f.suffix == ".wandb"):
        return (f.parent, f.name), ("", 0, f.stat().st_mtime)
    run_id = f.name[len("run-"):-len(".wandb")]
    rest = m.group(2)
    suffix = rest[len(run_id) + 1:] if rest.startswith(run_id + "-") else ""
    return (f.parent.parent, run_id), (m.group(1), int(suffix) if suffix.isdigit() else 0, f.stat().st_mtime)


def read_wandb_offline_runs(
    paths: str | Path | Iterable[str | Path], *, skip_runs_with_results: bool = False
) -> list[dict]:
    """Runs logged with ``logger=wandb`` in offline mode, read back from their ``.wandb`` files alone.

    Each path is a ``.wandb`` file, an ``offline-run-*`` folder, or a directory searched recursively (a
    ``wandb`` folder, a run directory, a sweep directory; ``checkpoints``/``predictions`` are not entered) for
    ``wandb/offline-run-*/run-*.wandb``. Each run gives one dict in the ``results.json`` format (``config``,
    ``tasks``, ``matrix``, ``general``, ``metrics``, ``stages``, ``status``; see
    ``opr.loggers.wandb.results_from_records``) plus ``_source`` (its offline-run folder) and ``_mtime``.
    Several offline-run folders of one run id in one ``wandb`` folder (the attempts of a requeued job) give
    one run: stage scores of later attempts replace earlier ones; status, config and final metrics are the
    newest attempt's. A file that cannot be read, or every file when the ``wandb`` package is missing, gives
    ``{"_source", "status": "unreadable", "error"}``.

    ``skip_runs_with_results``: leave out the W&B runs of a run directory (the parent of ``wandb/``) that
    holds a ``results.json`` the search passes through, so that ``load_runs`` does not count a run twice.
    """
    roots = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    found: dict[Path, Path] = {}  # resolved -> as found
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"report input {str(root)!r} does not exist")
        if root.is_file():
            if root.suffix == ".wandb":
                found.setdefault(root.resolve(), root)
            continue
        if _OFFLINE_RUN_RE.match(root.name):
            for f in sorted(root.glob("run-*.wandb")):
                found.setdefault(f.resolve(), f)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here.name == "wandb":
                for f in sorted(here.glob("offline-run-*/run-*.wandb")):
                    found.setdefault(f.resolve(), f)
                dirnames[:] = []
                continue
            skip = PRUNE_DIRS - {"wandb"}
            if skip_runs_with_results and "results.json" in filenames:
                skip = skip | {"wandb"}
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
    attempts: dict[tuple[Path, str], list[tuple[tuple[str, int, float], Path]]] = {}
    for f in found.values():
        key, order = _offline_attempt(f)
        attempts.setdefault(key, []).append((order, f))
    from opr.loggers.wandb import WandbReadError, read_offline_run

    runs: list[dict] = []
    for key in sorted(attempts, key=str):
        files = [f for _, f in sorted(attempts[key])]  # oldest first: a later attempt's values win
        try:
            runs.append(read_offline_run(files))
        except (WandbReadError, ImportError, OSError) as err:
            runs.append({"_source": str(files[-1].parent), "status": "unreadable", "error": str(err)})
    return runs


Reader = Callable[[Path], list[dict]]
# W&B offline runs are read only where no results.json covers them (read_results_json_runs has those).
WANDB_OFFLINE_READER: Reader = functools.partial(read_wandb_offline_runs, skip_runs_with_results=True)


def load_runs(
    paths: Iterable[str | Path], readers: Sequence[Reader] = (read_results_json_runs, WANDB_OFFLINE_READER)
) -> list[dict]:
    """Results dicts (the ``results.json`` format, plus ``_source``) of every run found under ``paths``.

    ``readers`` turn one path into runs; ``read_results_json_runs`` reads run folders. A reader of W&B offline
    run files (``wandb/offline-run-*``) can be added beside it, returning dicts of the same shape.
    Missing or unreadable runs come back too, with ``status`` "missing" / "unreadable" and an ``error``.
    """
    runs: list[dict] = []
    for p in paths:
        for reader in readers:
            runs.extend(reader(Path(p)))
    return runs


# ------------------------------------------------------------------------------------------ cells
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


def record_of(run: dict) -> RunResults:
    """The run record of one of the report's runs (a ``results.json`` dict plus the report's own ``_source``,
    ``_mtime``, ``_composed_config``, which land in ``extra``); a key the run lacks reads ``None``."""
    return RunResults.from_json(run)


def seed_of(run: dict) -> int | None:
    record = record_of(run)
    cfg = record.config or {}
    seed = cfg.get("seed", (record.run or {}).get("seed"))
    return int(seed) if isinstance(seed, (int, float)) else None


def _matrix_problem(run: dict) -> str | None:
    record = record_of(run)
    tasks, matrix = record.tasks, record.matrix
    if not isinstance(tasks, list) or not tasks:
        return "no task list"
    if not isinstance(matrix, list):
        return "no accuracy matrix"
    T = len(tasks)
    if len(matrix) != T + 1 or any(not isinstance(r, list) or len(r) != T for r in matrix):
        return f"accuracy matrix is not {T + 1} x {T}"
    return None


def _nonfinite_problem(run: dict) -> str | None:
    """What is not a finite number in a complete run's ``metrics`` or accuracy matrix (NaN / inf: the run
    diverged without saying so), or None. Such a run is left out of the statistics and listed."""
    record = record_of(run)
    bad = [f"{k}={v}" for k, v in (record.metrics or {}).items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        return f"non-finite metric(s) {', '.join(bad)}"
    cells = [v for row in record.matrix or [] for v in row]
    if any(isinstance(v, float) and not math.isfinite(v) for v in cells):
        return "non-finite value(s) in the accuracy matrix"
    return None


def run_metrics(run: dict) -> dict[str, float | None]:
    """The run's ``metrics``, completed from its accuracy matrix for OP/BWT/FWT... when absent."""
    record = record_of(run)
    metrics = dict(record.metrics or {})
    if any(m not in metrics for m in TABLE_METRICS) and _matrix_problem(run) is None:
        for key, value in continual_metrics(record.matrix).items():
            metrics.setdefault(key, value)
    for key, value in run_measures(run).items():
        metrics.setdefault(key, value)
    return metrics


def read_prediction_scores(path: Path) -> list[float] | None:
    """The ``score`` of every line of a predictions file (``predictions/stage{t}/{task}.jsonl``), or ``None``
    when the file is missing, unreadable, or has a line without a numeric score."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    scores = []
    for line in lines:
        if not line.strip():
            continue
        try:
            score = json.loads(line).get("score")
        except (ValueError, AttributeError):
            return None
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            return None
        scores.append(float(score))
    return scores


def op_eval_standard_error(task_scores: Sequence[Sequence[float]]) -> float | None:
    """OP's standard error from evaluating a finite set of examples, given the final stage's per-example scores
    of each of the T tasks: SE_j = sample std (ddof=1) of task j's scores / sqrt(n_j); OP's SE =
    sqrt(sum_j SE_j^2) / T (OP is the mean of the T task scores). ``None`` when a task has fewer than 2 scores."""
    if not task_scores or any(len(scores) < 2 for scores in task_scores):
        return None
    variance_sum = sum(statistics.variance(scores) / len(scores) for scores in task_scores)
    return math.sqrt(variance_sum) / len(task_scores)


def run_eval_standard_error(run: dict) -> float | None:
    """:func:`op_eval_standard_error` of a run from ``<_source>/predictions/stage{T}/{task}.jsonl`` (T = number
    of tasks); ``None`` when a task's file is missing or unreadable."""
    tasks, source = record_of(run).tasks, run.get("_source")
    if not isinstance(tasks, list) or not tasks or not source:
        return None
    folder = Path(source) / "predictions" / f"stage{len(tasks)}"
    per_task = []
    for task in tasks:
        scores = read_prediction_scores(folder / f"{task}.jsonl")
        if scores is None:
            return None
        per_task.append(scores)
    return op_eval_standard_error(per_task)


def inside_mean(record: RunResults) -> float | None:
    """:data:`MEASURE_NOTES` ``inside_mean``: per stage with an own-task curve (:func:`own_task_curve`), the mean
    score over its points after step 0; then the mean over those stages. ``None`` without curves."""
    per_stage = []
    for entry in record.stages or []:
        if entry.stage:
            later = [score for step, score in own_task_curve(record, entry.stage) if step > 0]
            if later:
                per_stage.append(statistics.fmean(later))
    return statistics.fmean(per_stage) if per_stage else None


def last_stage_measures(record: RunResults) -> dict[str, float]:
    """``param_drift``, ``kl_base``, ``base_logprob`` and ``format_errors`` (:data:`MEASURE_NOTES`) from the last
    stage's record, each only when the run recorded it (``analysis.drift``, ``analysis.diagnostics``)."""
    last = max((e for e in record.stages or [] if e.stage), key=lambda e: e.stage, default=None)
    if last is None:
        return {}
    out: dict[str, float] = {}
    if _is_number((last.drift or {}).get("param/rel_fro/all")):
        out["param_drift"] = 100.0 * last.drift["param/rel_fro/all"]
    diagnostics = last.diagnostics or {}
    for key in ("kl_base", "base_logprob"):
        value = (diagnostics.get(key) or {}).get("mean")
        if _is_number(value):
            out[key] = float(value)
    rates = [v for v in (last.format_error_rate or {}).values() if _is_number(v)]
    if rates:
        out["format_errors"] = 100.0 * statistics.fmean(rates)
    return out


def general_opening_rise(run_dir: Path, stage: int, n: int = 3) -> float | None:
    """:data:`MEASURE_NOTES` ``general_opening``, from ``predictions/stage{0,stage}/general.jsonl`` (the answers
    to the same prompts, matched by id); 0 when no opening rose, ``None`` without both files."""
    from opr.tools.ngrams import read_answers

    folder = Path(run_dir) / "predictions"
    try:
        before = read_answers(folder / "stage0" / "general.jsonl")
        after = read_answers(folder / f"stage{stage}" / "general.jsonl")
    except (OSError, ValueError):
        return None
    ids = [i for i in after if i in before]
    if not ids:
        return None
    top = amplified_ngrams([before[i] for i in ids], [after[i] for i in ids], n=n, top=1, opening=True,
                           min_after=0.0)
    return 100.0 * top[0].rise if top else 0.0


def run_measures(run: dict) -> dict[str, float]:
    """The run's :data:`MEASURES` that it has data for (MaxDrop and general_drift come with its metrics)."""
    record = record_of(run)
    out: dict[str, float] = {}
    if _matrix_problem(run) is None and record.matrix:
        out["LA"] = learning_accuracy(record.matrix)
    value = inside_mean(record)
    if value is not None:
        out["inside_mean"] = value
    out.update(last_stage_measures(record))
    if run.get("_source") and isinstance(record.tasks, list) and record.tasks:
        rise = general_opening_rise(Path(run["_source"]), len(record.tasks))
        if rise is not None:
            out["general_opening"] = rise
    return out


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


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 or 0.0 for a single value, n); ``values`` must not be empty. The 0.0 of
    n = 1 is for plots (no error bar); the table and the CSV show the undefined spread as n/a / empty."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, len(values)


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


# ------------------------------------------------------------------------------------------ paired differences
def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (a positive integer) degrees of freedom, exactly: with
    theta = atan(t / sqrt(df)) and c = cos(theta)^2, P(|T| <= |t|) is
    (2/pi) * (theta + sin(theta) cos(theta) * (1 + 2/3 c + 2*4/(3*5) c^2 + ...)) for odd df (the bracket's sum
    has (df-1)/2 terms, none for df = 1) and sin(theta) * (1 + 1/2 c + 1*3/(2*4) c^2 + ...) with df/2 terms for
    even df (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    df = int(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    c = math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2 == 1:
        for k in range(1, (df - 1) // 2):
            term *= c * (2 * k) / (2 * k + 1)
            total += term
        inside = 2.0 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    else:
        for k in range(1, df // 2):
            term *= c * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    return 0.5 + math.copysign(0.5 * inside, t)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom: :func:`student_t_cdf` inverted by
    bisection to a relative precision of ~1e-12 (``t_quantile(0.975, 4)`` = 2.776...)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    while high - low > 1e-12 * high:
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of n paired differences (cell − reference) and its two-sided paired-t confidence interval
    (``low``/``high`` are ``None`` for n < 2; everything but n is ``None`` for n = 0); ``values``: the
    differences themselves (for :attr:`detectable` and :attr:`permutation_p`)."""

    n: int
    mean: float | None
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @property
    def detectable(self) -> float | None:
        """The smallest difference this design detects with 80% power (:func:`detectable_difference` of n and
        the differences' sample std); None for n < 2."""
        if len(self.values) < 2:
            return None
        return detectable_difference(len(self.values), statistics.stdev(self.values))

    @property
    def permutation_p(self) -> float | None:
        """The two-sided sign-flip permutation p-value of the mean (:func:`sign_flip_p`); None for n = 0."""
        return sign_flip_p(self.values) if self.values else None

    def text(self) -> str:
        """``mean [low, high]``; ``mean [n/a]`` without an interval; ``n/a`` without pairs."""
        if self.mean is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.mean:.2f} [n/a]"
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def paired_difference(cell_values: Sequence[float], reference_values: Sequence[float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """Paired t for ``cell_values[i]`` − ``reference_values[i]`` (same seed i): the mean difference and
    mean ± t_{(1+confidence)/2, n−1} · sd / sqrt(n), sd the sample std (ddof=1) of the differences."""
    if len(cell_values) != len(reference_values):
        raise ValueError("paired values must come in pairs")
    diffs = [float(a) - float(b) for a, b in zip(cell_values, reference_values)]
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, None)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedDifference(n, mean, values=tuple(diffs))
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half, values=tuple(diffs))


POWER = 0.80  # the power of the detectable difference (--power)
ALPHA = 0.05  # its two-sided significance level
EXACT_SIGN_FLIPS = 20  # up to this many pairs the permutation p enumerates all 2^n sign flips
SAMPLED_SIGN_FLIPS = 2**20  # beyond it: this many random sign flips (fixed seed)


def detectable_difference(n: int, sd: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest true mean difference that a two-sided paired t-test at level ``alpha`` on ``n`` pairs
    detects with probability ``power``, given the paired differences' standard deviation ``sd``:

        (t_{1−alpha/2, n−1} + t_{power, n−1}) · sd / √n

    This is the normal approximation (z_{1−alpha/2} + z_{power}) · sd / √n with t quantiles in place of the
    normal ones, not the exact noncentral-t solution (SciPy, which has the noncentral t, is not a dependency).
    Against the exact solution (the noncentral t's CDF integrated numerically; ``tests/test_report.py`` checks
    these figures) the approximation gives, at 80% power and alpha 0.05: n = 20 and 30: within 0.02%; n = 10:
    0.1% smaller; n = 5: 1.2% smaller (its true power 79.1%); n = 3: 5% smaller (76.6%); n = 2: 14% smaller
    (73.1%). So with fewer than 5 pairs the true detectable difference is somewhat larger than printed. ``sd``
    is the observed sample std (ddof=1): an estimate, itself uncertain with few pairs."""
    if n < 2:
        raise ValueError(f"a detectable difference needs n >= 2 pairs, got {n}")
    if not 0.0 < power < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"power and alpha must lie in (0, 1), got power={power}, alpha={alpha}")
    return (t_quantile(1.0 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def sign_flip_p(diffs: Sequence[float], exact_up_to: int = EXACT_SIGN_FLIPS,
                samples: int = SAMPLED_SIGN_FLIPS, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of the mean paired difference: under the null hypothesis
    (no difference, each difference symmetric about 0) every sign pattern of the differences is equally
    likely; p = the fraction of the 2^n patterns whose |mean| is at least the observed |mean| (ties count, with
    a relative tolerance of 1e-9 for rounding). No distributional assumption beyond the symmetry. Exact
    enumeration for n <= ``exact_up_to`` (vectorised in chunks of 2^16 patterns; 2^20 patterns take about a
    second); beyond it ``samples`` random sign patterns (``seed``), p = (1 + hits) / (1 + samples). The smallest
    possible p is 2 / 2^n: with 5 pairs 0.0625, so p < 0.05 needs at least 6 pairs. E.g. differences [1, 2, 3]:
    pattern sums ±1 ±2 ±3 reach |6| twice of 8, p = 0.25."""
    import numpy as np

    d = np.asarray([float(x) for x in diffs], dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("a permutation p-value needs at least one paired difference")
    observed = abs(float(d.sum()))
    bar = observed - 1e-9 * max(1.0, observed)
    if n <= exact_up_to:
        hits, chunk = 0, 1 << 16
        powers = 1 << np.arange(n, dtype=np.int64)
        for start in range(0, 1 << n, chunk):
            codes = np.arange(start, min(start + chunk, 1 << n), dtype=np.int64)
            signs = np.where((codes[:, None] & powers) != 0, -1.0, 1.0)  # one sign pattern per row
            hits += int(np.count_nonzero(np.abs(signs @ d) >= bar))
        return hits / float(1 << n)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, samples, 1 << 16):
        rows = min(1 << 16, samples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(rows, n))
        hits += int(np.count_nonzero(np.abs(signs @ d) >= bar))
    return (1 + hits) / (1 + samples)


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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------ table
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


# ------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _mean_matrix(summary: CellSummary) -> tuple[list[str], list[list[float]], int]:
    """Tasks, the seed-mean accuracy matrix ((T+1) x T) and how many runs it averages (those with the first
    run's task list)."""
    import numpy as np

    records = [record_of(r) for r in summary.runs]
    tasks = records[0].tasks
    same = [r for r in records if r.tasks == tasks]
    mean = np.mean(np.array([r.matrix for r in same], dtype=float), axis=0)
    return tasks, mean.tolist(), len(same)


def plot_heatmap(summary: CellSummary, path: Path) -> None:
    """Seed-mean accuracy matrix: rows = stages (0 = before training), columns = tasks, values annotated."""
    import numpy as np

    tasks, mat, n = _mean_matrix(summary)
    M = np.array(mat)
    T = len(tasks)
    fig = _figure(1.2 + 0.9 * T, 1.0 + 0.55 * (T + 1))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(M, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    for i in range(T + 1):
        for j in range(T):
            ax.text(
                j,
                i,
                f"{M[i, j]:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if M[i, j] < 55 else "black",
            )
    ax.set_xticks(range(T), tasks, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(
        range(T + 1), ["0 (before)"] + [f"{t + 1} {name}" for t, name in enumerate(tasks)], fontsize=8
    )
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training stage")
    ax.set_title(f"{summary.label} (n={n})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="score")
    fig.tight_layout()
    fig.savefig(path)


def plot_task_curves(summary: CellSummary, path: Path) -> None:
    """Each task's seed-mean score across stages 0..T (one line per task; its own stage marked by a dot)."""
    import numpy as np

    tasks, mat, n = _mean_matrix(summary)
    M = np.array(mat)
    same = [r for r in map(record_of, summary.runs) if r.tasks == tasks]
    std = np.std(np.array([r.matrix for r in same], dtype=float), axis=0, ddof=1) if n > 1 else None
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(tasks) + 1)
    for j, name in enumerate(tasks):
        (line,) = ax.plot(x, M[:, j], marker=".", label=name)
        if std is not None:
            ax.fill_between(x, M[:, j] - std[:, j], M[:, j] + std[:, j], color=line.get_color(), alpha=0.15)
        ax.plot([j + 1], [M[j + 1, j]], "o", color=line.get_color(), markersize=8)
    ax.set_xticks(x, ["0"] + [str(t) for t in range(1, len(tasks) + 1)])
    ax.set_xlabel("stage (dot: the task's own training stage)")
    ax.set_ylabel("score")
    ax.set_title(f"{summary.label} (n={n})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def own_task_curve(record: RunResults, stage: int) -> list[tuple[int, float]]:
    """(step inside the stage, score of the stage's own task) of stage ``stage``'s curve (``eval.every_steps``),
    the stage-end point placed at the stage's last step (its global step minus the stage's start), and step 0
    from the matrix's previous row (the task's score when the stage began) when the curve has no point there;
    [] when the stage has no curve or its curve does not score its task."""
    entry = next((e for e in record.stages or [] if e.stage == stage), None)
    if entry is None or not entry.curve:
        return []
    numeric = [p for p in entry.curve if isinstance(p.get("stage_step"), int)]
    start = numeric[0]["step"] - numeric[0]["stage_step"] if numeric else None
    points = []
    for p in entry.curve:
        score = (p.get("scores") or {}).get(entry.task)
        if score is None:
            continue
        if isinstance(p.get("stage_step"), int):
            points.append((p["stage_step"], float(score)))
        elif start is not None and isinstance(p.get("step"), int):  # the stage-end point
            x = p["step"] - start
            points = [q for q in points if q[0] != x] + [(x, float(score))]
    tasks, matrix = record.tasks or [], record.matrix or []
    if points and all(x != 0 for x, _ in points) and entry.task in tasks and len(matrix) >= stage:
        points.append((0, float(matrix[stage - 1][tasks.index(entry.task)])))
    return sorted(points)


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


def plot_inside_stage(rows: Sequence[dict], path: Path, title: str) -> None:
    """One panel per stage: the stage's own task's score against the step inside the stage, one line per cell
    (seed mean, band = min..max over seeds)."""
    stages = sorted({r["stage"] for r in rows})
    fig = _figure(4.0 * len(stages), 3.6)
    colors: dict[str, str] = {}
    for i, stage in enumerate(stages):
        ax = fig.add_subplot(1, len(stages), i + 1)
        for r in (r for r in rows if r["stage"] == stage):
            end = r.get("end")
            xs, mean, lo, hi = list(r["steps"]), list(r["mean"]), list(r["min"]), list(r["max"])
            if end:  # the stage ends at different steps: its end drawn mid-range, a bar spanning them
                xs.append(sum(end["steps"]) / 2)
                mean, lo, hi = mean + [end["mean"]], lo + [end["min"]], hi + [end["max"]]
            (line,) = ax.plot(xs, mean, marker=".", label=f"{r['method']} (n={r['n']})",
                              color=colors.get(r["cell"]))
            colors[r["cell"]] = line.get_color()
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
            if end:
                ax.errorbar([xs[-1]], [end["mean"]], xerr=[[xs[-1] - end["steps"][0]], [end["steps"][1] - xs[-1]]],
                            fmt="none", color=line.get_color(), capsize=2)
        task = next(r["task"] for r in rows if r["stage"] == stage)
        ax.set_title(f"stage {stage}: {task}", fontsize=9)
        ax.set_xlabel("optimizer step inside the stage")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel("score on the stage's task")
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def series_name(summary: CellSummary) -> str:
    """The line a cell belongs to in the BWT-vs-budget and drift plots: its method, plus ``key=value`` for the
    settings that tell the report's cells apart."""
    extra = summary.cell.settings_text(summary.shown_keys)
    return f"{summary.cell.method} {extra}" if extra else summary.cell.method


def plot_bwt_vs_budget(summaries: Sequence[CellSummary], path: Path, title: str) -> None:
    """BWT (mean ± std over seeds) against budget, one line per method and setting (:func:`series_name`; n =
    seeds in its legend entry; the lines' points are shifted sideways by up to ±2% of the largest budget so
    that error bars at the same budget stay apart); budget-less ones as a dashed level with a ±std band. The x
    axis starts at 0."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import rcParams

    palette = rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted({series_name(s) for s in summaries})
    budgets = [s.cell.budget for s in summaries if s.cell.budget is not None]
    top = max(budgets, default=1.0)
    budgeted = [m for m in names if any(series_name(s) == m and s.cell.budget is not None for s in summaries)]
    for i, name in enumerate(names):
        color = palette[i % len(palette)]
        pts = sorted(
            (s.cell.budget, *s.stats["BWT"])
            for s in summaries
            if series_name(s) == name and s.cell.budget is not None and "BWT" in s.stats
        )
        if pts:
            xs, ys, es, ns = zip(*pts)
            shift = (budgeted.index(name) - (len(budgeted) - 1) / 2) * 0.04 * top / max(1, len(budgeted) - 1)
            n = f"n={min(ns)}" if min(ns) == max(ns) else f"n={min(ns)}-{max(ns)}"
            ax.errorbar([x + shift for x in xs], ys, yerr=es, marker="o", capsize=3, label=f"{name} ({n})",
                        color=color)
        for s in summaries:
            if series_name(s) == name and s.cell.budget is None and "BWT" in s.stats:
                mean, std, n = s.stats["BWT"]
                ax.axhline(mean, linestyle="--", color=color, label=f"{name} (no budget, n={n})")
                if std > 0:
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlim(0.0, top * 1.15)
    ax.set_xlabel("replay budget ρ")
    ax.set_ylabel("BWT")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _paired_plot_label(comparison: PairedComparison, comparisons: Sequence[PairedComparison]) -> str:
    """A row label of :func:`plot_paired`: method, budget and distinguishing settings, with backbone and
    benchmark only when the rows do not all share them, the reference cell's when the cell has several, and
    n pairs."""
    cell = comparison.summary.cell
    parts = [cell.method, f"budget={cell.budget_label}"]
    if len({(c.summary.cell.backbone, c.summary.cell.benchmark) for c in comparisons}) > 1:
        parts += [cell.backbone, cell.benchmark]
    settings = cell.settings_text(comparison.summary.shown_keys)
    parts += [settings] if settings else []
    if sum(c.summary is comparison.summary for c in comparisons) > 1:
        parts.append(f"(vs {comparison.reference_summary.label})")
    return " ".join(parts) + f" (n={len(comparison.seeds)})"


def plot_paired(comparisons: Sequence[PairedComparison], path: Path, title: str, metric: str = "BWT") -> None:
    """One row per comparison: the mean paired difference in ``metric`` (cell − reference) as a point with its
    95% paired-t interval as a horizontal error bar (an open point without bar for n < 2; rows without pairs
    stay empty), n pairs in the row label, a vertical line at 0; the backbone and benchmark join the title when
    all rows share them."""
    rows = list(comparisons)
    labels = [_paired_plot_label(c, rows) for c in rows]
    longest = max((len(label) for label in labels), default=10)
    fig = _figure(min(18.0, 4.5 + 0.065 * longest), 1.5 + 0.32 * max(len(rows), 1))
    ax = fig.add_subplot(1, 1, 1)
    for y, c in enumerate(rows):
        d = c.diffs.get(metric)
        if d is None or d.mean is None:
            continue
        if d.low is not None and d.high is not None:
            ax.errorbar([d.mean], [y], xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", capsize=3, color="C0")
        else:
            ax.plot([d.mean], [y], "o", color="C0", markerfacecolor="none")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first cell on top, as in the table
    ax.set_xlabel(f"{metric}: cell − reference, mean and 95% paired-t CI\n(open circle: n < 2, no interval)", fontsize=8)
    places = {(c.summary.cell.backbone, c.summary.cell.benchmark) for c in rows}
    ax.set_title(f"{title}: {' on '.join(next(iter(places)))}" if len(places) == 1 else title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)


def stage_drift(entry) -> dict[str, float]:
    """A stage's drift numbers (``stages[t].drift``) and its response drift from ``stages[t].diagnostics``:
    ``response/kl_base`` (KL to the base model) and ``response/base_logprob`` (the base model's log-prob of the
    answers), nats per token of the model's greedy answers to the probe prompts."""
    out = dict(entry.drift or {})
    for key in ("kl_base", "base_logprob"):
        value = ((entry.diagnostics or {}).get(key) or {}).get("mean")
        if _is_number(value):
            out[f"response/{key}"] = float(value)
    return out


def drift_keys(summaries: Sequence[CellSummary]) -> list[str]:
    """The drift keys to plot: the preferred DRIFT_KEYS present in any stage, else the first six found."""
    found: list[str] = []
    for s in summaries:
        for r in s.runs:
            for st in record_of(r).stages or []:
                for k in stage_drift(st):
                    if k not in found:
                        found.append(k)
    preferred = [k for k in DRIFT_KEYS if k in found]
    return preferred or sorted(found)[:6]


def plot_drift(summaries: Sequence[CellSummary], path: Path, keys: Sequence[str], title: str) -> None:
    """One panel per drift key: value per stage (mean ± std over seeds), one line per cell."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.2 * min(len(keys), 3), 3.2 * math.ceil(len(keys) / 3))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(math.ceil(len(keys) / 3), min(len(keys), 3), i + 1)
        for s in summaries:
            per_stage: dict[int, list[float]] = {}
            for r in s.runs:
                for st in record_of(r).stages or []:
                    v = stage_drift(st).get(key)
                    if isinstance(v, (int, float)) and isinstance(st.stage, int):
                        per_stage.setdefault(st.stage, []).append(float(v))
            if not per_stage:
                continue
            xs = sorted(per_stage)
            stats = [mean_std(per_stage[x]) for x in xs]
            ax.errorbar(
                xs,
                [m for m, _, _ in stats],
                yerr=[e for _, e, _ in stats],
                marker="o",
                capsize=2,
                label=f"{series_name(s)} {s.cell.budget_label}",
            )
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("stage")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# ------------------------------------------------------------------------------------------ report
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opr.tools.report", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths", nargs="+", type=Path, help="run directories, sweep directories or results.json files"
    )
    ap.add_argument("--out", type=Path, default=Path("report"), help="output directory (default: report)")
    ap.add_argument(
        "--reference",
        action="append",
        metavar="METHOD",
        help="compare every cell with this method's matching cell by paired differences; repeatable "
        f"(default: {' and '.join(DEFAULT_REFERENCES)})",
    )
    ap.add_argument(
        "--power",
        action="store_true",
        help="per paired difference also the sign-flip permutation p-value and the smallest difference the design "
        "detects with 80%% power at alpha 0.05 (paired t)",
    )
    args = ap.parse_args(argv)
    try:
        md, collected = build_report(args.paths, args.out, args.reference or DEFAULT_REFERENCES, args.power)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(md)
    print(f"wrote {os.path.join(args.out, 'report.md')}, report.csv, paired.csv and plots", file=sys.stderr)
    return 0 if collected.summaries else 1


if __name__ == "__main__":
    sys.exit(main())
