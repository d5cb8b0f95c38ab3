"""``lowscore_replay``: the control for OPR. The same prompts and rollouts, but the *lowest*-scored rollout of
each prompt is replayed. If OPR's gain came from replaying any on-policy text, this would match it; if it comes
from replaying *good* on-policy text, this should forget as much as (or more than) ``seq_sft``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from opr.methods.opr import OnPolicyReplay


@dataclass
class LowScoreReplay(OnPolicyReplay):
    name: str = "lowscore_replay"
    # Keep the worst rollout of each prompt, whatever its reward (a threshold here would be a maximum).
    min_reward: Optional[float] = None
    order: str = "lowest"
