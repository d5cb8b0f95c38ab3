"""Stage checkpoints: a folder per stage that plain ``transformers.from_pretrained`` loads.

A checkpoint is written under a temporary name and renamed into place only when complete (with a
``stage.json`` marker inside), so a run killed while saving never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from opr.backbones import Backbone

MARKER = "stage.json"


def stage_dir(root: Path, stage: int) -> Path:
    return root / f"stage{stage}"


def save_stage(root: Path, stage: int, backbone: Backbone, info: dict, keep_last: int = 0) -> Path:
    """Save model + tokenizer for ``stage``; keep only the ``keep_last`` newest stages (0 keeps all)."""
    root.mkdir(parents=True, exist_ok=True)
    final = stage_dir(root, stage)
    tmp = root / f".stage{stage}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.model.save_pretrained(tmp)
    backbone.tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"stage": stage, **info}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in complete_stages(root)[:-keep_last]:
            shutil.rmtree(stage_dir(root, old), ignore_errors=True)
    return final


def complete_stages(root: Path) -> list[int]:
    """Stages with a complete checkpoint folder, ascending."""
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
