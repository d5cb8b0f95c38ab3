"""W&B logging, offline: what the logger writes reads back equal to results.json; resume; ranks; the report;
W&B failures (no network, a dead helper process, an unwritable folder) that never stop training.

Every W&B file goes under tmp_path (the run directory, and WANDB_CACHE_DIR / WANDB_DATA_DIR /
WANDB_CONFIG_DIR); nothing touches the network (the online test points W&B at a closed local port).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import logging
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("wandb")

import opr.loop as loop_mod  # noqa: E402
import opr.tools.report as R  # noqa: E402
from opr.config import ConfigError  # noqa: E402
from opr.loggers.wandb import (  # noqa: E402
    RUN_ID_FILE,
    WandbLogger,
    global_rank,
    init_timeout,
    resolve_mode,
)
from opr.run import run_experiment  # noqa: E402
from opr.tools.report.wandb_offline import read_offline_run, results_from_records, wandb_records  # noqa: E402

FAST = ["method=seq_sft", "logger=wandb", "checkpoint.save=false", "analysis.drift=false"]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """A clean W&B environment: offline, rank 0, its caches under tmp_path."""
    for var in (
        "WANDB_MODE",
        "WANDB_DIR",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "WANDB_RUN_GROUP",
        "WANDB_JOB_TYPE",
        "WANDB_TAGS",
        "WANDB_NAME",
        "RANK",
        "SLURM_PROCID",
    ):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CONFIG_DIR", "config"),
    ):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    return tmp_path


@pytest.fixture
def distinct_scores(monkeypatch):
    """Give every evaluated (stage, task) a different score with many decimals (the tiny model scores 0
    everywhere), so that a swapped or rounded cell cannot go unnoticed."""
    real = loop_mod.evaluate_all
    counter = itertools.count(1)

    def evaluate_all(backbone, tasks, settings, out_dir, seed=0, prompts=None, **sharing):
        scores = real(backbone, tasks, settings, out_dir, seed=seed, prompts=prompts, **sharing)
        return [dataclasses.replace(s, score=100 * ((7 * next(counter)) % 17) / 17) for s in scores]

    monkeypatch.setattr(loop_mod, "evaluate_all", evaluate_all)


def _history(records: list[dict]) -> list[tuple[int, dict]]:
    return [(r["history"]["step"]["num"], r["history"]["item"]) for r in records if r["type"] == "history"]


def _summary(records: list[dict]) -> dict:
    out: dict = {}
    for r in records:
        if r["type"] == "summary":
            out.update(r["summary"].get("update") or {})
    return out


def _one_offline_run(run_dir: Path) -> Path:
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_offline_run_reads_back_as_results_json(tiny_cfg, wandb_env, distinct_scores):
    run_dir = wandb_env / "run"
    run_experiment(tiny_cfg(*FAST, "budget=0.2"))
    res = json.loads((run_dir / "results.json").read_text())
    tasks, matrix = res["tasks"], res["matrix"]
    assert len(tasks) == 2 and len({v for row in matrix for v in row}) == 6  # every cell distinct

    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    wandb_file = _one_offline_run(run_dir)
    assert wandb_file.name == f"run-{run_id}.wandb" and wandb_file.parent.name.endswith(f"-{run_id}")
    records = wandb_records(wandb_file)  # decoded by the wandb package's own reader (wandb-core)

    run = next(r["run"] for r in records if r["type"] == "run")
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config == res["config"]
    assert run["run_id"] == run_id and run["project"] == "opr"
    assert run["run_group"] == "default" and run["job_type"] == "seq_sft"
    assert {"tiny", "mini_trace"} <= set(run["tags"])
    assert not any(t.startswith("budget=") for t in run["tags"])  # seq_sft ignores the budget

    # the stage index is the x-axis of every stage metric
    globs = {
        r["metric"].get("glob_name"): r["metric"].get("step_metric") for r in records if r["type"] == "metric"
    }
    assert all(globs.get(f"stage{s}/*") == "stage" for s in range(3)) and globs["by_stage/*"] == "stage"

    # W&B steps only go up; train/* sit at the trainer's global step, stages 0, 1, 2 in order
    history = _history(records)
    steps = [s for s, _ in history]
    assert steps == sorted(set(steps)) and steps[0] == 0
    assert [item["stage"] for _, item in history if "stage" in item] == [0, 1, 2]
    train_steps = [s for s, item in history if "train/loss" in item]
    assert train_steps == list(range(1, len(train_steps) + 1)) and train_steps
    assert all(
        {"train/lr", "train/tokens_per_second"} <= set(item) for _, item in history if "train/loss" in item
    )

    # every matrix cell, general score and empty rate, exactly as in results.json
    logged = {k: v for _, item in history for k, v in item.items()}
    for s, row in enumerate(matrix):
        for j, task in enumerate(tasks):
            assert logged[f"stage{s}/eval/{task}"] == row[j]
        for g, task in enumerate(res["general"]["tasks"]):
            assert logged[f"stage{s}/general/{task}"] == res["general"]["matrix"][s][g]
        for task in tasks:
            assert logged[f"stage{s}/empty_rate/{task}"] == res["stages"][s]["empty_rate"][task]
    assert logged[f"by_stage/eval/{tasks[0]}"] == matrix[-1][0]  # the last stage's value

    summary = _summary(records)
    for key in ("OP", "BWT", "FWT", "BWT_1overT", "MaxDrop"):
        assert summary[f"final/{key}"] == res["metrics"][key]
    assert summary["final/status"] == "complete" and summary["meta/tasks"] == tasks

    # the accuracy-matrix table and the heatmap image are files of the run
    files = wandb_file.parent / "files"
    table = json.loads((files / summary["final/accuracy_matrix.path"]).read_text())
    assert table["columns"] == ["stage", "trained_task", *tasks]
    assert [row[2:] for row in table["data"]] == matrix and [row[1] for row in table["data"]] == ["-", *tasks]
    assert (files / summary["final/accuracy_heatmap.path"]).stat().st_size > 1000

    # results.json as an artifact: the manifest entry carries the file's MD5
    md5 = base64.b64encode(hashlib.md5((run_dir / "results.json").read_bytes()).digest()).decode()
    manifests = [
        r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"].get("type") == "results"
    ]
    assert len(manifests) == 1
    (entry,) = manifests[0]["manifest"]["contents"]
    assert entry["path"] == "results.json" and entry["digest"] == md5
    assert next(r["exit"] for r in records if r["type"] == "exit").get("exit_code", 0) == 0

    # the reader gives the results.json format back
    back = read_offline_run(wandb_file)
    assert back["status"] == "complete" and back["tasks"] == tasks and back["matrix"] == matrix
    assert back["general"] == res["general"] and back["config"] == res["config"]
    assert back["metrics"] == {k: v for k, v in res["metrics"].items() if v is not None}
    assert back["wandb"]["id"] == run_id and back["_source"] == str(wandb_file.parent)

    # opr.tools.report: a run directory with results.json counts once; without it, W&B files alone feed the table
    assert len(R.load_runs([run_dir])) == 1
    (run_dir / "results.json").unlink()
    shutil.rmtree(run_dir / "predictions")
    runs = R.load_runs([wandb_env])
    assert [r["status"] for r in runs] == ["complete"] and runs[0]["_source"] == str(wandb_file.parent)
    md, collected = R.build_report([wandb_env], wandb_env / "report")
    (summary_cell,) = collected.summaries
    assert summary_cell.cell.method == "seq_sft" and summary_cell.cell.backbone == "tiny"
    assert summary_cell.stats["OP"] == (res["metrics"]["OP"], 0.0, 1)
    assert summary_cell.stats["BWT"][0] == res["metrics"]["BWT"]
    assert f"{res['metrics']['OP']:.2f} ± n/a" in md


def test_same_run_dir_resumes_the_same_run(tiny_cfg, wandb_env):
    run_dir = wandb_env / "run"
    run_experiment(tiny_cfg(*FAST))
    first = _one_offline_run(run_dir)
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    run_experiment(tiny_cfg(*FAST))  # a requeued job: same run directory
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    second = next(p for p in run_dir.glob("wandb/offline-run-*") if p != first.parent)
    # as W&B names an attempt that starts in the first one's second (the second run resumes a finished state
    # and can be that fast); read as two runs (id "<id>-1") before the fix
    second.rename(second.with_name(f"{first.parent.name}-1"))
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # offline: one folder each
    runs = [r["run"] for f in files for r in wandb_records(f) if r["type"] == "run"]
    assert [r["run_id"] for r in runs] == [run_id, run_id]
    # the report reads both attempts as one run, the newest one's results on top
    (run,) = R.read_wandb_offline_runs(run_dir)
    assert run["_source"] == str(files[1].parent) != str(first.parent)
    assert run["status"] == "complete" and run["wandb"]["attempts"] == 2
    res = json.loads((run_dir / "results.json").read_text())
    assert run["matrix"] == res["matrix"] and run["metrics"]["OP"] == res["metrics"]["OP"]
    assert R.read_wandb_offline_runs([run_dir], skip_runs_with_results=True) == []


def test_other_ranks_log_nothing(wandb_env, monkeypatch):
    import wandb

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")  # a second node's first GPU: still not global rank 0
    run_dir = wandb_env / "rank1"
    logger = WandbLogger(project="opr")
    logger.start({"method": {"name": "opr"}, "budget": 0.1, "seed": 0, "experiment_name": "x"}, run_dir)
    logger.log_step({"train/loss": 1.0}, step=1)
    logger.log_stage(0, {"stage0/eval/a": 1.0})
    logger.log_final({"tasks": ["a"], "matrix": [[1.0], [2.0]], "metrics": {"OP": 2.0}}, run_dir)
    logger.finish()
    assert logger.run is None and wandb.run is None
    assert not run_dir.exists()
    assert not (wandb_env / "wandb").exists()


def test_disabled_mode_logs_nothing(wandb_env):
    logger = WandbLogger(mode="disabled")
    logger.start({"budget": 0.1}, wandb_env / "off")
    logger.log_stage(0, {"stage0/eval/a": 1.0})
    logger.finish()
    assert not (wandb_env / "off").exists()


class _FakeRun:
    """Records what the logger sends; stands in for a wandb Run in the step bookkeeping test."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.axes: dict[str, str | None] = {}

    def log(self, data: dict, step: int) -> None:
        self.rows.append((step, data))

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.axes[name] = step_metric

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


