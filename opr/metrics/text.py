"""Per-example text metrics on the 0-100 scale, reproducing TRACE's evaluation code.

TRACE (Wang et al., 2023; GitHub ``BeyonderXX/TRACE``, ``metrics.py`` and ``evaluations/eval_*.py``)
scores a task as the mean over examples of a per-example value, where a pair with an empty
prediction or an empty reference contributes 0 but still counts in the denominator
(``caculate_accuracy``, ``caculate_rouge`` and ``caculate_fuzz`` all ``continue`` on empty strings and
divide by ``len(results)``). Each function here returns that per-example value times 100, so the
mean of these values over a task equals TRACE's task score times 100 (SARI is already 0-100 in TRACE).

TRACE applies no stripping or other post-processing to the generated text: it decodes the new tokens
with ``skip_special_tokens=True, clean_up_tokenization_spaces=False`` (``inference/infer_single.py``) and
compares the raw strings. The functions below do the same; a caller that wants leniency (e.g. stripping
a leading space) must do it before calling them.

Which behaviour each metric reproduces, and with what:

- ``exact_match``: ``caculate_accuracy`` (raw ``==``), plain Python.
- ``first_char_accuracy``: ``eval_ScienceQA.resolve`` (first character) + ``caculate_accuracy``.
- ``rouge_l``: ``score_rouge``, which calls the ``rouge`` package 1.0.1 (pltrdy) ROUGE-L F. Its
  summary-level ROUGE-L (sentences split on ``.``, space tokenisation, no lower-casing, *sets* of words)
  is not what ``rouge-score`` computes (which lower-cases, drops non-ASCII-alphanumerics and works on
  one sequence), so it is implemented here from its definition; tests compare it with values produced
  by ``rouge`` 1.0.1.
- ``edit_similarity``: ``eval_Py150.postprocess`` + ``caculate_fuzz`` = ``fuzzywuzzy.fuzz.ratio``.
  TRACE's requirements install ``fuzzywuzzy`` without ``python-Levenshtein``, so ``fuzz.ratio`` runs on
  the standard library's ``difflib.SequenceMatcher``; that is used here. (``rapidfuzz.fuzz.ratio`` is an
  exact-LCS (InDel) ratio and differs from difflib's greedy matching on some pairs, so it is not used.)
- ``sari``: ``caculate_sari`` = HF ``datasets.load_metric("sari")``: lower-case, sacrebleu's ``13a``
  tokeniser (from the maintained ``sacrebleu`` package), then SARI (Xu et al., 2016) with the HF/
  tensor2tensor choices (0/0 = 1, the fixed keep recall, deletion precision only), one reference.
  The HF metric's corpus value is the mean of the per-sentence values, so the per-example value is exact.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from difflib import SequenceMatcher

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from opr.types import Example, Reward

__all__ = [
    "METRICS",
    "MetricReward",
    "compute",
    "edit_similarity",
    "exact_match",
    "first_char_accuracy",
    "make_reward",
    "needs_source",
    "normalize_py150",
    "rouge_l",
    "sari",
]


# --------------------------------------------------------------------------------------------------
# Accuracy-style metrics
# --------------------------------------------------------------------------------------------------


def exact_match(prediction: str, reference: str) -> float:
    """100 if ``prediction == reference`` exactly (no stripping, case-sensitive), else 0.

    Reproduces TRACE ``metrics.caculate_accuracy`` per example (C-STANCE, FOMC, NumGLUE-cm/ds):
    a pair where either string is empty scores 0.
    """
    if prediction == "" or reference == "":
        return 0.0
    return 100.0 if prediction == reference else 0.0


def first_char_accuracy(prediction: str, reference: str) -> float:
    """100 if the first characters of prediction and reference are equal, else 0 (ScienceQA).

    Reproduces TRACE ``eval_ScienceQA.resolve`` (answer = ``datium[0]``, so ``"B\\nBecause ..."`` is
    answer ``B``) followed by ``caculate_accuracy``. No stripping: a prediction starting with a space
    or newline scores 0 against a letter. TRACE raises ``IndexError`` on an empty prediction; here an
    empty prediction (or reference) scores 0, as ``caculate_accuracy`` does for empty strings.
    """
    if prediction == "" or reference == "":
        return 0.0
    return 100.0 if prediction[0] == reference[0] else 0.0


# --------------------------------------------------------------------------------------------------
# ROUGE-L as computed by the ``rouge`` package 1.0.1 (pltrdy), which TRACE uses
# --------------------------------------------------------------------------------------------------


def _rouge_sentences(text: str) -> list[list[str]]:
    """Split ``text`` the way ``rouge`` 1.0.1 ``Rouge.get_scores`` does, into lists of words.

    Pieces of ``text.split(".")`` of non-zero length are kept (a whitespace-only piece is kept too
    and becomes the single empty word ``""``), runs of whitespace collapse to one space, and words are
    the pieces of ``sentence.split(" ")``.
    """
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """One longest common subsequence of word lists ``x`` and ``y``, chosen as ``rouge`` 1.0.1 does.

    Dynamic programme over an ``(len(x)+1, len(y)+1)`` table; the backtrack from the end takes a
    match when the words are equal, otherwise moves up (drops ``x``'s word) only when that cell is
    strictly larger than the one to the left, else left. The tie-break matters because the caller
    keeps only the *set* of words of the subsequence.
    """
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi = x[i - 1]
        row, prev = table[i], table[i - 1]
        for j in range(1, m + 1):
            if xi == y[j - 1]:
                row[j] = prev[j - 1] + 1
            else:
                row[j] = max(prev[j], row[j - 1])
    words: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    words.reverse()
    return words


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure x 100, as TRACE computes it (MeetingBank's main score).

    TRACE's ``score_rouge(target, prediction)`` calls ``Rouge(metrics=["rouge-l"]).get_scores(target,
    prediction)`` from the ``rouge`` package 1.0.1, i.e. the reference is passed as the *hypothesis*
    and the prediction as the *reference*; the F-measure is symmetric in P and R, but the LCS
    tie-break is not, so the same roles are kept here. Summary-level ROUGE-L of that package with
    ``exclusive=True``:

    - m, n = numbers of *distinct* words in the prediction / reference (all sentences);
    - LCS_union = number of distinct words in the union, over all (prediction sentence, reference
      sentence) pairs, of the words of one LCS of the pair;
    - R = LCS_union / m, P = LCS_union / n, F = 2PR / (P + R + 1e-8)  (so identical texts give
      99.9999995, not 100).

    Empty prediction or reference -> 0 (``caculate_rouge`` skips the pair). A text with no sentence
    at all (only dots, e.g. ``"..."``) makes ``rouge`` raise ``ValueError``; it scores 0 here.
    """
    if prediction == "" or reference == "":
        return 0.0
    # Roles as in TRACE: "refs" = prediction, "hyps" = reference.
    ref_sents = _rouge_sentences(prediction)
    hyp_sents = _rouge_sentences(reference)
    if not ref_sents or not hyp_sents:
        return 0.0
    m = len({w for s in ref_sents for w in s})
    n = len({w for s in hyp_sents for w in s})
    union: set[str] = set()
    for ref_words in ref_sents:
        for hyp_words in hyp_sents:
            union.update(_lcs_words(ref_words, hyp_words))
    llcs = len(union)
    r_lcs = llcs / m
    p_lcs = llcs / n
    f_lcs = 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))
    return 100.0 * f_lcs


