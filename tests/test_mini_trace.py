import pytest

from opr.benchmarks import mini_trace as mt
from opr.types import Example


def test_deterministic_and_disjoint_splits():
    a = mt.load_mini_trace(num_tasks=7, train_size=40, eval_size=20, test_size=10, general_size=5)
    b = mt.load_mini_trace(num_tasks=7, train_size=40, eval_size=20, test_size=10, general_size=5)
    assert [t.name for t in a.tasks] == mt.DEFAULT_ORDER
    for ta, tb in zip(a.tasks, b.tasks):
        assert [e.prompt for e in ta.train] == [e.prompt for e in tb.train]
        prompts = [e.prompt for e in ta.train + ta.eval + ta.test]
        assert len(set(prompts)) == len(prompts), f"{ta.name}: a prompt appears in two splits"
        assert ta.eval[3].id == f"{ta.name}/eval/3"
    assert a.manifest == b.manifest
    c = mt.load_mini_trace(num_tasks=2, train_size=40, eval_size=20, data_seed=7)
    assert c.tasks[0].train[0].prompt != a.tasks[0].train[0].prompt


def test_gold_answers_score_top_and_constant_answers_score_low():
    bench = mt.load_mini_trace(num_tasks=7, train_size=50, eval_size=50)
    for task in bench.tasks:
        gold = [task.reward(e.answer, e) for e in task.eval]
        assert min(gold) >= 99.9, task.name
        assert all(task.format_ok(e.answer) for e in task.eval), task.name
    for name, constant in (("emotion", "joy"), ("topic", "food")):
        task = next(t for t in bench.tasks if t.name == name)
        assert sum(task.reward(constant, e) for e in task.eval) / len(task.eval) < 40


def test_emotion_and_topic_read_the_same_kind_of_sentence_with_conflicting_labels():
    bench = mt.load_mini_trace(tasks=["emotion", "topic"], train_size=30, eval_size=10)
    emo, top = bench.tasks
    assert emo.train[0].prompt.startswith("Sentence:") and top.train[0].prompt.startswith("Sentence:")
    assert {e.answer for e in emo.train} == {"joy", "anger", "sadness", "fear", "surprise"}
    assert {e.answer for e in top.train} == {"travel", "food", "music", "school", "shopping"}


def test_arithmetic_reward_accepts_any_working_before_the_number():
    ex = Example("arithmetic/eval/0", "arithmetic", "q", "3 + 4 = 7. The answer is 7.")
    assert mt.reward_final_number("She has 7 apples now.", ex) == 100
    assert mt.reward_final_number("7", ex) == 100
    assert mt.reward_final_number("3 + 4 = 8. The answer is 8.", ex) == 0
    assert mt.reward_final_number("", ex) == 0


def test_exact_reward_strips_whitespace_and_final_punctuation():
    ex = Example("emotion/eval/0", "emotion", "q", "joy")
    assert mt.reward_exact(" Joy.\n", ex) == 100 and mt.reward_exact("joy!", ex) == 100
    assert mt.reward_exact("joyful", ex) == 0 and mt.reward_exact("it is joy", ex) == 0


def test_general_set_is_held_out_and_lenient_on_trailing_punctuation():
    bench = mt.load_mini_trace(num_tasks=2, train_size=10, eval_size=5, general_size=8)
    (general,) = bench.general
    assert general.train == [] and len(general.eval) == 8
    ex = Example("general/eval/0", "general", "q", "RIVER")
    assert mt.reward_general("RIVER.", ex) == 100 and mt.reward_general("river", ex) == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(tasks=["emotion", "poetry"]), "unknown mini_trace task"),
    (dict(num_tasks=9), "between 1 and 7"),
    (dict(tasks=["topic", "topic"]), "twice"),
])
def test_bad_task_selection(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mt.load_mini_trace(**kwargs)
