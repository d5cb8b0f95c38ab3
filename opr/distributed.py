"""The processes of one run: where their ranks come from, and the few collectives a run needs outside training.

**Where ranks come from** (:func:`launch_env`), in this order:

1. A launcher that sets ``RANK`` and ``WORLD_SIZE`` (``torchrun``, the ``deepspeed`` launcher): taken as is.
2. SLURM tasks: a job step started by ``srun`` (submitit's launcher starts one per job) with several tasks.
   Each task is one rank: ``RANK = SLURM_PROCID``, ``WORLD_SIZE = SLURM_STEP_NUM_TASKS``,
   ``LOCAL_RANK = SLURM_LOCALID``, ``MASTER_ADDR`` = the step's first node, ``MASTER_PORT`` from the job id
   (the same in every task, :func:`slurm_master_port`) unless ``MASTER_PORT`` is set. Multi-node jobs work
   the same way. The variables are read directly rather than through
   ``submitit.helpers.TorchDistributedEnvironment().export()``, which also sets ``CUDA_VISIBLE_DEVICES`` to
   the local rank alone (each rank then sees one GPU, numbered 0) and refuses a ``MASTER_PORT`` already set.
3. Otherwise one process (rank 0 of 1).

A job that asked SLURM for several tasks but runs ``train.py`` in its batch script itself (no ``srun``) is one
process where several were meant: :class:`LaunchError`, before anything loads.

**Collectives outside training.** Before the trainer exists, rank 0 decides what must be one thing for the
whole run (the run directory, a refusal) and every rank takes it (:func:`broadcast_from_main`); with one
process these are plain function calls.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import zlib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Optional, Protocol

log = logging.getLogger("opr")

MASTER_PORT_RANGE = (20000, 60000)


class LaunchError(RuntimeError):
    """The processes of this launch do not make a run (e.g. SLURM tasks without ``srun``)."""


class Ranks(Protocol):
    """What work shared across ranks needs of the process group (the trainer provides it,
    :class:`opr.engine.base.Trainer`): this process's ``rank``, the ``world_size`` and ``all_gather``."""

    rank: int
    world_size: int

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` in rank order, on every rank (``[obj]`` on one process)."""
        ...


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout of this process. ``source``: ``single``, ``launcher`` (RANK was set) or ``slurm``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29511
    source: str = "single"

    def variables(self) -> dict[str, str]:
        """The ``env://`` variables of ``torch.distributed`` for this layout."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{key}={value!r} is not an integer") from None


def slurm_master_port(job_id: str) -> int:
    """A port in [20000, 60000) derived from the SLURM job id: every task of the job computes the same one,
    and jobs sharing a node rarely collide (``MASTER_PORT`` overrides it).

    >>> slurm_master_port("1234") == slurm_master_port("1234")
    True
    """
    low, high = MASTER_PORT_RANGE
    return low + zlib.crc32(str(job_id).encode()) % (high - low)


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (``gpu[03-04,07],cpu1`` -> ``gpu03``).

    >>> first_host("node[07-09,12]")
    'node07'
    >>> first_host("a1,b2")
    'a1'
    """
    match = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise LaunchError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """This process's rank layout from its environment (the module docstring's order)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                         local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                         master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                         master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29511, source="launcher")
    if "SLURM_STEP_NUM_TASKS" in env and _int(env, "SLURM_STEP_NUM_TASKS") > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_master_port(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
                         local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                         master_addr=first_host(nodes), master_port=port, source="slurm")
    if "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1 and "SLURM_STEP_ID" not in env:
        raise LaunchError(
            f"this SLURM job has SLURM_NTASKS={env['SLURM_NTASKS']} tasks but train.py runs in its batch script as "
            "one process: start it with srun (one process per task, e.g. `srun python train.py ...`), use the "
            "submitit launcher (hydra/launcher=slurm_gpu), or ask for one task")
    return LaunchEnv()


def export(layout: LaunchEnv, environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Set the ``env://`` variables of ``layout`` (for ranks taken from SLURM; a launcher's are already set)."""
    env = os.environ if environ is None else environ
    env.update(layout.variables())


def init_process_group(layout: LaunchEnv, timeout_min: float) -> None:
    """Join the default process group of ``layout`` (NCCL on GPUs, gloo on CPU), with ``timeout_min`` minutes
    as the time-out of every collective (a rank that waits longer for the others fails instead of hanging).
    Nothing to do for one process or when the group exists."""
    import torch
    import torch.distributed as dist

    if layout.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(layout.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=layout.rank, world_size=layout.world_size,
                            timeout=datetime.timedelta(minutes=timeout_min))
    log.info("rank %d of %d joined the process group (%s, %s:%d, from %s)", layout.rank, layout.world_size, backend,
             layout.master_addr, layout.master_port, layout.source)


def this_rank(env: Optional[Mapping[str, str]] = None) -> int:
    """This process's global rank: ``torch.distributed``'s once it is initialised, else ``RANK``, else
    ``SLURM_PROCID`` (a SLURM task before the process group exists), else 0; ``env`` instead of the process's
    environment (then the process group is not asked).

    ``LOCAL_RANK`` is deliberately ignored: it is 0 on every node. Raises ``ValueError`` for a non-integer
    ``RANK``/``SLURM_PROCID``.
    """
    if env is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
        env = os.environ
    for var in ("RANK", "SLURM_PROCID"):
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            return int(raw)
        except ValueError as err:
            raise ValueError(f"environment variable {var} must be an integer rank, got {raw!r}") from err
    return 0


def world_size() -> int:
    """Ranks of the default process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; ``obj`` itself on one process)."""
    import torch.distributed as dist

    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(obj: Any) -> list:
    """Every rank's ``obj`` in rank order on every rank (``[obj]`` on one process)."""
    import torch.distributed as dist

    if world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s contiguous share of ``n`` items; shares differ by at most one item.

    >>> [shard_bounds(5, r, 2) for r in range(2)]
    [(0, 2), (2, 5)]
    """
    return rank * n // world_size, (rank + 1) * n // world_size


def share_batches(costs: list[float], world: int) -> list[list[int]]:
    """Batch indices per rank: batches (with their cost, e.g. rows x tokens) go one by one, most costly first,
    to the rank with the least work so far (ties: the lowest rank). Deterministic, so every rank computes the
    same split.

    >>> share_batches([5, 1, 4, 2], 2)
    [[0, 1], [2, 3]]
    """
    loads = [0.0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for b in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda k: (loads[k], k))
        shares[r].append(b)
        loads[r] += costs[b]
    return shares
