"""Methods declare whether a run reads the replay budget (``uses_budget``); ``opr.config.budget_applies``
finds the class of a stored config by ``_target_``, else by name."""

from pathlib import Path

import pytest
import yaml

from opr.config import budget_applies
from opr.methods import BY_NAME, method_class

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
USES = {"seq_sft": False, "sdft": False, "vanilla_replay": True, "opr": True, "lowscore_replay": True,
        "grpo": False, "self_distill": False, "sft_then_grpo": False}  # the on-policy ones: only with replay_budget


@pytest.mark.parametrize("path", sorted(p.name for p in CONF.glob("*.yaml")))
def test_every_method_config_finds_its_declaration(path):
    node = yaml.safe_load((CONF / path).read_text())
    if "_target_" not in node:
        pytest.skip("a variant of another method file (defaults: [opr]): the same class")
    cls = method_class(node)
    assert cls is not None and cls is method_class({"name": node["name"]}), path
    assert budget_applies({"method": node}) == USES[node["name"]]
    assert budget_applies({"method": {"name": node["name"]}}) == USES[node["name"]]  # by name only
    if "replay_budget" in node:
        assert budget_applies({"method": {**node, "replay_budget": True}}) is True
    if "replay_budget" in (node.get("rl") or {}):  # sft_then_grpo: its RL phase's pool
        assert budget_applies({"method": {**node, "rl": {**node["rl"], "replay_budget": True}}}) is True


def test_every_registered_name_is_a_class_with_a_declaration():
    for name, path in BY_NAME.items():
        cls = method_class({"name": name})
        assert cls is not None and f"{cls.__module__}.{cls.__qualname__}" == path
        assert callable(cls.uses_budget)


def test_target_wins_and_unknown_methods_keep_the_old_rule():
    # the class of _target_ decides, whatever the name says
    assert budget_applies({"method": {"name": "opr", "_target_": "opr.methods.seq_sft.SequentialSFT"}}) is False
    # a target that is no class here falls back to the name
    assert budget_applies({"method": {"name": "seq_sft", "_target_": "elsewhere.methods.Gone"}}) is False
    # a method this code does not know uses the budget unless its options say replay_budget: false
    assert budget_applies({"method": {"name": "mine"}}) is True
    assert budget_applies({"method": {"name": "mine", "replay_budget": False}}) is False
    assert budget_applies({}) is True
