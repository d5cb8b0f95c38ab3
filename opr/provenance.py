"""What a run's numbers depend on besides its config: the software, the machine and the code's commit.

:func:`environment_facts` is shared by ``results.json`` (:func:`reproduction_facts`) and the benchmarks
(``opr.tools.bench.common.machine_info``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def environment_facts() -> dict:
    """torch's thread count, the core count and the torch / transformers / Python versions."""
    import transformers

    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the flags that pick torch's CPU kernels here


def cpu_features(cpuinfo: str | None = None) -> str:
    """Which of :data:`CPU_FEATURES` the CPU has, space-separated (the flags of ``cpuinfo``, by default
    ``/proc/cpuinfo``; "" where unknown).

    The model name alone does not tell the machines apart whose last bits differ: an "AMD EPYC" may have AVX2
    only ("avx2": bf16 about 100x slower than fp32) or AVX-512 with bf16 (Zen 4: "avx2 avx512f avx512_bf16"); an
    Intel Xeon with AMX adds "amx_bf16"."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(f for f in CPU_FEATURES if f in flags)
    except OSError:
        pass
    return ""


def git_commit(root: Path) -> tuple[str | None, bool | None]:
    """(commit, whether ``opr/`` or ``conf/`` differ from it) of the checkout at ``root``; a ``git archive``
    copy (``launch/queue.sh``) has no git but a ``SOURCE_COMMIT`` file, read as a clean commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "opr", "conf"],
                                    cwd=root, capture_output=True, text=True, timeout=10).stdout
            return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    if (root / "SOURCE_COMMIT").is_file():
        return (root / "SOURCE_COMMIT").read_text().strip(), False
    return None, None


# the keys of reproduction_facts(): what each attempt of a resumed run records of its machine and code
REPRODUCTION_KEYS = ("torch_threads", "cpu_count", "torch", "transformers", "python", "cpu", "cpu_features", "gpu",
                     "git_commit", "git_dirty")


def reproduction_facts() -> dict:
    """What decides whether a run reproduces bit for bit elsewhere: :func:`environment_facts`, the CPU (its
    model and :func:`cpu_features`: the instruction set picks the matmul kernels), the GPU if any, and the
    code's git commit."""
    commit, dirty = git_commit(Path(__file__).resolve().parent.parent)
    return {
        **environment_facts(),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit,
        "git_dirty": dirty,
    }
