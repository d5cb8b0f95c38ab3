"""Tests of opr.metrics.text against hand-computed values and values of TRACE's own packages.

"TRACE value" below means the number TRACE's evaluation code gives for that pair: ``rouge`` 1.0.1
(``Rouge(metrics=["rouge-l"]).get_scores(reference, prediction)``), ``fuzzywuzzy`` 0.18 ``fuzz.ratio``
without python-Levenshtein, and HF ``load_metric("sari")``; they were computed once with those
packages and are written here as constants (the packages are not dependencies of the project).
"""

from __future__ import annotations

import pickle

import pytest

from opr.metrics import text as M
from opr.types import Example

# F of two equal texts in the ``rouge`` package: 2 * 1 * 1 / (1 + 1 + 1e-8).
ROUGE_ONE = 100 * 2.0 / (2.0 + 1e-8)


# ------------------------------------------------------------------------------------- exact_match
@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("B", "B", 100.0),
        ("6", "6", 100.0),
        ("August", "August", 100.0),
        (" B", "B", 0.0),  # no stripping, as in TRACE
        ("B\n", "B", 0.0),
        ("b", "B", 0.0),  # case-sensitive
        ("6.0", "6", 0.0),  # strings, not numbers
        ("", "", 0.0),  # empty pair scores 0 in TRACE's caculate_accuracy
        ("", "B", 0.0),
        ("B", "", 0.0),
        ("支持", "支持", 100.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert M.exact_match(prediction, reference) == expected


# ----------------------------------------------------------------------------- first_char_accuracy
@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("B\nBecause the clause stands alone.", "B\nA clause is a group of words.", 100.0),
        ("B", "B\nA clause is a group of words.\nAn independent clause ...", 100.0),
        ("A\nA clause is a group of words.", "B\nA clause is a group of words.", 0.0),
        (" B\nexplanation", "B\nexplanation", 0.0),  # leading space: first char is " "
        ("\nB", "B\nx", 0.0),
        ("b\nx", "B\nx", 0.0),
        ("", "B\nx", 0.0),  # TRACE would raise IndexError; empty scores 0
        ("B", "", 0.0),
    ],
)
def test_first_char_accuracy(prediction: str, reference: str, expected: float) -> None:
    assert M.first_char_accuracy(prediction, reference) == expected


# ----------------------------------------------------------------------------------------- rouge_l
def test_rouge_l_identical_is_rouge_packages_one() -> None:
    # 5 distinct words each side, LCS covers all: R = P = 1, F = 2 / (2 + 1e-8).
    assert M.rouge_l("the cat sat on the mat", "the cat sat on the mat") == ROUGE_ONE
    assert M.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(99.9999995)


def test_rouge_l_partial_overlap_hand_computed() -> None:
    # prediction words {the, cat, sat} (m = 3); reference {the, cat, sat, on, mat} (n = 5);
    # LCS words {the, cat, sat} = 3 -> R = 1, P = 3/5, F = 2 * 0.6 / 1.6 = 0.75.
    assert M.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(75.0, abs=1e-5)
    assert M.rouge_l("the cat sat on the mat", "the cat sat") == pytest.approx(75.0, abs=1e-5)


def test_rouge_l_is_case_sensitive_and_splits_on_dots() -> None:
    # "The cat sat on the mat." -> one sentence (the empty piece after the dot is dropped);
    # distinct words {The, cat, sat, on, the, mat} = 6 vs {the, cat, sat, on, mat} = 5;
    # LCS = cat sat on the mat -> 5 words: R = 5/6, P = 1, F = 10/11. TRACE value 0.9090909041322315.
    assert M.rouge_l("The cat sat on the mat.", "the cat sat on the mat") == pytest.approx(
        100 * 0.9090909041322315, rel=1e-12
    )


def test_rouge_l_counts_distinct_words_like_rouge_package() -> None:
    # Prediction sentences "a b a b" and "c": distinct words {a, b, c}; reference "b a c": {b, a, c}.
    # LCS("a b a b", "b a c") = "b a" and LCS("c", "b a c") = "c" -> union {a, b, c} -> F = 1.
    # (rouge-score would give 75: it counts word occurrences, not distinct words.)
    assert M.rouge_l("a b a b. c", "b a c") == ROUGE_ONE


