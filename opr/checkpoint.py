"""Stage checkpoints: a folder per stage that plain ``transformers.from_pretrained`` loads.

A checkpoint is written under a temporary name and renamed into place only when complete (with a
``stage.json`` marker inside), so a run killed while saving never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from opr.backbones import Backbone

MARKER = "stage.json"


@contextlib.contextmanager
def cleaned_up(tmp: Path, what: str):
    """Writing ``what`` into the temporary folder ``tmp``: on any failure the folder is removed, and a write
    error (a full disk shows up in torch as "unexpected pos ... vs ...") is re-raised as an ``OSError`` that
    names the folder and the free space left, instead of the library's message alone."""
    try:
        yield
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, RuntimeError)):
            free = shutil.disk_usage(tmp.parent).free / 2**20
            raise OSError(errno.ENOSPC if free < 64 else getattr(err, "errno", None) or errno.EIO,
                          f"could not write {what} to {tmp.parent} ({type(err).__name__}: {err}); "
                          f"{free:.0f} MiB free on that disk" + (": no space left" if free < 64 else "")) from err
        raise


def stage_dir(root: Path, stage: int, phase: Optional[str] = None) -> Path:
    """``stage{t}``, or ``stage{t}_{phase}`` for the end of a phase inside the stage (``sft_then_grpo``)."""
    return root / (f"stage{stage}" if phase is None else f"stage{stage}_{phase}")


def phase_dirs(root: Path, stage: int) -> list[Path]:
    """The phase checkpoint folders of ``stage`` (``stage{t}_<phase>``)."""
    return sorted(root.glob(f"stage{stage}_*")) if root.exists() else []


def save_stage(root: Path, stage: int, backbone: Backbone, info: dict, keep_last: int = 0,
               phase: Optional[str] = None) -> Path:
    """Save model + tokenizer for ``stage`` (or for the end of its phase ``phase``, in ``stage{t}_{phase}``);
    a stage's save keeps only the ``keep_last`` newest stages (0 keeps all), their phase folders with them."""
    if phase is not None and not phase.isidentifier():
        raise ValueError(f"a phase name is a plain word (it names the folder stage{stage}_<phase>), got {phase!r}")
    root.mkdir(parents=True, exist_ok=True)
    final = stage_dir(root, stage, phase)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    what = f"the checkpoint of stage {stage}" + (f" after its {phase} phase" if phase else "")
    with cleaned_up(tmp, what):
        backbone.model.save_pretrained(tmp)
        backbone.tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"stage": stage, **info}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep_last > 0 and phase is None:
        for old in complete_stages(root)[:-keep_last]:
            for folder in [stage_dir(root, old)] + phase_dirs(root, old):
                shutil.rmtree(folder, ignore_errors=True)
    return final


def complete_stages(root: Path) -> list[int]:
    """Stages with a complete (stage-end) checkpoint folder, ascending; phase folders (``stage{t}_sft``) are
    not stages."""
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("stage") and p.name[5:].isdigit() and (p / MARKER).exists():
            found.append(int(p.name[5:]))
    return sorted(found)


def latest_stage(root: Path) -> Optional[int]:
    stages = complete_stages(root)
    return stages[-1] if stages else None


# ---------------------------------------------------------------------------------------------------------
# Resumable training state.
#
# ``<run_dir>/train_state/s<seq>/`` holds everything needed to continue a run exactly where it stopped:
#   state.pt      model weights, optimizer state, trainer counters, data position (epoch, batch index),
#                 RNG states (python, numpy, torch)  -- a torch pickle (``torch.load(weights_only=False)``)
#   examples.json the stage's training examples, so replay data / rollouts are reused rather than rebuilt
#   results.json  results.json as it was when the state was taken
#   ranks/        (DeepSpeed, mid-stage) rank<r>.pt: each rank's own ZeRO optimizer partition
#   COMPLETE      written last; a folder without it (a save that was killed) is never used
# A state is written into a temporary folder and renamed into place, then older states are deleted.

STATE_DIR = "train_state"
STATE_MARKER = "COMPLETE"


