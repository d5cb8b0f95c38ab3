"""Shared fixtures: compose the project's Hydra config the way train.py does, on the tiny backbone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A 2-task stream on the tiny model, small enough for a method to run end-to-end in a few seconds.
TINY = [
    "backbone=tiny",
    "benchmark.num_tasks=2",
    "benchmark.train_size=12",
    "benchmark.eval_size=6",
    "benchmark.test_size=0",
    "benchmark.general_size=4",
    "engine.batch_size=4",
    "engine.max_length=160",
    "eval.batch_size=8",
    "rollout.batch_size=8",
    "analysis.probe_per_task=4",
]


def compose_cfg(overrides: list[str], run_dir: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides) + ([f"run_dir={run_dir}"] if run_dir else []))
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str, run: str = "run"):
        """The tiny config in ``tmp_path / run``; experiments that must not resume each other take a run each."""
        return compose_cfg(TINY + list(overrides), tmp_path / run)

    return make


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers run in sessions of their own, so a
    process-group kill would miss them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_until_mid_stage_then_kill(cmd: list[str], run_dir: Path, env: dict, stage: int = 2, min_step: int = 4,
                                  timeout: float = 180) -> dict:
    """Start ``cmd`` (a training run writing to ``run_dir``) and SIGKILL it with all its descendants
    (launcher and every rank) as soon as a mid-stage training state of ``stage`` at step >= ``min_step``
    is complete. Returns that state's marker info; fails the test if none appears."""
    from opr import checkpoint as ckpt

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    killed_at = None
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            folder = ckpt.latest_train_state(run_dir)
            if folder is not None:
                try:
                    info = json.loads((folder / ckpt.STATE_MARKER).read_text())
                except FileNotFoundError:  # replaced by a newer state between the listing and the read
                    continue
                if info["kind"] == "mid_stage" and info["stage"] == stage and info["stage_step"] >= min_step:
                    _kill_tree(proc.pid)
                    killed_at = info
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
        _, err = proc.communicate()
    assert killed_at is not None, f"no mid-stage state of stage {stage} appeared (rc={proc.returncode}): {err[-3000:]!r}"
    assert proc.returncode == -signal.SIGKILL
    return killed_at


# Stage-entry fields that describe the process that ran a stage (timings, memory, cache bookkeeping), not the
# stage's outcome.
RUN_LOCAL = ("seconds", "peak_rss_mb", "stage_cache")
TRAIN_LOCAL = ("seconds", "tokens_per_second", "seconds_rollout")


def _train_outcome(train: dict) -> dict:
    """``train`` without its timings, also inside the phases of a two-phase stage (``sft``, ``rl``)."""
    return {k: _train_outcome(v) if isinstance(v, dict) and k in ("sft", "rl") else v
            for k, v in train.items() if k not in TRAIN_LOCAL}


def stage_outcome(entry: dict) -> dict:
    out = {k: v for k, v in entry.items() if k not in RUN_LOCAL}
    if isinstance(out.get("train"), dict):
        out["train"] = _train_outcome(out["train"])
    return out


def _exact_part(entry: dict) -> dict:
    """``stage_outcome`` without the spectral drift figures (compared to a tolerance by :func:`assert_same_run`)."""
    out = stage_outcome(entry)
    if isinstance(out.get("drift"), dict):
        out["drift"] = {k: v for k, v in out["drift"].items() if not k.startswith("spectral/")}
    return out


def assert_same_run(a: dict, b: dict) -> None:
    """Two results.json dicts describe the same training: same matrices, metrics, data and per-stage losses.
    Every stage field is compared exactly but the spectral drift figures (``drift["spectral/*"]``): those come
    from float32 LAPACK SVDs, whose last bits depend on how many threads the process gets (measured: the same
    matrix's singular values differ by ~1e-7 relative at 1 and 2 threads), so on a loaded machine a resumed
    process can compute them from the same weights a few 1e-4 apart (angles in degrees); they are compared to
    a relative 1e-3, and to an absolute 1e-4 (an angle of 1e-4 degrees between nearly equal float32 subspaces
    is rounding: measured on a 2-core AMD EPYC Zen 4, the same GRPO stage-1 weights gave 5.2e-5 and 7.0e-5 degrees
    in two processes). The weights themselves are compared through ``param/*`` drift, exactly."""
    assert a["status"] == b["status"] == "complete"
    assert a["matrix"] == b["matrix"]
    assert a["general"]["matrix"] == b["general"]["matrix"]
    assert a["metrics"] == b["metrics"]
    assert len(a["stages"]) == len(b["stages"])
    for sa, sb in zip(a["stages"], b["stages"]):  # every field a stage computes, not only the metrics
        assert _exact_part(sa) == _exact_part(sb), sa["stage"]
        spectral_a = {k: v for k, v in (sa.get("drift") or {}).items() if k.startswith("spectral/")}
        spectral_b = {k: v for k, v in (sb.get("drift") or {}).items() if k.startswith("spectral/")}
        assert spectral_a.keys() == spectral_b.keys(), sa["stage"]
        for key, value in spectral_a.items():
            assert spectral_b[key] == pytest.approx(value, rel=1e-3, abs=1e-4), (sa["stage"], key)
    for sa, sb in zip(a["stages"][1:], b["stages"][1:]):
        assert sa["train_examples"] == sb["train_examples"]
        assert sa.get("replay") == sb.get("replay")
        # a two-phase stage (sft_then_grpo) has them per phase
        for train_a, train_b in ([(sa["train"][p], sb["train"][p]) for p in ("sft", "rl")] if "sft" in sa["train"]
                                 else [(sa["train"], sb["train"])]):
            for key in ("steps", "supervised_tokens", "first_loss", "last_loss", "mean_loss", "mean_grad_norm"):
                assert train_a[key] == train_b[key], key


LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clear_launch_env(monkeypatch) -> None:
    """Unset the launcher's variables for the test and put them back as they were afterwards. The vLLM backend
    sets them for one process (``opr.generation_vllm.single_process_env``); left behind, a later test's
    subprocesses would inherit RANK=0 of WORLD_SIZE=1 and a SLURM job's tasks would not become ranks.
    (``monkeypatch.delenv`` alone records nothing for an unset variable, so one set later would stay.)"""
    for key in LAUNCH_VARIABLES:
        monkeypatch.setenv(key, "")  # records the value before the test, or that there was none
        monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def _launch_env_left_as_found():
    """Every test leaves the launcher's variables as it found them (see :func:`clear_launch_env`)."""
    before = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    yield
    after = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    assert after == before, f"the test changed the launcher's variables: {before} -> {after}"


# ------------------------------------------------------------------------------------------ ranks as threads
class ThreadRanks:
    """Ranks simulated by threads of one process: ``all_gather`` meets the other threads at a barrier."""

    def __init__(self, rank, world, box, barrier):
        self.rank, self.world_size, self._box, self._barrier = rank, world, box, barrier

    def all_gather(self, obj):
        self._box[self.rank] = obj
        self._barrier.wait()
        out = list(self._box)
        self._barrier.wait()
        return out


def on_thread_ranks(world, fn):
    """``fn(ranks)`` on ``world`` threads, each a rank (:class:`ThreadRanks`) -> their results in rank order."""
    box, barrier = [None] * world, threading.Barrier(world)
    results, errors = [None] * world, []

    def rank(r):
        try:
            results[r] = fn(ThreadRanks(r, world, box, barrier))
        except Exception as err:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results