def test_rouge_l_tie_break_of_the_lcs_matches_rouge_package() -> None:
    # Both LCSs have length 2, but the rouge package's backtrack picks "a c" (words {a, c}) when the
    # prediction plays the package's "reference" role, as in TRACE: F = 1. TRACE value 0.999999995.
    assert M.rouge_l("a a c", "a c a") == ROUGE_ONE
    # With the roles swapped the backtrack finds "a a" (words {a}) -> R = P = 1/2. TRACE value for
    # prediction "a c a", reference "a a c": 0.4999999950000001.
    assert M.rouge_l("a c a", "a a c") == pytest.approx(49.99999950000001, rel=1e-12)


def test_rouge_l_whitespace_piece_becomes_empty_word() -> None:
    # "a b. " -> sentences "a b" and "" (the " " piece collapses to the empty word ""):
    # m = |{a, b, ""}| = 3, n = 2, LCS words {a, b}: R = 2/3, P = 1, F = 0.8.
    assert M.rouge_l("a b. ", "a b") == pytest.approx(80.0, abs=1e-5)
    # Extra spaces and newlines inside a sentence are collapsed.
    assert M.rouge_l("the  cat\n sat", "the cat sat") == ROUGE_ONE


@pytest.mark.parametrize(("prediction", "reference"), [("", "a b"), ("a b", ""), ("", ""), ("...", "a b")])
def test_rouge_l_empty_or_no_sentence_is_zero(prediction: str, reference: str) -> None:
    assert M.rouge_l(prediction, reference) == 0.0


def test_rouge_l_no_overlap_is_zero() -> None:
    assert M.rouge_l("x y z", "a b c") == 0.0


def test_rouge_l_meetingbank_like_text() -> None:
    ref = "AN ORDINANCE relating to regulatory business and professional license fees; adjusting fees."
    pred = "AN ORDINANCE relating to license fees. Adjusting the fees."
    # TRACE value (rouge 1.0.1): 0.5999999952.
    assert M.rouge_l(pred, ref) == pytest.approx(100 * 0.5999999952, rel=1e-12)


# --------------------------------------------------------------------------------- edit_similarity
@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("x = <NUM_LIT>", "x = 0"),
        ("x = <NUM_LIT:200>", "x = 200"),
        ("s = '<STR_LIT>'", "s = ''"),
        ("s = '<STR_LIT:/>' + '<STR_LIT:a b>'", "s = '/' + 'a b'"),
        ("c = '<CHAR_LIT>' ; d = '<CHAR_LIT:x>'", "c = '' ; d = 'x'"),
        ("f ( <NUM_LIT:1> , <NUM_LIT:1> )", "f ( 1 , 1 )"),
        ("<EOL> for x in y :", "<EOL> for x in y :"),  # other tags untouched
    ],
)
def test_normalize_py150(code: str, expected: str) -> None:
    assert M.normalize_py150(code) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("for sheet in self . worksheets :", "for sheet in self . worksheets :", 100.0),
        ("x = <NUM_LIT:1>", "x = 1", 100.0),  # equal after normalisation
        ("return <NUM_LIT>", "return 0", 100.0),
        ("abcd", "abce", 75.0),  # 3 matching chars: 2 * 3 / 8
        ("x=1", "x = 1", 75.0),  # 3 matching chars: 2 * 3 / 8
        ("abcdefgh", "hijklmno", 12.0),  # 2 * 1 / 16 = 12.5 -> round half to even = 12
        ("bcb", "cab", 33.0),  # difflib's greedy blocks: 1 match (rapidfuzz's LCS ratio would give 66.7)
        ("<STR_LIT>", "<STR_LIT>", 0.0),  # both empty after normalisation: TRACE skips -> 0
        ("<STR_LIT>", "x", 0.0),
        ("", "x = 1", 0.0),
        ("x = 1", "", 0.0),
    ],
)
def test_edit_similarity(prediction: str, reference: str, expected: float) -> None:
    assert M.edit_similarity(prediction, reference) == expected


def test_edit_similarity_trace_values() -> None:
    # TRACE values (fuzzywuzzy 0.18 fuzz.ratio on difflib, after eval_Py150.postprocess).
    assert M.edit_similarity("self . assertEqual ( x , <NUM_LIT:1> )", "self . assertEqual ( y , 1 )") == 96.0
    assert M.edit_similarity("return self . name", "for sheet in self . worksheets :") == 52.0


# ---------------------------------------------------------------------------------------------- sari
def test_sari_perfect_simplification_is_100() -> None:
    # Every keep / delete / add score is 1 at every n (hand-computed, see the 4-gram case: the
    # output and reference have no 4-gram, so keep and add use 0/0 = 1; the deleted 4-gram is good).
    assert M.sari("Der Hund bellt", "Der Hund bellt", "Der Hund bellt laut") == pytest.approx(100.0)


