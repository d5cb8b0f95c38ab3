"""sdft's keep rule (:func:`opr.methods.sdft.keep_rewrite`) and the rewrite measurement
(``python -m opr.analysis.sdft_rewrites``), checked by hand on the tiny backbone."""

from __future__ import annotations

import json

import pytest

from opr.analysis import sdft_rewrites as R
from opr.backbones import load_tiny
from opr.methods.sdft import DEFAULT_REWRITE_TEMPLATE, SDFT, keep_rewrite
from opr.rollout import Rollout
from opr.types import Example, Task


@pytest.mark.parametrize("text, reward, finished, require_finished, kept", [
    ("joy", 100.0, True, True, True),
    ("joy", 50.0, True, True, True),      # reward == min_reward is enough
    ("joy", 49.9, True, True, False),     # below min_reward
    ("", 100.0, True, True, False),       # empty rewrite
    ("joy", 100.0, False, True, False),   # cut at the token limit
    ("joy", 100.0, False, False, True),   # ... allowed when require_finished is off
    ("", 100.0, False, False, False),
])
def test_keep_rewrite_by_hand(text, reward, finished, require_finished, kept):
    assert keep_rewrite(text, reward, finished, 50.0, require_finished) is kept


def test_judge_scores_the_stripped_text():
    task = Task("t", [], [], reward=lambda p, e: 100.0 if p == p.strip() and p else 0.0, max_new_tokens=8)
    ex = Example("t/train/0", "t", "q", "gold")
    assert SDFT().judge(Rollout(ex, "  joy \n", 0.0, True), task, ex) == ("joy", 100.0, True)
    assert SDFT().judge(Rollout(ex, "  joy \n", 0.0, False), task, ex) == ("joy", 100.0, False)
    assert SDFT(require_finished=False).judge(Rollout(ex, " \n", 0.0, True), task, ex) == ("", 0.0, False)


def test_measure_counts_by_hand(monkeypatch):
    # four rewrites of known outcome: a copy of gold, a new text, a text cut at the limit, an empty text
    texts = [(" aaaa", True), ("bb", True), ("cc", False), (" ", True)]
    task = Task("toy", [Example(f"toy/train/{i}", "toy", f"Say {i}", "aaaa") for i in range(4)], [],
                reward=lambda p, e: 100.0 if p else 0.0, max_new_tokens=6)

    def fake(backbone, requests, tasks, *args, **kwargs):
        assert [r.prompt for r in requests] == [R.TEMPLATES["restate"].format(prompt=f"Say {i}", answer="aaaa")
                                                for i in range(4)]
        return [[Rollout(r, t, 0.0, f)] for r, (t, f) in zip(requests, texts)]

    monkeypatch.setattr(R, "sample_rollouts", fake)
    rows, shown = R.measure(load_tiny(), [task], 4, {"restate": R.TEMPLATES["restate"]}, shown=4)
    row = rows[0]
    assert (row["n"], row["limit"]) == (4, 6)
    assert row["kept"] == 0.5 and row["cut"] == 0.25 and row["identical"] == 0.25 and row["kept_new"] == 0.25
    assert row["mean_reward"] == 75.0  # 100, 100, 100, 0
    assert isinstance(row["lp_gain"], float)  # one kept new rewrite ("bb")
    assert [s["kept"] for s in shown] == [True, True, False, False]


def test_main_on_tiny_matches_a_hand_count(tmp_path, capsys):
    out = tmp_path / "rewrites.json"
    assert R.main(["--backbone", "tiny", "--per-task", "2", "--max-new-tokens", "4",
                   "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept_new" in printed and "sdft's default template:" in printed
    payload = json.loads(out.read_text())
    rows, shown = payload["rows"], payload["examples"]
    assert len(rows) == len(R.TEMPLATES) * 3  # the 3 default tasks
    assert {r["template"] for r in rows} == set(R.TEMPLATES)
    for row in rows:
        mine = [s for s in shown if (s["template"], s["task"]) == (row["template"], row["task"])]
        assert row["n"] == len(mine) == 2 and row["limit"] == 4  # every rewrite is shown: count them by hand
        assert row["kept"] == sum(s["kept"] for s in mine) / 2
        assert row["cut"] == sum(not s["finished"] for s in mine) / 2
        assert row["mean_reward"] == sum(s["reward"] for s in mine) / 2
        assert row["identical"] == sum(s["rewrite"] == s["gold"].strip() for s in mine) / 2
        assert row["kept"] <= 1 - row["cut"] and row["kept_new"] <= min(row["kept"], 1 - row["identical"])
        for s in mine:
            assert s["kept"] == keep_rewrite(s["rewrite"], s["reward"], s["finished"], 50.0, True)


def test_the_default_template_is_one_of_the_measured():
    assert DEFAULT_REWRITE_TEMPLATE in R.TEMPLATES.values()
    for template in R.TEMPLATES.values():
        SDFT(template=template)  # each has exactly {prompt} and {answer}