# --------------------------------------------------------------------------------------------------
# Py150 edit similarity (fuzzywuzzy fuzz.ratio on the pure-Python difflib path)
# --------------------------------------------------------------------------------------------------

_PY150_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.DOTALL)


def normalize_py150(code: str) -> str:
    """Replace Py150's literal placeholders as TRACE's ``eval_Py150.postprocess`` does.

    ``<NUM_LIT>`` -> ``0``, ``<STR_LIT>`` and ``<CHAR_LIT>`` -> empty, and ``<KIND_LIT:value>``
    (KIND in STR, NUM, CHAR) -> ``value``. As in TRACE, the valued placeholders are found once in
    the text left by the first step and each found placeholder is then replaced everywhere.
    """
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in _PY150_LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def edit_similarity(prediction: str, reference: str) -> float:
    """Py150 edit similarity in [0, 100] (an integer-valued float), as TRACE computes it.

    Both strings go through :func:`normalize_py150`; then, as ``caculate_fuzz`` + ``fuzz.ratio``
    (fuzzywuzzy 0.18 without python-Levenshtein): an empty string on either side -> 0 (checked after
    normalisation, so a prediction that is only ``<STR_LIT>`` scores 0), equal strings -> 100, else
    ``round(100 * difflib.SequenceMatcher(None, prediction, reference).ratio())`` with Python's
    round-half-to-even.
    """
    pred = normalize_py150(prediction)
    ref = normalize_py150(reference)
    if pred == "" or ref == "":
        return 0.0
    if pred == ref:
        return 100.0
    # fuzzywuzzy's utils.intr = int(round(x)); Python 3 round() is half-to-even and returns an int.
    return float(round(100 * SequenceMatcher(None, pred, ref).ratio()))


# --------------------------------------------------------------------------------------------------
# SARI (HF ``sari`` metric, one reference)
# --------------------------------------------------------------------------------------------------

_TOKENIZER_13A = Tokenizer13a()