@pytest.mark.parametrize("floor", [0, 10])
def test_steps_never_go_back(floor):
    logger = WandbLogger()
    logger.run, logger._floor, logger._last_step = _FakeRun(), floor, floor  # as start() leaves them
    logger.log_stage(0, {"stage0/eval/a": 1.0, "stage0/eval/b": 2.0, "stage0/general/g": 3.0})
    for step in (1, 2, 3):
        logger.log_step({"train/loss": 1.0}, step=step)
    logger.log_stage(1, {"stage1/eval/a": 4.0, "stage1/eval/b": 5.0})
    logger.log_step({"train/loss": 1.0}, step=1)  # a trainer whose counter restarts
    logger.log_step({"train/loss": 1.0}, step=2)
    steps = [s for s, _ in logger.run.rows]
    base = max(0, floor - 1)
    assert steps == [floor, base + 1, base + 2, base + 3, base + 3, base + 4, base + 5]
    assert logger.run.axes == {"stage0/*": "stage", "stage1/*": "stage"}
    assert logger.run.rows[4][1] == {
        "stage": 1,
        "stage1/eval/a": 4.0,
        "stage1/eval/b": 5.0,
        "by_stage/eval/a": 4.0,
        "by_stage/eval/b": 5.0,
    }
    assert logger.run.summary == {"meta/tasks": ["a", "b"], "meta/general_tasks": ["g"]}


