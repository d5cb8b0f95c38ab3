"""Which phrases a training method amplifies in the model's answers (formatting artifacts, "Denser != Better").

A method that distils the model's own samples can teach a register rather than the task: the same opening
phrase, or the same filler, in a growing share of the answers. These pure functions measure that on two sets
of answers to the same prompts (before and after training): for each word n-gram, the *share of answers that
contain it* before and after, and the n-grams whose share rose the most. Openings (the first n words) are
counted separately, because a collapsed register shows first in how every answer starts.

Words are lower-cased runs of letters and digits (punctuation dropped), so "The answer is fear." and
"the answer is joy" share the opening "the answer is".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["NgramShift", "words", "ngram_shares", "amplified_ngrams"]

WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (letters and digits; punctuation and spacing dropped)."""
    return WORD.findall(text.lower())


def _grams(tokens: Sequence[str], n: int, opening: bool) -> set[tuple[str, ...]]:
    if opening:
        return {tuple(tokens[:n])} if len(tokens) >= n else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def ngram_shares(answers: Iterable[str], n: int, opening: bool = False) -> dict[tuple[str, ...], float]:
    """Share (0-1) of ``answers`` that contain each word n-gram (``opening``: that start with it); an answer
    counts once per n-gram however often it repeats it. Empty for no answers."""
    answers = list(answers)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts: Counter = Counter()
    for text in answers:
        counts.update(_grams(words(text), n, opening))
    return {gram: c / len(answers) for gram, c in counts.items()} if answers else {}


@dataclass(frozen=True)
class NgramShift:
    ngram: str        # the words joined by spaces
    before: float     # share of the answers before training that contain it (0-1)
    after: float      # the same after training

    @property
    def rise(self) -> float:
        return self.after - self.before


def amplified_ngrams(
    before: Sequence[str], after: Sequence[str], n: int = 3, top: int = 5, opening: bool = False,
    min_after: float = 0.1,
) -> list[NgramShift]:
    """The ``top`` n-grams whose share of answers rose the most from ``before`` to ``after`` (largest rise
    first; ties by n-gram text), among those in at least ``min_after`` of the answers after. Only rises count:
    an empty list means no phrase spread."""
    b, a = ngram_shares(before, n, opening), ngram_shares(after, n, opening)
    shifts = [NgramShift(" ".join(g), b.get(g, 0.0), s) for g, s in a.items() if s >= min_after and s > b.get(g, 0.0)]
    shifts.sort(key=lambda x: (-x.rise, x.ngram))
    return shifts[:top]