def _sari_tokens(text: str) -> list[str]:
    """HF sari ``normalize``: lower-case, sacrebleu 13a tokenisation, split on single spaces.

    An empty text gives the single empty token ``[""]``, as ``"".split(" ")`` does in the HF code.
    """
    return _TOKENIZER_13A(text.lower()).split(" ")


def _ngrams(tokens: list[str], n: int) -> list[str]:
    """All contiguous n-grams of ``tokens`` as space-joined strings, in order (with repeats)."""
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    """Harmonic mean, 0 when both are 0."""
    if precision > 0 or recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _sari_ngram(source: list[str], output: list[str], reference: list[str]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) for one n-gram order, one reference.

    Multisets (``Counter``) S, C, R of source, output and reference n-grams; ``&`` is multiset
    minimum, ``-`` the positive part of the difference. Conventions of the HF / tensor2tensor SARI:
    an empty denominator set gives 1 (0/0 = 1); keep recall divides by the total count of S & R.
    """
    s, c, r = Counter(source), Counter(output), Counter(reference)

    # KEEP: n-grams of the source that the output kept, and those of them the reference kept too.
    kept = s & c
    kept_good = kept & r
    kept_all = s & r
    keep_p = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(kept_all.values()) if kept_all else 1.0
    keep = _f1(keep_p, keep_r)

    # DELETION: n-grams of the source the output dropped, and those the reference dropped too.
    deleted = s - c
    deleted_good = deleted - r
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0

    # ADDITION (on sets): n-grams new in the output, new in the reference, and both.
    added = set(c) - set(s)
    added_all = set(r) - set(s)
    added_good = added & set(r)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(added_all) if added_all else 1.0
    add = _f1(add_p, add_r)
    return keep, del_p, add


def sari(prediction: str, reference: str, source: str) -> float:
    """SARI x 100 of ``prediction`` (simplification of ``source``) against one ``reference``.

    Reproduces TRACE ``caculate_sari`` (20Minuten), i.e. HF ``load_metric("sari")`` with one
    reference per example: all three texts are lower-cased and 13a-tokenised; for n = 1..4 the keep
    F1, deletion precision and addition F1 are computed (:func:`_sari_ngram`); each is averaged over
    n and SARI = (keep + deletion + addition) / 3. Empty predictions are *not* special-cased (TRACE
    passes them to the metric), so ``sari("", ref, src)`` is usually above 0.

    In TRACE the ``source`` is the whole prompt given to the model (``batch['sources']``), not just
    the paragraph to simplify.
    """
    src_tok, out_tok, ref_tok = _sari_tokens(source), _sari_tokens(prediction), _sari_tokens(reference)
    keeps: list[float] = []
    dels: list[float] = []
    adds: list[float] = []
    for n in (1, 2, 3, 4):
        keep, dele, add = _sari_ngram(_ngrams(src_tok, n), _ngrams(out_tok, n), _ngrams(ref_tok, n))
        keeps.append(keep)
        dels.append(dele)
        adds.append(add)
    final = (sum(keeps) / 4 + sum(dels) / 4 + sum(adds) / 4) / 3
    return 100.0 * final


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "first_char_accuracy": first_char_accuracy,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari,
}

_NEEDS_SOURCE = frozenset({"sari"})


def _check_name(name: str) -> None:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(sorted(METRICS))}")


def needs_source(name: str) -> bool:
    """True when metric ``name`` takes a third ``source`` argument (SARI). Unknown name -> ValueError."""
    _check_name(name)
    return name in _NEEDS_SOURCE


def compute(name: str, prediction: str, reference: str, source: str | None = None) -> float:
    """Score one example with metric ``name`` (0-100); ``source`` is required iff ``needs_source``."""
    _check_name(name)
    fn = METRICS[name]
    if name in _NEEDS_SOURCE:
        if source is None:
            raise ValueError(f"metric {name!r} needs a source text, got None")
        return fn(prediction, reference, source)
    return fn(prediction, reference)


@dataclass(frozen=True)
class MetricReward:
    """A :data:`opr.types.Reward` ``(prediction, example) -> float`` scoring against ``example.answer``.

    A plain dataclass (not a closure) so it pickles across worker processes. For metrics that need a
    source (SARI) the example's ``source`` is used; an example without one raises ``ValueError``
    naming the example id.
    """

    metric: str

    def __post_init__(self) -> None:
        _check_name(self.metric)

    def __call__(self, prediction: str, example: Example) -> float:
        if self.metric in _NEEDS_SOURCE:
            if example.source is None:
                raise ValueError(
                    f"metric {self.metric!r} needs example.source; example {example.id!r} has none"
                )
            return METRICS[self.metric](prediction, example.answer, example.source)
        return METRICS[self.metric](prediction, example.answer)


def make_reward(name: str) -> Reward:
    """The reward scoring with metric ``name`` (see :class:`MetricReward`). Unknown name -> ValueError."""
    return MetricReward(name)