def test_global_rank_and_mode():
    assert global_rank({}) == 0
    assert global_rank({"RANK": "0", "SLURM_PROCID": "5"}) == 0
    assert global_rank({"SLURM_PROCID": "3"}) == 3
    assert global_rank({"LOCAL_RANK": "1"}) == 0
    with pytest.raises(ValueError, match="RANK must be an integer rank, got 'x'"):
        global_rank({"RANK": "x"})
    assert resolve_mode("offline", {}) == "offline"
    assert resolve_mode("offline", {"WANDB_MODE": "online"}) == "online"
    assert resolve_mode("online", {"WANDB_MODE": "dryrun"}) == "offline"
    with pytest.raises(ConfigError, match="WANDB_MODE must be one of .* got 'sideways'"):
        resolve_mode("offline", {"WANDB_MODE": "sideways"})


def test_bad_config_fails_before_the_model_loads(tiny_cfg, wandb_env, monkeypatch):
    with pytest.raises(ConfigError, match=r"logger.mode must be one of \['offline', 'online', 'disabled'\]"):
        run_experiment(tiny_cfg("logger=wandb", "logger.mode=bogus"))
    with pytest.raises(ConfigError, match="projct"):
        run_experiment(tiny_cfg("logger=wandb", "+logger.projct=x"))
    with pytest.raises(ConfigError, match="logger.tags"):
        WandbLogger(tags=("x" * 65,))
    (wandb_env / "run").mkdir(exist_ok=True)  # the refused runs above may have created it (their lock)
    (wandb_env / "run" / RUN_ID_FILE).write_text("not/an id\n")
    with pytest.raises(ValueError, match="not a W&B run id"):
        WandbLogger().start({"budget": 0.1}, wandb_env / "run")


