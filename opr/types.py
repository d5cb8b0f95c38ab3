"""Plain data types shared by benchmarks, methods, the trainer and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

# A reward maps (model prediction, the example it answers) to a score on the 0-100 scale.
# Evaluation and OPR's rollout filter call the same function.
Reward = Callable[[str, "Example"], float]


@dataclass(frozen=True)
class Example:
    """One prompt with its gold answer.

    ``id`` is stable across runs and orderings (``{task}/{split}/{index}`` for generated data);
    every score is keyed by it. ``source`` carries the text a metric needs besides the
    reference (SARI's source sentence), ``None`` when no metric needs it.
    """

    id: str
    task: str
    prompt: str
    answer: str
    source: Optional[str] = None


@dataclass
class Task:
    """One task of a stream: its splits, its reward, and how to prompt for it."""

    name: str
    train: list[Example]
    eval: list[Example]
    test: list[Example] = field(default_factory=list)
    reward: Reward = None  # type: ignore[assignment]
    # Max new tokens when generating an answer for this task (evaluation and rollouts).
    max_new_tokens: int = 32
    # True when the raw prompt should be wrapped in the backbone's chat template.
    chat: bool = True
    # Optional check of the answer *format* (not correctness): used for formatting-artifact rates.
    format_ok: Optional[Callable[[str], bool]] = None
    # Optional stricter *acceptance* check for replay filtering (content right, not just a metric above a
    # threshold: a copied source passes SARI >= 50, a flipped verdict passes ROUGE-L >= 50). Evaluation never
    # uses it; OPR's filter does where ``method.accept`` is on.
    accept: Optional[Callable[[str, Example], bool]] = None


@dataclass(frozen=True)
class SFTExample:
    """A (prompt, response) pair trained with completion-only loss.

    ``origin`` says where the response came from: ``gold`` (the dataset answer),
    ``rollout`` (the model's own sample, OPR), ``rewrite`` (SDFT) ...; kept for statistics.
    ``response_ids``, when given, are the response's token ids as the model sampled them (EOS excluded): the
    trainer uses them instead of re-encoding ``response``, so an on-policy sample is trained on its own tokens.
    ``finished`` is False for a response cut at the token limit: it is trained without EOS (the model did not
    choose to stop there).
    """

    prompt: str
    response: str
    task: str
    chat: bool = True
    origin: str = "gold"
    example_id: str = ""
    response_ids: Optional[tuple[int, ...]] = None
    finished: bool = True


@dataclass
class Benchmark:
    """An ordered task stream plus held-out general-ability sets (never trained on)."""

    name: str
    tasks: list[Task]
    general: list[Task] = field(default_factory=list)
    # Per task and split: record count and content hash, so a run says which data it saw.
    manifest: dict = field(default_factory=dict)
