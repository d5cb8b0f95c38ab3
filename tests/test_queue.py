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


def _queue(tmp_path: Path, jobs_text: str | None, python: str | None = None) -> subprocess.CompletedProcess:
    """Run the queue on ``jobs_text`` (None: no jobs file) with the fake train.py of FAKE_PYTHON, or with
    ``python`` as the interpreter."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "train.py").write_text("")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    jobs = tmp_path / "jobs.txt"
    if jobs_text is not None:
        jobs.write_text(jobs_text)
    env = {**os.environ, "PYTHON": python or str(fake)}
    cmd = ["bash", str(ROOT / "launch" / "queue.sh"), "run", str(src), str(jobs), str(tmp_path / "runs"), "2"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_a_missing_or_empty_jobs_file_duplicate_names_and_bare_names_are_refused_up_front(tmp_path: Path) -> None:
    cases = {
        None: "jobs.txt does not exist or is not a readable file",
        "": "holds no job",
        "# only a comment\n\n   \n": "holds no job",
        "j1 method=seq_sft\nj2 method=opr\nj1 method=grpo\n": "uses these job names more than once (each names "
                                                               "its run folder): j1",
        "j1 method=seq_sft\nj2\n": "a job needs a name and at least one train.py override",
    }
    for text, message in cases.items():
        done = _queue(tmp_path, text)
        assert done.returncode == 2, (text, done.stdout, done.stderr)
        assert message in done.stderr, (text, done.stderr)
        assert not (tmp_path / "runs").exists()  # nothing started
        (tmp_path / "jobs.txt").unlink(missing_ok=True)
    assert "line 2: j2" in _queue(tmp_path, "j1 method=seq_sft\nj2\n").stderr
    no_python = _queue(tmp_path, "j1 method=seq_sft\n", python=str(tmp_path / "no" / "python"))
    assert no_python.returncode == 2 and f"no Python at {tmp_path / 'no' / 'python'}" in no_python.stderr


def test_the_queue_exits_1_and_lists_the_jobs_that_failed(tmp_path: Path) -> None:
    failing = tmp_path / "failing_python"  # fails the job whose overrides hold engine.lr=-1, as validation does
    failing.write_text('#!/usr/bin/env bash\ncase "$*" in *engine.lr=-1*) echo "engine.lr must be > 0"; exit 2;; esac\n'
                       + FAKE_PYTHON.split("\n", 1)[1])
    failing.chmod(0o755)
    done = _queue(tmp_path, "good method=seq_sft\nbad1 engine.lr=-1\nbad2 method=opr engine.lr=-1\n",
                  python=str(failing))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout.count("FAILED") == 2 and " done good" in done.stdout
    assert "2 job(s) FAILED:" in done.stderr and "bad1" in done.stderr and "bad2" in done.stderr
    assert "good" not in done.stderr.split("FAILED:")[1]
    assert not list((tmp_path / "runs").glob(".failed*"))  # its bookkeeping is removed
    assert _queue(tmp_path, "good method=seq_sft\n", python=str(failing)).returncode == 0  # skipped: complete
