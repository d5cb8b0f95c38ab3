"""The on-policy collapse guard (method.stop_on_collapse) and the per-step figures that show a collapse.

The decision function is tested on hand-made values; one tiny run trips the guard and continues the stream.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import TINY, compose_cfg

from opr.config import ConfigError, validate
from opr.losses.policy import token_entropy
from opr.methods.grpo import GRPO
from opr.methods.on_policy import CollapseGuard, _Guard, collapse_onset
from opr.methods.self_distill import SelfDistill
from opr.run import run_experiment


# ------------------------------------------------------------------------------------------ the decision
@pytest.mark.parametrize("values, threshold, patience, onset", [
    ([], 0.1, 1, None),
    ([0.5, 0.4], 0.1, 1, None),
    ([0.05], 0.1, 1, 0),
    ([0.5, 0.05, 0.0, 0.02], 0.1, 3, 1),  # the trailing run of three starts at batch 1
    ([0.5, 0.05, 0.0, 0.02], 0.1, 4, None),  # ... and is one short of four
    ([0.05, 0.5, 0.0], 0.1, 2, None),  # a good batch breaks the run
    ([0.0, 0.0, 0.0, 0.0, 0.0], 0.1, 5, 0),
    ([0.0, 0.1, 0.0], 0.1, 1, 2),  # the threshold itself is not below it
    ([0.0, None, 0.0], 0.1, 2, None),  # an unmeasured batch breaks the run
    ([0.0, 0.0], 0.0, 1, None),  # min_finished 0 never trips
])
def test_collapse_onset(values, threshold, patience, onset):
    assert collapse_onset(values, threshold, patience) == onset


def test_guard_keeps_the_weights_that_sampled_the_last_good_batch():
    model = torch.nn.Linear(2, 1, bias=False)
    guard = _Guard(CollapseGuard(min_finished=0.5, patience=2), model)
    guard.keep(None)  # the stage start: weight 0
    rows: list[dict] = []
    for step, (weight, finished) in enumerate([(0.0, 0.2), (1.0, 0.9), (2.0, 0.1), (3.0, 0.0)]):
        with torch.no_grad():
            model.weight.fill_(weight)  # the weights that sample batch ``step``
        rows.append({"finished_fraction": finished})
        record = guard.check(rows)
        if step < 3:
            assert record is None
    assert record == {"figure": "finished_fraction", "threshold": 0.5, "patience": 2, "first_batch": 2,
                      "stopped_at_batch": 3, "values": [0.1, 0.0], "weights_of_batch": 1}
    assert float(model.weight[0, 0]) == 1.0  # back to the weights of batch 1, the last one above 0.5


def test_guard_without_a_good_batch_goes_back_to_the_stage_start():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(7.0)
    guard = _Guard(CollapseGuard(min_finished=0.5, patience=1), model)
    guard.keep(None)
    with torch.no_grad():
        model.weight.fill_(8.0)
    assert guard.check([{"finished_fraction": 0.0}])["weights_of_batch"] is None
    assert float(model.weight[0, 0]) == 7.0


def test_token_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])  # [M=2, V=4]
    h = token_entropy(logits, chunk=1)
    assert h.shape == (2,) and h[0].item() == pytest.approx(torch.log(torch.tensor(4.0)).item()) and h[1] < 1e-6
    assert token_entropy(torch.zeros(0, 4)).shape == (0,)


# ------------------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("value, message", [
    ("{min_finished:1.5,patience:3}", "method.stop_on_collapse.min_finished must be in [0, 1]"),
    ("{min_finished:-0.1}", "method.stop_on_collapse.min_finished must be in [0, 1]"),
    ("{min_finished:0.1,patience:0}", "method.stop_on_collapse.patience must be >= 1"),
    ("{min_finishd:0.1}", "min_finishd"),
    # the guard's own keys, not the method's
    ("{min_finished:0.5,patience:2,bogus:1}",
     "stop_on_collapse.bogus: Key 'bogus' not in 'CollapseGuard' (got 1). Allowed keys of method.stop_on_collapse: "
     "['min_finished', 'patience']"),
])
@pytest.mark.parametrize("method", ["grpo", "self_distill"])
def test_bad_guard_options_are_named(method, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg(TINY + [f"method={method}", f"method.stop_on_collapse={value}"]))


def test_guard_is_off_by_default_and_a_mapping_becomes_a_guard():
    assert GRPO().stop_on_collapse is None and SelfDistill().stop_on_collapse is None
    cfg = validate(compose_cfg(TINY + ["method=grpo"]))
    assert cfg.method.stop_on_collapse is None  # the YAML and the dataclass agree
    assert GRPO(stop_on_collapse={"patience": 2}).stop_on_collapse == CollapseGuard(min_finished=0.1, patience=2)
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        SelfDistill(stop_on_collapse={"patience": 0})


# ------------------------------------------------------------------------------------------ a run
def test_a_collapsing_run_ends_the_stage_keeps_the_stage_start_weights_and_goes_on(tmp_path, caplog):
    """The tiny random model hardly ever emits EOS: with min_finished 1 every batch counts as collapsed, so with
    patience 2 each stage trains on batch 0 only, stops at batch 1 and goes back to its start weights; greedy
    evaluation then gives row 0 again."""
    run = TINY + ["method=grpo", "method.group_size=4", "method.steps=4", "method.prompts_per_step=4",
                  "method.stop_on_collapse={min_finished:1.0,patience:2}"]
    with caplog.at_level(logging.WARNING, logger="opr"):
        results = run_experiment(compose_cfg(run, tmp_path / "run"))
    assert results["status"] == "complete" and len(results["matrix"]) == 3
    for stage in results["stages"][1:]:
        train = stage["train"]
        collapse = train["collapse"]
        assert collapse["figure"] == "finished_fraction" and collapse["threshold"] == 1.0
        assert (collapse["first_batch"], collapse["stopped_at_batch"], collapse["weights_of_batch"]) == (0, 1, None)
        assert collapse["values"] == train["finished_fraction_per_step"] and all(v < 1 for v in collapse["values"])
        assert train["rollout_batches"] == 2 and train["steps"] + train["skipped_steps"] == 1
    assert results["matrix"][1] == results["matrix"][0] == results["matrix"][2]
    assert sum("collapse: finished fraction below 1.0" in r.getMessage() for r in caplog.records) == 2


def test_on_policy_records_per_step_figures(tmp_path):
    run = TINY + ["method=grpo", "method.group_size=4", "method.steps=2", "method.prompts_per_step=4", "method.kl_coef=0.05",
                  "benchmark.num_tasks=1"]
    train = run_experiment(compose_cfg(run, tmp_path / "run"))["stages"][1]["train"]
    for key in ("finished_fraction_per_step", "entropy_per_step", "degenerate_fraction_per_step", "kl_per_step"):
        assert len(train[key]) == train["rollout_batches"] == 2, key
    trained = [h for h in train["entropy_per_step"] if h is not None]
    assert trained and all(h > 0 for h in trained) and train["mean_entropy"] > 0
    assert "collapse" not in train
