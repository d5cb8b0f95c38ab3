"""Finding and reading runs: ``results.json`` files, run directories without results, and W&B offline runs.

Every reader turns one path into a list of dicts in the ``results.json`` format plus ``_source`` (where the run
lies) and ``_mtime``; a run that cannot be read comes back too, with ``status`` ``missing`` / ``unreadable`` and
an ``error`` (:func:`load_runs`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from opr.results import RunResults
from opr.tools.report.wandb_offline import WandbReadError, read_offline_run

RUN_MARKERS: tuple[str, ...] = (".hydra", "train.log")


# A run's sub-folders that hold no run of their own: train_state/s*/ keeps a copy of results.json as it was
# when the state was taken, which must not count as a (partial) run.
PRUNE_DIRS: frozenset[str] = frozenset(
    {"checkpoints", "predictions", "replay", "train_state", "wandb", ".hydra", "__pycache__", ".git"}
)


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
    ``opr.tools.report.wandb_offline.results_from_records``) plus ``_source`` (its offline-run folder) and ``_mtime``.
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
