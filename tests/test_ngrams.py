"""Amplified n-grams: shares of answers containing a phrase, before and after, on hand-counted examples."""

import json

import pytest

from opr.metrics.ngrams import amplified_ngrams, ngram_shares, words


def test_words_lower_case_and_drop_punctuation():
    assert words("The answer is FEAR. (42)") == ["the", "answer", "is", "fear", "42"]


def test_shares_count_each_answer_once():
    shares = ngram_shares(["a b a b", "a b c", "c d"], n=2)
    assert shares[("a", "b")] == pytest.approx(2 / 3)  # twice in the first answer, counted once
    assert shares[("c", "d")] == pytest.approx(1 / 3)
    assert ngram_shares([], 2) == {}


def test_openings_count_only_the_start():
    shares = ngram_shares(["The answer is joy.", "Joy. The answer is joy", "answer"], n=3, opening=True)
    assert shares == {("the", "answer", "is"): pytest.approx(1 / 3), ("joy", "the", "answer"): pytest.approx(1 / 3)}


def test_amplified_opening_phrase():
    before = ["joy", "It is fear.", "sadness", "I think anger"]
    after = ["I'd be happy to help: joy", "I'd be happy to help you", "I'd be happy to", "fear"]
    shifts = amplified_ngrams(before, after, n=3, top=2, opening=True)
    assert [s.ngram for s in shifts] == ["i d be"]
    assert (shifts[0].before, shifts[0].after, shifts[0].rise) == (0.0, 0.75, 0.75)
    # anywhere in the answer: "i d be", "d be happy", "be happy to" rose from 0 to 3/4, "happy to help" to 2/4,
    # "to help joy" and "to help you" to 1/4 each; ties by text
    inside = amplified_ngrams(before, after, n=3, top=5)
    assert [s.ngram for s in inside] == ["be happy to", "d be happy", "i d be", "happy to help", "to help joy"]
    assert [s.after for s in inside[3:]] == [0.5, 0.25]


def test_falling_and_rare_phrases_are_not_listed():
    before = ["the answer is joy", "the answer is fear"]
    after = ["the answer is joy", "joy"]
    assert amplified_ngrams(before, after, n=3) == []  # "the answer is" fell from 1 to 1/2
    assert amplified_ngrams(["x"], ["a b c"] + ["z"] * 19, n=3, min_after=0.1) == []  # 1/20 < 0.1
    with pytest.raises(ValueError, match="n must be >= 1"):
        ngram_shares(["a"], 0)


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in rows))


def test_tool_compares_each_stage_with_stage0(tmp_path, capsys):
    from opr.tools import ngrams

    run = tmp_path / "run"
    _write(run / "predictions/stage0/emotion.jsonl", [("a", "joy"), ("b", "fear"), ("c", "anger"), ("d", "x")])
    _write(run / "predictions/stage1/emotion.jsonl",
           [("a", "Sorry, I can't: joy"), ("b", "Sorry, I can't"), ("c", "anger"), ("e", "Sorry, I can't")])
    assert ngrams.main([str(run), "--n", "2", "--opening", "--out", str(tmp_path / "o.json")]) == 0
    out = capsys.readouterr().out
    # ids a, b, c are in both stages (e is new, d is gone): 2 of 3 answers open with "sorry i"
    assert "stage 1 emotion (3 answers): 'sorry i' 0% -> 67%" in out
    rows = json.loads((tmp_path / "o.json").read_text())[str(run)]
    assert rows[0]["shifts"] == [{"ngram": "sorry i", "before": 0.0, "after": pytest.approx(2 / 3)}]
    # a copy without stage 0 is refused with its reason
    only_last = tmp_path / "copy"
    _write(only_last / "predictions/stage3/emotion.jsonl", [("a", "joy")])
    assert ngrams.main([str(only_last)]) == 2
    assert "no predictions/stage0" in capsys.readouterr().err