def test_results_from_records_partial_runs():
    def hist(stage: int, a: float, b: float) -> dict:
        return {
            "type": "history",
            "history": {"item": {f"stage{stage}/eval/b": b, f"stage{stage}/eval/a": a}},
        }

    head = [
        {"type": "run", "run": {"run_id": "r1", "config": {"update": {"_wandb": {}, "seed": 3}}}},
        {"type": "summary", "summary": {"update": {"meta/tasks": ["b", "a"], "meta/general_tasks": []}}},
        hist(0, 10.0, 20.0),
        hist(1, 11.0, 21.5),
    ]
    running = results_from_records(head)
    assert running["status"] == "running" and running["tasks"] == ["b", "a"]
    assert running["matrix"] == [[20.0, 10.0], [21.5, 11.0]] and running["run"]["seed"] == 3
    failed = results_from_records(head + [{"type": "exit", "exit": {"exit_code": 1}}])
    assert failed["status"] == "failed" and "code 1" in failed["error"]
    done = results_from_records(
        head
        + [hist(2, 5.0, 30.0)]
        + [{"type": "summary", "summary": {"update": {"final/status": "complete", "final/OP": 17.5}}}]
        + [{"type": "exit", "exit": {}}]
    )
    assert done["status"] == "complete" and done["metrics"] == {"OP": 17.5} and len(done["matrix"]) == 3
    # a requeued job's second attempt (its own header), still at stage 0: new scores, no final results yet
    again = results_from_records(
        [{"type": "header", "header": {}}]
        + head
        + [hist(2, 5.0, 30.0)]
        + [{"type": "summary", "summary": {"update": {"final/status": "complete", "final/OP": 17.5}}}]
        + [{"type": "exit", "exit": {}}, {"type": "header", "header": {}}]
        + head[:2]
        + [hist(0, 1.0, 2.0)]
    )
    assert again["status"] == "running" and again["metrics"] == {} and again["wandb"]["attempts"] == 2
    assert again["matrix"] == [[2.0, 1.0], [21.5, 11.0], [30.0, 5.0]]


@pytest.mark.parametrize("method,tagged", [
    ({"name": "opr"}, True),
    ({"name": "vanilla_replay"}, True),
    ({"name": "seq_sft"}, False),
    ({"name": "sdft"}, False),
    ({"name": "grpo", "replay_budget": False}, False),
    ({"name": "self_distill", "replay_budget": True}, True),
])
def test_budget_tag_only_for_methods_that_use_it(method, tagged):
    from opr.loggers.wandb import run_tags

    config = {"method": method, "budget": 0.05, "backbone": {"name": "tiny"}, "benchmark": {"name": "mini_trace"}}
    assert run_tags(config, ["x"]) == ["tiny", "mini_trace", *(["budget=0.05"] if tagged else []), "x"]



# ------------------------------------------------------------------------------ W&B failures never stop training
def _teardown_wandb() -> None:
    """End wandb's process-wide session (its helper process and the settings it read from the environment)."""
    import wandb

    try:
        wandb.teardown()
    except Exception:
        pass  # a helper killed by the test: the session is reset all the same


@pytest.fixture
def fresh_wandb(wandb_env):
    """wandb reads its environment variables once per process, when its helper process starts: end that
    session before the test, so the variables the test sets apply and the helper is the test's own, and after
    it, so neither leaks into later tests."""
    _teardown_wandb()
    yield wandb_env
    _teardown_wandb()


def _off_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "W&B" in r.getMessage()]


