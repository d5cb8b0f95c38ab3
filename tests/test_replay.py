import pytest

from opr.replay import ScoredRollout, replay_count, sample_replay_prompts, select_rollouts, split_evenly
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
    return [ScoredRollout(ex, f"text{i}", r, c) for i, (r, c) in enumerate(zip(rewards, conf))]


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
    group = [ScoredRollout(ex, "same", 100, 0), ScoredRollout(ex, "same", 100, 0), ScoredRollout(ex, "x", 80, 0)]
    kept = select_rollouts(group, "highest", "reward", "threshold", threshold=0, max_per_prompt=3)
    assert [k.text for k in kept] == ["same", "x"]


def test_bad_rule():
    with pytest.raises(ValueError, match="allowed: best, threshold"):
        select_rollouts(_rollouts([1]), "highest", "reward", "top")