def _state_folders(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / STATE_DIR
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("s") and p.name[1:].isdigit():
            found.append((int(p.name[1:]), p))
    return sorted(found)


def latest_train_state(run_dir: Path) -> Optional[Path]:
    """The newest complete training-state folder of ``run_dir`` (with its marker), or None."""
    complete = [p for _, p in _state_folders(run_dir) if (p / STATE_MARKER).exists()]
    return complete[-1] if complete else None


RANKS_DIR = "ranks"


def write_rank_state(run_dir: Path, global_step: int, rank: int, state: dict) -> Path:
    """Write one rank's part of a training state (its ZeRO optimizer partition) into a staging folder that
    :func:`save_train_state` then moves into the state (every rank calls this, then the ranks meet at a barrier
    before rank 0 saves). Returns the staging folder, the same on every rank."""
    import torch

    staging = Path(run_dir) / STATE_DIR / f".ranks-{global_step:09d}"
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f".rank{rank}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, staging / f"rank{rank}.pt")
    return staging


def save_train_state(run_dir: Path, state: dict, examples: Optional[list[dict]], results: dict,
                     info: dict, rank_states: Optional[Path] = None) -> Path:
    """Write a complete training state atomically; returns its folder.

    ``state`` is torch-pickled (tensors, optimizer state dicts, RNG states); ``examples`` (JSON-able dicts, or
    None between stages) and ``results`` are written as JSON; ``info`` (JSON-able: stage, step, kind) goes
    into the marker, written last. ``rank_states`` (a folder from :func:`write_rank_state`, every rank's file
    in it) is moved in as ``ranks/``. Older states and leftovers of killed saves are removed afterwards.
    """
    import torch

    root = Path(run_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    folders = _state_folders(run_dir)
    seq = folders[-1][0] + 1 if folders else 0
    tmp = root / f".tmp-s{seq:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with cleaned_up(tmp, "a training state"):
        torch.save(state, tmp / "state.pt")
        (tmp / "examples.json").write_text(json.dumps(examples, ensure_ascii=False))
        (tmp / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
        if rank_states is not None:
            os.replace(rank_states, tmp / RANKS_DIR)
        with open(tmp / STATE_MARKER, "w") as f:  # last: its presence means every other file is complete
            f.write(json.dumps({"seq": seq, **info}, indent=1))
            f.flush()
            os.fsync(f.fileno())
    final = root / f"s{seq:06d}"
    os.replace(tmp, final)
    for other in root.iterdir():  # older states, and temporary folders of saves that were killed
        leftover = other.name.startswith((".tmp-", ".ranks-", "s"))
        if other != final and other.is_dir() and leftover:
            shutil.rmtree(other, ignore_errors=True)
    return final


def load_train_state(folder: Path) -> dict:
    """Read a folder written by :func:`save_train_state`: ``{"state", "examples", "results", "info", "folder"}``."""
    import torch

    folder = Path(folder)
    if not (folder / STATE_MARKER).exists():
        raise FileNotFoundError(f"{folder} has no {STATE_MARKER} marker: an incomplete training state")

    def read(name: str, load):
        try:
            return load(folder / name)
        except Exception as err:  # truncated pickle, bad JSON, unreadable file: name the file
            raise CorruptTrainState(f"{folder / name} is unreadable ({type(err).__name__}: {err})") from err

    return {
        # memory-mapped: the ranks of a node that read one state share its pages instead of a copy each
        "state": read("state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=False, mmap=True)),
        "examples": read("examples.json", lambda f: json.loads(f.read_text())),
        "results": read("results.json", lambda f: json.loads(f.read_text())),
        "info": read(STATE_MARKER, lambda f: json.loads(f.read_text())),
        "folder": folder,
    }


class CorruptTrainState(ValueError):
    """A training state folder is complete (marker present) but one of its files cannot be read."""


def state_folders_without_marker(run_dir: Path) -> list[Path]:
    """Training-state folders whose ``COMPLETE`` marker is missing (killed saves are ``.tmp-``, not these)."""
    return [p for _, p in _state_folders(run_dir) if not (p / STATE_MARKER).exists()]