def _kill_wandb_helpers() -> list[int]:
    """SIGKILL this process's W&B helper processes (wandb-core and its children); returns their pids."""
    import psutil

    procs = []
    for child in psutil.Process().children():
        try:
            if child.name().startswith("wandb-core"):
                procs += child.children(recursive=True) + [child]
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def test_failing_backend_warns_once_and_turns_wandb_off(caplog):
    class Broken(_FakeRun):
        def log(self, data: dict, step: int) -> None:
            raise ConnectionResetError("Connection lost")

    logger = WandbLogger()
    run = logger.run = Broken()
    with caplog.at_level(logging.WARNING, logger="opr"):
        for step in range(1, 6):
            logger.log_step({"train/loss": 1.0}, step=step)
        logger.log_stage(1, {"stage1/eval/a": 1.0})
        logger.log_final({"tasks": ["a"], "matrix": [[1.0], [2.0]], "metrics": {"OP": 2.0}}, Path("."))
        logger.finish()
    (warning,) = _off_warnings(caplog)
    assert "log_step failed (ConnectionResetError: Connection lost)" in warning and "training goes on" in warning
    assert logger.run is None and run.exit_code == 1  # ended as failed where the run still answers


def test_wandb_helper_killed_mid_run_training_completes(tiny_cfg, fresh_wandb, caplog, monkeypatch):
    """The W&B helper process dies during stage 1: one warning, W&B off, the run completes; a later run in
    the same process gets a working W&B again."""
    run_dir = fresh_wandb / "run"
    steps: list[int] = []
    killed: list[int] = []
    real = WandbLogger.log_step

    def log_step(self, metrics, step):
        steps.append(step)
        if len(steps) == 2:
            killed.extend(_kill_wandb_helpers())
        real(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_step", log_step)
    with caplog.at_level(logging.WARNING, logger="opr"):
        res = run_experiment(tiny_cfg(*FAST))
    assert killed, "no wandb-core process to kill"
    assert res["status"] == "complete" and len(steps) > 2  # training went on past the kill
    assert json.loads((run_dir / "results.json").read_text())["status"] == "complete"
    (warning,) = _off_warnings(caplog)  # once, not once per step
    assert "failed (" in warning and "W&B logging is off for the rest of this run" in warning

    logger = WandbLogger()  # the dead session was reset: a new run starts a new helper
    logger.start({"budget": 0.1, "seed": 0}, fresh_wandb / "again")
    assert logger.run is not None
    logger.finish()


def test_online_without_network_falls_back_to_offline(tiny_cfg, fresh_wandb, caplog, monkeypatch):
    """logger.mode=online with the W&B server unreachable: offline after the init timeout, not after wandb's
    100 s."""
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a configured account, so wandb does try the server
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    run_dir = fresh_wandb / "run"
    started: list[float] = []
    real = WandbLogger.start

    def start(self, config, run_dir):
        clock = time.perf_counter()
        real(self, config, run_dir)
        started.append(time.perf_counter() - clock)

    monkeypatch.setattr(WandbLogger, "start", start)
    with caplog.at_level(logging.WARNING, logger="opr"):
        res = run_experiment(tiny_cfg(*FAST, "logger.mode=online"))
    assert started[0] < 15, started  # 2 s for online, then a new helper process and the offline start
    (warning,) = _off_warnings(caplog)
    assert "online run could not start" in warning and "falling back to offline mode" in warning
    back = read_offline_run(_one_offline_run(run_dir))  # every result is in the offline run
    assert res["status"] == back["status"] == "complete" and back["matrix"] == res["matrix"]


def test_unwritable_wandb_dir_warns_and_training_completes(tiny_cfg, fresh_wandb, caplog):
    blocker = fresh_wandb / "a_file"
    blocker.write_text("not a folder\n")
    bad = blocker / "wandb_here"  # under a regular file: unwritable even for root
    with caplog.at_level(logging.WARNING, logger="opr"):
        res = run_experiment(tiny_cfg(*FAST, f"logger.dir={bad}"))
    assert res["status"] == "complete"
    (warning,) = _off_warnings(caplog)
    assert f"cannot write to {bad} (" in warning and "W&B logging is off for this run" in warning
    assert not list(fresh_wandb.rglob("*.wandb"))


def test_init_timeout():
    assert init_timeout({}) == 30.0 and init_timeout({"WANDB_INIT_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        with pytest.raises(ConfigError, match=f"WANDB_INIT_TIMEOUT must be a positive number .* got '{bad}'"):
            init_timeout({"WANDB_INIT_TIMEOUT": bad})