def test_sari_copying_the_source_hand_computed() -> None:
    # Keep F1 per n: 6/7, 4/5, 2/3, 0 (P = 3/4, 2/3, 1/2, 0 with R = 1); deletion 1; addition 1.
    # SARI = (61/105 + 1 + 1) / 3 = 271/315.
    value = M.sari("Der Hund bellt laut", "Der Hund bellt", "Der Hund bellt laut")
    assert value == pytest.approx(100 * 271 / 315, rel=1e-12)


def test_sari_empty_prediction_is_not_zero() -> None:
    # TRACE passes empty predictions to the metric: the output is the single empty token.
    # keep per n: 0, 0, 0, 1; deletion: 1/4, 1/3, 1/2, 1; addition: 0, 1, 1, 1 -> 73/144.
    value = M.sari("", "Der Hund bellt", "Der Hund bellt laut")
    assert value == pytest.approx(100 * 73 / 144, rel=1e-12)


def test_sari_lowercases_and_tokenizes_13a() -> None:
    # Case and punctuation attached to words do not matter after lower-casing + 13a tokenisation.
    a = M.sari(
        "Die Stadt Zürich baut eine Brücke.", "Zürich baut eine Brücke.", "Die Stadt Zürich baut heute."
    )
    b = M.sari(
        "die stadt zürich baut eine brücke .", "zürich baut eine brücke .", "die stadt zürich baut heute ."
    )
    assert a == b


def test_sari_german_trace_values() -> None:
    # TRACE values (HF sari: 13a tokeniser of sacrebleu, one reference).
    source = (
        "Provide a simplified version of the following paragraph in German.\n\nParagraph:\n"
        "Der Regierungsrat des Kantons Zürich hat am Dienstag beschlossen, die Gebühren für "
        "Führerausweise zu erhöhen.\n\nSimplification:"
    )
    reference = "Im Kanton Zürich werden die Gebühren für Führerausweise teurer."
    prediction = "Der Kanton Zürich erhöht die Gebühren für den Führerausweis."
    assert M.sari(prediction, reference, source) == pytest.approx(54.308871205422925, rel=1e-12)
    assert M.sari(reference, reference, source) == pytest.approx(99.65277777777779, rel=1e-12)


# ------------------------------------------------------------------------------------------ registry
def test_registry_and_needs_source() -> None:
    assert set(M.METRICS) == {"exact_match", "first_char_accuracy", "rouge_l", "edit_similarity", "sari"}
    assert M.needs_source("sari") is True
    for name in ("exact_match", "first_char_accuracy", "rouge_l", "edit_similarity"):
        assert M.needs_source(name) is False
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*allowed"):
        M.needs_source("bleu")


def test_compute_dispatches_and_checks_source() -> None:
    assert M.compute("exact_match", "A", "A") == 100.0
    assert M.compute("sari", "Der Hund bellt", "Der Hund bellt", "Der Hund bellt laut") == pytest.approx(
        100.0
    )
    with pytest.raises(ValueError, match="needs a source"):
        M.compute("sari", "a", "b")
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute("accuracy", "a", "b")


def test_make_reward_uses_example_answer_and_source_and_pickles() -> None:
    ex = Example(id="t/test/0", task="t", prompt="p", answer="B\nbecause", source=None)
    reward = M.make_reward("first_char_accuracy")
    assert reward("B\nother", ex) == 100.0
    assert pickle.loads(pickle.dumps(reward))("A", ex) == 0.0

    sari_reward = M.make_reward("sari")
    ex_src = Example(
        id="s/test/0", task="s", prompt="p", answer="Der Hund bellt", source="Der Hund bellt laut"
    )
    assert sari_reward("Der Hund bellt", ex_src) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="t/test/0"):
        sari_reward("x", ex)
    with pytest.raises(ValueError, match="unknown metric"):
        M.make_reward("nope")


@pytest.mark.parametrize("name", sorted(M.METRICS))
def test_every_metric_is_in_range_on_arbitrary_text(name: str) -> None:
    texts = [
        "",
        " ",
        "\n\n",
        "...",
        "A",
        "Hello, world.",
        "Grüezi mitenand! Das ist gut.",
        "数学 123",
        "<STR_LIT>",
    ]
    for p in texts:
        for r in texts:
            v = M.compute(name, p, r, "Quelle: Das ist ein Satz." if M.needs_source(name) else None)
            assert isinstance(v, float)
            assert 0.0 <= v <= 100.0
