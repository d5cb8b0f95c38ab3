import pytest

from opr.replay import (
    as_sft,
    differs_from_gold,
    pool_prompts,
    replay_count,
    sample_replay_prompts,
    split_evenly,
)
from opr.rollout import Rollout, rank_pool, select_rollouts
from opr.types import Example, Task


def test_replay_count_rounds_half_up():
    assert replay_count(0.1, 160) == 16
    assert replay_count(0.01, 160) == 2  # 1.6 -> 2
    assert replay_count(0.05, 50) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert replay_count(1.0, 7) == 7


@pytest.mark.parametrize("bad", [0, -0.1, 1.5])
def test_budget_out_of_range(bad):
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        replay_count(bad, 100)


def test_split_evenly_remainder_to_earliest():
    assert split_evenly(7, 3) == [3, 2, 2]
    assert split_evenly(2, 3) == [1, 1, 0]
    assert split_evenly(5, 0) == []


def _task(name, n):
    return Task(name, [Example(f"{name}/train/{i}", name, f"p{i}", f"a{i}") for i in range(n)], [])


def test_sampled_prompts_are_method_independent_and_budgeted():
    past = [_task("a", 50), _task("b", 50)]
    first = sample_replay_prompts(past, 0.1, 75, seed=3, stage=3)  # round(7.5) = 8 -> [4, 4]
    again = sample_replay_prompts(past, 0.1, 75, seed=3, stage=3)
    assert [e.id for e in first] == [e.id for e in again]
    assert [e.task for e in first] == ["a"] * 4 + ["b"] * 4
    other = sample_replay_prompts(past, 0.1, 75, seed=4, stage=3)
    assert [e.id for e in other] != [e.id for e in first]


def test_small_past_task_gives_what_it_has():
    assert len(sample_replay_prompts([_task("a", 2)], 1.0, 10, seed=0, stage=2)) == 2


def _rollouts(rewards, conf=None):
    ex = Example("t/train/0", "t", "p", "a")
    conf = conf or [0.0] * len(rewards)
    return [Rollout(ex, f"text{i}", r, True, c) for i, (r, c) in enumerate(zip(rewards, conf))]


def test_best_with_threshold():
    group = _rollouts([20, 90, 60, 90])
    kept = select_rollouts(group, "highest", "reward", "best", threshold=50, max_per_prompt=1)
    assert [k.text for k in kept] == ["text1"]  # ties keep sampling order
    assert select_rollouts(_rollouts([10, 40]), "highest", "reward", "best", threshold=50) == []


def test_threshold_rule_keeps_all_passing_up_to_cap():
    group = _rollouts([20, 90, 60, 70])
    kept = select_rollouts(group, "highest", "reward", "threshold", threshold=60, max_per_prompt=3)
    assert [k.reward for k in kept] == [90, 70, 60]
    kept = select_rollouts(group, "highest", "reward", "threshold", threshold=60, max_per_prompt=2)
    assert [k.reward for k in kept] == [90, 70]


def test_lowscore_is_the_complement_ordering():
    group = _rollouts([20, 90, 5, 60])
    assert [k.reward for k in select_rollouts(group, "lowest", "reward", "best", max_per_prompt=2)] == [5, 20]
    assert [k.reward for k in select_rollouts(group, "highest", "reward", "best", max_per_prompt=2)] == [90, 60]


def test_confidence_ranking_ignores_reward():
    group = _rollouts([100, 0, 50], conf=[-3.0, -0.1, -1.0])
    assert select_rollouts(group, "highest", "confidence", "best")[0].text == "text1"


def test_duplicate_texts_kept_once():
    ex = Example("t/train/0", "t", "p", "a")
    group = [Rollout(ex, "same", 100, True), Rollout(ex, "same", 100, True), Rollout(ex, "x", 80, True)]
    kept = select_rollouts(group, "highest", "reward", "threshold", threshold=0, max_per_prompt=3)
    assert [k.text for k in kept] == ["same", "x"]


def test_bad_rule():
    with pytest.raises(ValueError, match="allowed: best, threshold"):
        select_rollouts(_rollouts([1]), "highest", "reward", "top")


# ---------------------------------------------------------------- cut-off rollouts, acceptance, token ids


def test_unfinished_rollout_is_dropped_or_trained_without_eos():
    """Regression: a rollout cut at the token limit ("8 x 9 = 72. The answer is", reward 100 by its last
    number) used to pass the filter and be trained ending in EOS."""
    ex = Example("arithmetic/train/0", "arithmetic", "p", "8 x 9 = 72. The answer is 72.")
    cut = Rollout(ex, "8 x 9 = 72. The answer is", 100.0, False, -0.5, (11, 12, 13))
    done = Rollout(ex, "72", 100.0, True, -1.0, (14,))
    assert select_rollouts([cut, done], "highest", "reward", "best", 50, unfinished="drop") == [done]
    kept = select_rollouts([cut, done], "highest", "reward", "best", 50, unfinished="no_eos")
    assert kept == [cut]
    (sft,) = as_sft(kept, {"arithmetic": Task("arithmetic", [], [])})
    assert sft.finished is False and sft.response_ids == (11, 12, 13)


def test_acceptance_check_filters_only_the_highest_order():
    ex = Example("summary/train/0", "summary", "p", "The board approved it, 5 to 2.")
    flipped = Rollout(ex, "The board rejected it, 5 to 2.", 92.4, True, -0.1, accepted=False)
    right = Rollout(ex, "By 5 votes to 2 the board approved it.", 60.0, True, -0.9, accepted=True)
    assert select_rollouts([flipped, right], "highest", "reward", "best", 50, use_accept=True) == [right]
    assert select_rollouts([flipped, right], "highest", "reward", "best", 50, use_accept=False) == [flipped]
    # the low-score control never asks for acceptance
    assert select_rollouts([flipped, right], "lowest", "reward", "best", use_accept=True) == [right]


def test_rank_pool_keeps_top_k_with_confidence_tiebreak():
    exs = [Example(f"t/train/{i}", "t", f"p{i}", "a") for i in range(5)]
    cands = [Rollout(e, f"r{i}", r, True, c) for i, (e, r, c) in
             enumerate(zip(exs, [100, 0, 100, 50, 100], [-2.0, -0.1, -0.5, -0.2, -1.0]))]
    assert [r.text for r in rank_pool(cands, 2, "highest", "reward")] == ["r2", "r4"]
    assert [r.text for r in rank_pool(cands, 2, "lowest", "reward")] == ["r1", "r3"]
    assert [r.text for r in rank_pool(cands, 2, "highest", "confidence")] == ["r1", "r3"]
    assert len(rank_pool(cands, 10, "highest")) == 5


def test_pool_prompts_all_or_seeded_sample():
    task = _task("a", 30)
    assert pool_prompts(task, None, 0, 2) == task.train
    assert pool_prompts(task, 100, 0, 2) == task.train
    sample = pool_prompts(task, 5, 0, 2)
    assert len(sample) == 5 and sample == pool_prompts(task, 5, 0, 2) and sample != pool_prompts(task, 5, 1, 2)
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        pool_prompts(task, 0, 0, 2)


def test_differs_from_gold_ignores_whitespace_only():
    ex = Example("t/train/0", "t", "p", "It is  joy.")
    assert not differs_from_gold(Rollout(ex, " It is joy.\n", 100, True))
    assert differs_from_gold(Rollout(ex, "joy", 100, True))
