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


@pytest.mark.parametrize("style", ["varied", "fixed"])
def test_gold_answers_score_top_and_constant_answers_score_low(style):
    bench = mt.load_mini_trace(num_tasks=7, train_size=100, eval_size=100, answer_style=style)
    for task in bench.tasks:
        gold = [task.reward(e.answer, e) for e in task.eval]
        assert min(gold) >= 99.9, task.name
        assert all(task.format_ok(e.answer) for e in task.eval), task.name
        if task.accept is not None:
            assert all(task.accept(e.answer, e) for e in task.eval), task.name
    for name, labels in (("emotion", mt.EMOTION_LABELS), ("topic", mt.TOPIC_LABELS)):
        task = next(t for t in bench.tasks if t.name == name)
        for constant in labels:  # five classes: no constant answer gets near the top (28 at most at 100 examples)
            assert sum(task.reward(constant, e) for e in task.eval) / len(task.eval) <= 30


def test_fixed_style_is_the_stream_before_2026_12():
    """``benchmark=mini_trace_fixed`` must keep generating byte-identical data (earlier tables reproduce)."""
    bench = mt.load_mini_trace(num_tasks=3, answer_style="fixed")
    assert {k: v["train"]["sha256"][:12] for k, v in bench.manifest.items() if "train" in v} == {
        "emotion": "ce5adce00f36", "arithmetic": "06a6ae1d2577", "topic": "05e9e09c852f"}


def test_varied_style_gives_several_surface_forms_per_task():
    bench = mt.load_mini_trace(num_tasks=7, train_size=100, eval_size=10)
    for name in ("emotion", "arithmetic", "topic", "summary"):
        task = next(t for t in bench.tasks if t.name == name)
        shapes = {mt.re.sub(r"\d+", "N", e.answer.split()[0]) for e in task.train}
        assert len(shapes) >= 3, (name, shapes)  # distinct first words (summary: "The", "By", "In")


def test_label_reward_needs_exactly_one_named_label():
    ex = Example("emotion/eval/0", "emotion", "q", "It is joy.")
    reward = mt.reward_emotion
    assert reward("joy", ex) == 100 and reward("I would say Joy.", ex) == 100 and reward("Answer: joy", ex) == 100
    assert reward("joy or fear", ex) == 0 and reward("fear", ex) == 0 and reward("joyful", ex) == 0
    assert reward("", ex) == 0


def test_acceptance_checks_reject_what_the_metric_passes():
    """The filter's acceptance checks catch copies and contradictions that pass the metric at 50."""
    bench = mt.load_mini_trace(tasks=["summary", "simplify", "code_line"], train_size=20, eval_size=20)
    summary, simplify, code = bench.tasks
    ex = summary.eval[0]
    flipped = ex.answer.replace("approved", "TMP").replace("rejected", "approved").replace("TMP", "rejected")
    assert summary.reward(flipped, ex) >= 50 and not summary.accept(flipped, ex)
    ex = simplify.eval[0]
    assert simplify.reward(ex.source, ex) >= 50 and not simplify.accept(ex.source, ex)
    assert simplify.accept(ex.answer, ex)
    ex = next(e for e in code.eval if "+= 1" not in e.answer)
    assert not code.accept("    total += 1", ex) and code.accept("  " + ex.answer.strip() + " ", ex)


def test_unknown_answer_style_is_refused():
    with pytest.raises(ValueError, match=r"answer_style must be one of \['varied', 'fixed'\], got 'fancy'"):
        mt.load_mini_trace(num_tasks=2, answer_style="fancy")


def test_emotion_and_topic_read_the_same_kind_of_sentence_with_conflicting_labels():
    bench = mt.load_mini_trace(tasks=["emotion", "topic"], train_size=30, eval_size=10)
    emo, top = bench.tasks
    assert emo.train[0].prompt.startswith("Sentence:") and top.train[0].prompt.startswith("Sentence:")
    assert set().union(*(mt.named_labels(e.answer, mt.EMOTION_LABELS) for e in emo.train)) == set(mt.EMOTION_LABELS)
    assert set().union(*(mt.named_labels(e.answer, mt.TOPIC_LABELS) for e in top.train)) == set(mt.TOPIC_LABELS)


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
    assert general.reward is mt.reward_general_named  # the default (varied) stream
    assert mt.load_mini_trace(num_tasks=1, general_size=2, answer_style="fixed").general[0].reward is mt.reward_general


@pytest.mark.parametrize("prompt,answer,prediction,score", [
    ("What is the first word of this list: market, planet, castle, rocket?", "market", "The answer is market.", 100),
    ("What is the first word of this list: market, planet, castle, rocket?", "market", "market", 100),
    ("What is the first word of this list: market, planet, castle, rocket?", "market", "market, planet, castle", 0),
    ("What is the first word of this list: market, planet, castle, rocket?", "market", "The answer is planet.", 0),
    ("What is the first word of this list: market, planet, castle, rocket?", "market", "supermarkets", 0),
    ("Write the word 'forest' in capital letters.", "FOREST", "The answer is FOREST.", 100),
    ("Write the word 'forest' in capital letters.", "FOREST", "forest in capitals is FOREST", 100),
    ("Write the word 'forest' in capital letters.", "FOREST", "The answer is forest.", 0),  # case counts
    ("What is the plural of 'pencil'?", "pencils", "The plural of pencil is pencils.", 100),
    ("What is the plural of 'pencil'?", "pencils", "The answer is pencil.", 0),
    ("What is the plural of 'pencil'?", "pencils", "pencils or rockets", 0),
    ("Repeat exactly: window river pencil", "window river pencil", "window river pencil", 100),
    ("Repeat exactly: window river pencil", "window river pencil", "window pencil river", 0),  # order counts
    ("Repeat exactly: window river pencil", "window river pencil", "window river pencil garden", 0),
])
def test_general_named_reward_by_hand(prompt, answer, prediction, score):
    assert mt.reward_general_named(prediction, Example("general/eval/0", "general", prompt, answer)) == score


@pytest.mark.parametrize("kwargs,match", [
    (dict(tasks=["emotion", "poetry"]), "unknown mini_trace task"),
    (dict(num_tasks=9), "between 1 and 7"),
    (dict(tasks=["topic", "topic"]), "twice"),
])
def test_bad_task_selection(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mt.load_mini_trace(**kwargs)


def test_the_fixed_streams_name_with_varied_answers_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from conftest import TINY, compose_cfg

    import opr.run
    from opr.config import ConfigError
    from opr.run import run_experiment

    real_build = opr.run.build

    def build(node, **runtime):
        assert "backbones" not in node._target_, "the model was loaded"
        return real_build(node, **runtime)

    monkeypatch.setattr(opr.run, "build", build)
    cfg = compose_cfg(TINY + ["benchmark=mini_trace_fixed", "benchmark.answer_style=varied"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"benchmark \(mini_trace_fixed\): benchmark=mini_trace_fixed is the "
                                          r"fixed-answer stream, got benchmark.answer_style='varied': use "
                                          r"benchmark=mini_trace for the varied stream"):
        run_experiment(cfg)
    assert mt.load_mini_trace(num_tasks=1, train_size=2, eval_size=2, test_size=0, general_size=0,
                              answer_style="fixed", name="mini_trace_fixed").tasks
