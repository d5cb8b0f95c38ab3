"""launch/queue.sh: two queues on one runs root leave each other's running jobs, logs and results alone."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import ROOT

# Stands in for `python train.py ... hydra.run.dir=DIR`: refuses a directory another run holds, as the
# run-directory lock does (its message), else runs for a moment and writes a complete results.json.
FAKE_PYTHON = r"""#!/usr/bin/env bash
for a in "$@"; do case $a in hydra.run.dir=*) dir=${a#hydra.run.dir=};; esac; done
mkdir -p "$dir"
if ! mkdir "$dir/.held" 2>/dev/null; then
  echo "run directory $dir is in use by another run (pid 1 on test)"; exit 2
fi
echo "working in $dir"; printf 'stage 1:  4/25\r'; sleep 2; printf 'stage 1: 25/25\n'  # a progress bar, no newline
echo '{"status": "complete"}' > "$dir/results.json"; rmdir "$dir/.held"; echo "finished $dir"
"""


def test_a_second_queue_on_the_same_root_leaves_running_jobs_alone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text("")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("j1 method=seq_sft\nj2 method=opr\n")
    root = tmp_path / "runs"
    env = {**os.environ, "PYTHON": str(fake)}
    cmd = ["bash", str(ROOT / "launch" / "queue.sh"), "run", str(src), str(jobs), str(root)]
    first = subprocess.Popen(cmd + ["2"], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not ((root / "j1" / ".held").exists() and (root / "j2" / ".held").exists()):
        assert time.monotonic() < deadline, "the first queue did not start its jobs"
        time.sleep(0.05)
    second = subprocess.run(cmd + ["1"], env=env, capture_output=True, text=True, timeout=60)
    out_first, _ = first.communicate(timeout=60)
    assert second.returncode == 0
    assert second.stdout.count("busy") == 2 and "FAILED" not in second.stdout  # refused, not failed
    assert out_first.count(" done ") == 2 and "FAILED" not in out_first
    for name in ("j1", "j2"):
        log = (root / name / "..").resolve() / f"{name}.log"
        text = log.read_text()
        assert f"working in {root / name}" in text and f"finished {root / name}" in text  # not truncated
        assert text.count("== ") == 2  # one start line per attempt
        assert (root / name / "results.json").read_text().strip() == '{"status": "complete"}'
    assert not list(root.glob(".taken*"))  # each queue removes its own job list
    again = subprocess.run(cmd + ["2"], env=env, capture_output=True, text=True, timeout=60)
    assert again.stdout.count("skip") == 2  # finished jobs are skipped
