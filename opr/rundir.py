"""What a run owns in its directory: an exclusive lock, and the run's own copy of Hydra's config files.

**Lock.** Two runs started in one directory (say seed 0 and seed 1 with the same ``hydra.run.dir``) would
write over each other's files and both report success. The first takes an exclusive ``fcntl`` lock on
``<run_dir>/.lock`` (the kernel drops it when the holder exits or dies, so a stale lock cannot outlive its
process); a second is refused with the holder's pid, host and start time. Under several ranks only rank 0
holds it (:func:`opr.run.run_experiment`).

**Hydra's files.** Hydra writes ``.hydra/{config,hydra,overrides}.yaml`` before the task starts, so a refused
run (a different config in a finished run's directory, or a directory in use) would leave them describing the
refused command. An accepted run keeps a copy in ``.opr_hydra/``; a refused one puts it back.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

LOCK_FILE = ".lock"
HYDRA_DIR = ".hydra"
HYDRA_COPY = ".opr_hydra"


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory."""


class RunDirLock:
    """An exclusive, non-blocking lock on a run directory, held until :meth:`release` or process exit."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: Optional[int] = None

    def acquire(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirInUse(f"run directory {self.run_dir} is in use by another run ({holder}); wait for it to "
                              "finish, or give this run its own directory (hydra.run.dir=...)") from None
        os.ftruncate(fd, 0)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _copy_yaml(src: Path, dst: Path) -> bool:
    """Copy ``src/*.yaml`` into ``dst``; False when ``src`` is no folder."""
    if not src.is_dir():
        return False
    dst.mkdir(exist_ok=True)
    for f in src.glob("*.yaml"):
        shutil.copy2(f, dst / f.name)
    return True


def keep_hydra_files(run_dir: Path) -> None:
    """After a run is accepted: copy ``.hydra/*.yaml`` to ``.opr_hydra/`` (the run's own record)."""
    _copy_yaml(Path(run_dir) / HYDRA_DIR, Path(run_dir) / HYDRA_COPY)


def restore_hydra_files(run_dir: Path) -> bool:
    """After a run was refused: put the accepted run's ``.hydra/*.yaml`` back; False when there is no copy."""
    return _copy_yaml(Path(run_dir) / HYDRA_COPY, Path(run_dir) / HYDRA_DIR)
