"""Continual-learning methods, one small module each.

A method says how a stage's training data (or loss) is built: ``stage_data(ctx)`` returns the stage's
:class:`StageData`, and ``train_stage(ctx, data)`` trains on it (SFT methods use the shared
:func:`train_sft`). The loop, trainer, rollout and evaluation are shared and never re-implemented here.
A method class also declares whether a run reads the replay ``budget``: ``uses_budget(options)``, a
classmethod taking the method's config options (``opr.config.budget_applies`` asks it for stored runs).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Optional

# The method classes by name, for method configs without a ``_target_`` (hand-written ones; a run's config
# names its target, and a new method needs no entry here).
BY_NAME: dict[str, str] = {
    "seq_sft": "opr.methods.seq_sft.SequentialSFT",
    "vanilla_replay": "opr.methods.vanilla_replay.VanillaReplay",
    "opr": "opr.methods.opr.OnPolicyReplay",
    "lowscore_replay": "opr.methods.lowscore_replay.LowScoreReplay",
    "sdft": "opr.methods.sdft.SDFT",
    "self_distill": "opr.methods.self_distill.SelfDistill",
    "grpo": "opr.methods.grpo.GRPO",
    "sft_then_grpo": "opr.methods.sft_then_grpo.SFTThenGRPO",
}


def _class_at(path: str) -> Optional[type]:
    """The class at dotted ``path``; None when there is no such module or class (other code's method). A
    module that exists but fails to import (a package missing) raises."""
    module, _, attr = path.rpartition(".")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            return None
        raise
    return getattr(found, attr, None)


def method_class(method: Mapping) -> Optional[type]:
    """The class of a method config (a plain mapping, e.g. results.json's ``config.method``): its
    ``_target_``, else its ``name`` through :data:`BY_NAME`; None when neither is a class here."""
    for path in (method.get("_target_"), BY_NAME.get(method.get("name"))):
        found = _class_at(path) if isinstance(path, str) and "." in path else None
        if found is not None:
            return found
    return None
