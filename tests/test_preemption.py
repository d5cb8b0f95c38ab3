"""A pre-emption signal that arrives far from a safe point (a long evaluation, rollouts or a save) still reaches
its handler in bounded time: SLURM kills the job ``signal_delay_s`` after its warning, and a job killed before
submitit's handler requeues it is never requeued. ``checkpoint.stop_grace_s`` after the signal, the run leaves
through the previous handler (submitit: requeue) without a new training state; the requeued run resumes from
the last complete one.

The driver stands in for submitit: its USR2 handler (installed before train.py's, as submitit's is) records the
call and exits 3; stage 1's evaluation is made to take 90 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, TINY

from opr import checkpoint as ckpt

DRIVER = """
import runpy, sys, time
from pathlib import Path
from opr.loop import ContinualLoop

marker = Path(sys.argv[1])
real = ContinualLoop._evaluate


def slow(self, stage, entry):
    if stage == 1:
        marker.with_name("evaluating").write_text("stage 1")
        time.sleep(90)
    return real(self, stage, entry)


def requeue(signum, frame):  # what submitit's checkpoint_and_try_requeue does: requeue, then exit
    marker.write_text(f"requeued on signal {signum}")
    sys.exit(3)


ContinualLoop._evaluate = slow
import signal
signal.signal(signal.SIGUSR2, requeue)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_usr2_during_a_long_evaluation_requeues_within_the_grace_period(tmp_path):
    driver, marker, run_dir = tmp_path / "driver.py", tmp_path / "requeued", tmp_path / "run"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(marker), str(ROOT / "train.py"), *TINY, "method=seq_sft",
           "analysis.drift=false", "analysis.diagnostics=false", "checkpoint.stop_grace_s=2",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "evaluating").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGUSR2)
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.read_text() == f"requeued on signal {int(signal.SIGUSR2)}", err[-3000:]
    assert proc.returncode == 3
    assert waited < 30, waited  # 2 s of grace, not the 90 s evaluation
    # the last complete training state is row 0's (the stage-1 state was never reached): the resume point
    info = json.loads((ckpt.latest_train_state(run_dir) / ckpt.STATE_MARKER).read_text())
    assert (info["kind"], info["stage"]) == ("stage_end", 0)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and "SIGUSR2" in results["error"]
