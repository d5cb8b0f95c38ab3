"""Weights & Biases logging (``logger=wandb``).

One W&B run per job, created on global rank 0 only (every other rank's logger does nothing). Offline by
default: the run is written to ``<run_dir>/wandb/offline-run-*/run-<id>.wandb`` and uploaded later with
``wandb sync``; ``logger.mode=online`` or ``WANDB_MODE=online`` streams it instead (the environment variable
wins over the config, so a cluster can force offline). The run id is kept in ``<run_dir>/wandb_run_id.txt``:
a requeued job with the same run directory continues the same W&B run (``resume="allow"``).

What is logged (``opr.loggers`` describes when the loop calls each method):

- ``start``: the resolved config; group = ``experiment_name``, job type = ``method.name``, tags = backbone,
  benchmark and ``budget=<x>`` (plus ``logger.tags``).
- ``log_step``: ``train/*`` at W&B step = the trainer's global optimizer step (shifted only where W&B would
  otherwise drop it: see ``WandbLogger.log_step``).
- ``log_stage``: every metric the loop passes (``stage{t}/eval/{task}``, ``stage{t}/general/{task}``,
  ``stage{t}/empty_rate/{task}``) plus ``stage`` = t, on the current step: the stage index is their x-axis
  (``define_metric("stage{t}/*", step_metric="stage")``), so stage logging never moves the step back. Each
  ``stage{t}/<name>`` also goes to ``by_stage/<name>`` (x-axis ``stage``): one line per task across stages,
  the forgetting curve.
- ``log_final``: ``final/<metric>`` (OP, BWT, FWT, ...) and ``final/status`` in the run summary, the
  accuracy matrix as a ``wandb.Table`` and a heatmap image, and ``results.json`` as an artifact.

A W&B failure never stops training. ``wandb.init`` runs under a short timeout (30 s; the environment
variable ``WANDB_INIT_TIMEOUT`` sets another); an online run that cannot start (no network, no API key, a
server that does not answer) falls back to offline with a warning; when offline cannot start either (an
unwritable ``logger.dir``), a warning names the folder and W&B stays off. A later call that fails (the W&B
helper process died, a full disk) warns once, naming the error, and turns W&B off for the rest of the run;
the loop goes on and writes ``results.json`` as usual. Configuration errors (a bad ``logger.mode`` or
``WANDB_INIT_TIMEOUT``, a corrupt ``wandb_run_id.txt``) still raise, before training starts.

The offline run files are read back (into the ``results.json`` format) by ``opr.tools.report.wandb_offline``,
which uses the metric names defined here.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import secrets
import string
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from opr.config import ConfigError, budget_applies
from opr.distributed import this_rank
from opr.results import RunResults, Status

log = logging.getLogger("opr")

RUN_ID_FILE = "wandb_run_id.txt"
MODES: tuple[str, ...] = ("offline", "online", "disabled")
MODE_ALIASES: dict[str, str] = {"dryrun": "offline", "run": "online"}  # wandb's older spellings
INSTALL_HINT = "pip install wandb==0.31.0 (the version this logger was tested with)"
# wandb's own default is 90 s (plus a 10 s grace): an unreachable server held a job that long before its
# first step. A reachable server answers in seconds; past this the run falls back to offline. Not a config
# key: the logger's config is part of what a resumed run must match, and this does not change results.
DEFAULT_INIT_TIMEOUT_S = 30.0

STAGE_AXIS = "stage"
BY_STAGE_PREFIX = "by_stage/"
FINAL_PREFIX = "final/"
STATUS_KEY = "final/status"
TASKS_KEY = "meta/tasks"  # the task order of the accuracy matrix's columns (the stream order)
GENERAL_TASKS_KEY = "meta/general_tasks"
MATRIX_KEY = "final/accuracy_matrix"
HEATMAP_KEY = "final/accuracy_heatmap"

# W&B run ids: at most 64 characters and none of / \ # ? % : (we allow the conservative subset below).
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STAGE_KEY_RE = re.compile(r"^stage(\d+)/(eval|general|empty_rate)/(.+)$")
_MAX_TAG_LEN = 64
_ID_ALPHABET = string.ascii_lowercase + string.digits


# ------------------------------------------------------------------------------------------ helpers
# This process's global rank (the W&B run lives on rank 0): :func:`opr.distributed.this_rank`.
global_rank = this_rank


def resolve_mode(configured: str, env: Optional[Mapping[str, str]] = None) -> str:
    """The W&B mode to use: ``WANDB_MODE`` when set (it wins over the config), else ``configured``.

    Accepts ``offline``, ``online``, ``disabled`` (and wandb's aliases ``dryrun`` = offline, ``run`` =
    online); anything else raises ``ConfigError`` naming the value and where it came from.
    """
    env = os.environ if env is None else env
    raw = env.get("WANDB_MODE")
    source = "environment variable WANDB_MODE"
    if raw is None or raw.strip() == "":
        raw, source = configured, "logger.mode"
    mode = MODE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if mode not in MODES:
        raise ConfigError(f"{source} must be one of {list(MODES)}, got {raw!r}")
    return mode


def init_timeout(env: Optional[Mapping[str, str]] = None) -> float:
    """Seconds ``wandb.init`` may take before an online run falls back to offline (or an offline one is given
    up): ``WANDB_INIT_TIMEOUT`` when set (wandb's own variable), else 30. ``ConfigError`` for a value that is
    not a positive number."""
    env = os.environ if env is None else env
    raw = env.get("WANDB_INIT_TIMEOUT")
    if raw is None or raw.strip() == "":
        return DEFAULT_INIT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ConfigError(
            f"environment variable WANDB_INIT_TIMEOUT must be a positive number of seconds, got {raw!r}"
        )
    return value


def load_or_create_run_id(run_dir: Path) -> str:
    """The W&B run id stored in ``run_dir/wandb_run_id.txt``; a new random id is created and stored first
    when the file does not exist, so every later attempt of the job finds the same id.

    Raises ``ValueError`` when the file holds something that is not a valid run id.
    """
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        run_id = path.read_text(encoding="utf-8").strip()
        if not _RUN_ID_RE.match(run_id):
            raise ValueError(
                f"{path} holds {run_id!r}, not a W&B run id (1-64 characters of A-Z a-z 0-9 _ -); "
                "delete the file to start a new W&B run"
            )
        return run_id
    run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))  # W&B's own ids look like this
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return run_id


def _get(config: Mapping, *keys: str) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def run_tags(config: Mapping, extra: Sequence[str] = ()) -> list[str]:
    """Tags of a run: backbone name, benchmark name, ``budget=<x>`` (``%g``, only when the method uses the
    budget: :func:`opr.config.budget_applies`), then ``extra``; no repeats."""
    tags: list[str] = []
    for group in ("backbone", "benchmark"):
        name = _get(config, group, "name")
        if name is not None:
            tags.append(str(name))
    budget = config.get("budget")
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget_applies(config):
        tags.append(f"budget={float(budget):g}")
    tags.extend(extra)
    return list(dict.fromkeys(t[:_MAX_TAG_LEN] for t in tags))


def heatmap_rgb(tasks: Sequence[str], matrix: Sequence[Sequence[float]], title: str = "") -> Any:
    """The accuracy matrix drawn as an annotated heatmap (matplotlib Agg, no pyplot).

    ``matrix``: (T+1) x T scores on the 0-100 scale, row 0 before training, row t after stage t; ``tasks``:
    the T column names. Returns a ``numpy.uint8`` array of shape (H, W, 3).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    M = np.asarray(matrix, dtype=float)
    T = len(tasks)
    if M.shape != (T + 1, T):
        raise ValueError(f"accuracy matrix must be {T + 1} x {T} for {T} tasks, got shape {M.shape}")
    fig = Figure(figsize=(1.6 + 0.9 * T, 1.2 + 0.55 * (T + 1)), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(M, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    for i in range(T + 1):
        for j in range(T):
            color = "white" if M[i, j] < 55 else "black"
            ax.text(j, i, f"{M[i, j]:.1f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(T), list(tasks), rotation=35, ha="right", fontsize=8)
    ax.set_yticks(
        range(T + 1), ["0 (before)"] + [f"{t + 1} {name}" for t, name in enumerate(tasks)], fontsize=8
    )
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training stage")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="score")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _describe(err: BaseException) -> str:
    """``Type: first line of the message`` (wandb's messages go on with advice about its own API)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _reset_wandb_session() -> None:
    """End wandb's process-wide session (``wandb.teardown``: its helper process, and the environment it read
    when that started); the next ``wandb.init`` starts a new one. On a dead helper, teardown raises after it
    has reset the session, which is all that is needed here."""
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


def _ensure_writable(folder: Path) -> None:
    """Create ``folder``; raise ``OSError`` naming it when it cannot be created or written to (wandb would
    move to the system temp folder, where a job's files are lost with the node)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{folder} is not writable")


# ------------------------------------------------------------------------------------------ logger
class WandbLogger:
    """The ``opr.loggers`` logger interface backed by one W&B run (see the module docstring).

    Args:
        project: W&B project.
        entity: W&B entity (user or team); ``None`` = the account's default.
        group: run group; ``None`` = the config's ``experiment_name``.
        job_type: ``None`` = the config's ``method.name``.
        tags: added to the automatic ones (backbone, benchmark, ``budget=<x>``).
        mode: ``offline`` (default, no network), ``online`` or ``disabled``; ``WANDB_MODE`` overrides it.
        dir: where W&B writes its ``wandb/`` folder; ``None`` = the run directory.
        run_name: display name; ``None`` = ``<method>-b<budget>-s<seed>``.
    """

    def __init__(
        self,
        project: str = "opr",
        entity: Optional[str] = None,
        group: Optional[str] = None,
        job_type: Optional[str] = None,
        tags: tuple[str, ...] = (),
        mode: str = "offline",
        dir: Optional[str] = None,
        run_name: Optional[str] = None,
    ) -> None:
        if not isinstance(project, str) or not project.strip():
            raise ConfigError(f"logger.project must be a non-empty string, got {project!r}")
        bad = [t for t in tags if not isinstance(t, str) or not t.strip() or len(t) > _MAX_TAG_LEN]
        if bad:
            raise ConfigError(
                f"logger.tags must be non-empty strings of at most {_MAX_TAG_LEN} characters, got {bad}"
            )
        self.project, self.entity, self.group, self.job_type = project, entity, group, job_type
        self.tags, self.dir, self.run_name = list(tags), dir, run_name
        self.mode = resolve_mode(mode, env={})  # the configured mode; start() applies WANDB_MODE over it
        effective = resolve_mode(self.mode)  # a bad value fails now, before any model loads
        init_timeout()  # likewise a bad WANDB_INIT_TIMEOUT
        if effective != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"logger=wandb needs the wandb package: {INSTALL_HINT}; or use logger=none")
        self.run: Any = None  # the wandb Run on global rank 0 between start() and finish()
        self._floor = 0  # the lowest step W&B takes: a resumed online run's next step, else 0
        self._offset = 0  # W&B step - trainer step; > 0 only when the trainer's counter is below the floor
        self._last_step = 0  # the highest W&B step logged so far; stage rows go here
        self._last_raw_step: Optional[int] = None
        self._stage_axes: set[int] = set()
        self._tasks_logged = False
        self._final_logged = False

    # ------------------------------------------------------------------ interface
    def start(self, config: dict, run_dir: Path) -> None:
        """Create (or resume) the W&B run on global rank 0; store its id in ``run_dir/wandb_run_id.txt``.

        An online run that cannot start falls back to offline; when no run can start, a warning says why
        and W&B stays off for this run. Only configuration errors raise (see the module docstring)."""
        mode = resolve_mode(self.mode)
        if mode == "disabled" or global_rank() != 0:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = load_or_create_run_id(run_dir)  # a corrupt id file raises: the user picks the run to resume
        wandb_dir = Path(self.dir) if self.dir else run_dir
        try:
            import wandb
        except Exception as err:  # a broken install (find_spec in __init__ only saw that it is there)
            log.warning("W&B: wandb cannot be imported (%s); W&B logging is off for this run", _describe(err))
            return
        try:
            _ensure_writable(wandb_dir)
        except OSError as err:
            log.warning(
                "W&B: cannot write to %s (%s); W&B logging is off for this run (set logger.dir to a writable "
                "folder); training goes on",
                wandb_dir,
                _describe(err),
            )
            return
        for attempt in ("online", "offline") if mode == "online" else (mode,):
            clock = time.perf_counter()
            try:
                self.run = self._init(wandb, attempt, config, wandb_dir, run_id)
                break
            except Exception as err:
                seconds = time.perf_counter() - clock
                if attempt == "online":
                    log.warning(
                        "W&B: the online run could not start (%s, after %.1f s, init timeout %g s); "
                        "falling back to offline mode: upload it later with `wandb sync %s/offline-run-*`",
                        _describe(err),
                        seconds,
                        init_timeout(),
                        wandb_dir / "wandb",
                    )
                    # wandb's helper process keeps the failed online run's id taken ("run ID ... is in use"):
                    # the offline run, under the same id, needs a new helper
                    _reset_wandb_session()
                    continue
                log.warning(
                    "W&B: the %s run could not start in %s (%s, after %.1f s); W&B logging is off for this "
                    "run, training goes on",
                    attempt,
                    wandb_dir / "wandb",
                    _describe(err),
                    seconds,
                )
                return
        try:
            self._started(attempt, wandb_dir)
        except Exception as err:
            self._turn_off("start", err)

    def log_step(self, metrics: dict, step: int) -> None:
        """Per optimizer step metrics (``train/loss``, ``train/lr``, ...) at W&B step = ``step``, the
        trainer's global step (restored with the training state on resume).

        W&B drops rows whose step is below one it already has, so steps are shifted where needed: by the
        gap to a resumed online run's next step when the trainer starts below it (a job restarted from an
        earlier state or from scratch), and past the last step when the counter goes back mid-run."""
        self._guarded("log_step", self._log_step, metrics, step)

    def log_stage(self, stage: int, metrics: dict) -> None:
        """Every metric of stage ``stage``, x-axis ``stage``, on the current W&B step (see the module doc)."""
        self._guarded("log_stage", self._log_stage, stage, metrics)

    def log_final(self, results: RunResults | Mapping, run_dir: Path) -> None:
        """Final metrics into the summary (``final/OP`` ...), the accuracy matrix as a table and a heatmap,
        and ``results.json`` as an artifact of type ``results``. ``results``: the run record, or its
        ``results.json`` dict (what the loop passes)."""
        self._guarded("log_final", self._log_final, results, run_dir)

    def finish(self) -> None:
        """End the W&B run (``wandb.finish`` of this run). Exit code 0 when the final results were logged, 1
        otherwise (a diverged or interrupted job shows as failed in W&B). Safe to call twice."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=0 if self._final_logged else 1)
        except Exception as err:
            self._turn_off("finish", err, run)

    # ------------------------------------------------------------------ internals
    def _guarded(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` while the run lives; a failure warns once and turns W&B off (it never raises)."""
        if self.run is None:
            return
        try:
            fn(*args)
        except Exception as err:
            self._turn_off(what, err)

    def _init(self, wandb: Any, mode: str, config: dict, wandb_dir: Path, run_id: str) -> Any:
        """``wandb.init`` of this job's run in ``mode``; raises what it raises."""
        method = _get(config, "method", "name")
        budget, seed = config.get("budget"), config.get("seed")
        name = self.run_name
        if name is None and method is not None:
            name = f"{method}-b{budget:g}-s{seed}" if _is_number(budget) else f"{method}-s{seed}"
        # console="off": training output stays in Hydra's train.log, not a second copy in W&B. The timeout
        # is passed even when WANDB_INIT_TIMEOUT sets it: wandb reads its variables once per process only.
        settings = wandb.Settings(console="off", silent=True, init_timeout=init_timeout())
        return wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group or config.get("experiment_name"),
            job_type=self.job_type or (str(method) if method is not None else None),
            tags=run_tags(config, self.tags),
            name=name,
            config=config,
            dir=str(wandb_dir),
            id=run_id,
            resume="allow",
            mode=mode,
            reinit="finish_previous",
            settings=settings,
        )

    def _started(self, mode: str, wandb_dir: Path) -> None:
        """Bookkeeping and metric axes of the run ``_init`` just created; logs where the run goes."""
        self._floor = int(getattr(self.run, "starting_step", 0) or 0)
        self._offset, self._last_step, self._last_raw_step = 0, self._floor, None
        self._stage_axes, self._tasks_logged, self._final_logged = set(), False, False
        self.run.define_metric(STAGE_AXIS)
        self.run.define_metric(BY_STAGE_PREFIX + "*", step_metric=STAGE_AXIS)
        # the folder wandb actually writes to: it moves to the system temp folder, silently (silent=True),
        # when the one it was given is not writable
        settings = self.run.settings
        local = Path(settings.sync_dir)
        if os.path.realpath(settings.root_dir) != os.path.realpath(wandb_dir):
            log.warning("W&B: the run's files go to %s, not under %s (unwritable to wandb)", local, wandb_dir)
        where = local if mode == "offline" else f"{self.run.url or 'W&B'} (local copy in {local})"
        log.info("W&B run %s (%s, project %s) -> %s", self.run.id, mode, self.project, where)

    def _turn_off(self, what: str, err: Exception, run: Any = None) -> None:
        """After a failed W&B call: warn, naming the error, and drop the run, so no later call reaches W&B
        (the warning comes once, not once per step). The run is ended as failed where its helper process
        still answers; where it does not, wandb's process state is reset instead, so that a later run in this
        process starts a new helper and the exit hook does not fail again on the dead one."""
        run = run if run is not None else self.run
        self.run = None
        log.warning(
            "W&B: %s failed (%s); W&B logging is off for the rest of this run; training goes on and "
            "results.json is written as usual",
            what,
            _describe(err),
        )
        log.debug("W&B: %s failed", what, exc_info=err)
        if run is None:
            return
        if what != "finish":
            try:
                run.finish(exit_code=1)
                return
            except Exception:
                pass
        _reset_wandb_session()

    def _log_step(self, metrics: dict, step: int) -> None:
        step = int(step)
        if self._last_raw_step is None:
            self._offset = max(0, self._floor - step)
        elif step < self._last_raw_step:
            log.warning(
                "W&B: training step went back from %d to %d; shifting the W&B step", self._last_raw_step, step
            )
            self._offset = self._last_step + 1 - step
        self._last_raw_step = step
        wb_step = max(self._offset + step, self._last_step)
        self.run.log(dict(metrics), step=wb_step)
        self._last_step = wb_step

    def _log_stage(self, stage: int, metrics: dict) -> None:
        stage = int(stage)
        if stage not in self._stage_axes:
            self.run.define_metric(f"stage{stage}/*", step_metric=STAGE_AXIS)
            self._stage_axes.add(stage)
        row: dict[str, Any] = {STAGE_AXIS: stage, **metrics}
        prefix = f"stage{stage}/"
        tasks: list[str] = []
        general: list[str] = []
        for key, value in metrics.items():
            if key.startswith(prefix):
                row[BY_STAGE_PREFIX + key[len(prefix) :]] = value
            m = STAGE_KEY_RE.match(key)
            if m and int(m.group(1)) == stage and m.group(2) in ("eval", "general"):
                (tasks if m.group(2) == "eval" else general).append(m.group(3))
        if not self._tasks_logged and tasks:  # the stream order, for readers (a JSON object loses key order)
            self.run.summary.update({TASKS_KEY: tasks, GENERAL_TASKS_KEY: general})
            self._tasks_logged = True
        self.run.log(row, step=self._last_step)

    def _log_final(self, results: RunResults | Mapping, run_dir: Path) -> None:
        import wandb

        record = RunResults.coerce(results)
        tasks = list(record.tasks or [])
        matrix = [list(row) for row in record.matrix or []]
        summary: dict[str, Any] = {
            f"{FINAL_PREFIX}{k}": float(v) for k, v in (record.metrics or {}).items() if _is_number(v)
        }
        summary[STATUS_KEY] = str(record.status if record.status is not None else Status.COMPLETE)
        summary[TASKS_KEY] = tasks
        summary[GENERAL_TASKS_KEY] = list((record.general.tasks if record.general is not None else None) or [])
        self.run.summary.update(summary)
        media: dict[str, Any] = {}
        if tasks and len(matrix) == len(tasks) + 1:
            labels = ["-"] + tasks
            media[MATRIX_KEY] = wandb.Table(
                columns=["stage", "trained_task", *tasks],
                data=[[s, labels[s], *(float(v) for v in row)] for s, row in enumerate(matrix)],
            )
            title = str(self.run.name or self.run.job_type or "")
            media[HEATMAP_KEY] = wandb.Image(heatmap_rgb(tasks, matrix, title), caption="accuracy matrix")
        if media:
            self.run.log(media, step=self._last_step)
        path = Path(run_dir) / "results.json"
        if path.is_file():
            artifact = wandb.Artifact(
                name=f"results-{self.run.id}",
                type="results",
                description="results.json of an opr run: config, accuracy matrix, metrics, per-stage details",
                metadata={k[len(FINAL_PREFIX) :]: v for k, v in summary.items() if _is_number(v)},
            )
            artifact.add_file(str(path), name="results.json")  # copied: a requeued job may rewrite it
            self.run.log_artifact(artifact)
        else:
            log.warning("W&B: no %s to store as an artifact", path)
        self._final_logged = True
