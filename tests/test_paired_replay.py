"""Paired comparisons: within a seed every method trains on the same current-task batches in the same order,
replay examples are spread evenly over the stage, and on-policy replay trains the model's own tokens."""

import json

import pytest

from opr.backbones import load_tiny
from opr.engine.torch_engine import TorchTrainer
from opr.run import run_experiment
from opr.types import SFTExample


def _examples(task, n, origin="gold", tag="", length=3):
    return [SFTExample(f"prompt {task} {i}", ("w " * length) + f"{tag}{i}", task, True, origin, f"{task}/train/{i}")
            for i in range(n)]


def _current_batches(trainer, examples, task, epoch=0):
    return [[examples[i].example_id for i in b if examples[i].task == task]
            for b in trainer.batch_plan(examples, epoch, task)]


def test_paired_order_gives_every_method_the_same_current_task_batches():
    trainer = TorchTrainer(load_tiny(seed=0), batch_size=4, seed=5)
    trainer.set_stage(2)
    current = _examples("b", 22)
    vanilla = current + _examples("a", 6, "gold", "gold")
    opr = current + _examples("a", 5, "rollout", "model ")  # one prompt without a kept rollout
    plans = [_current_batches(trainer, ex, "b") for ex in (current, vanilla, opr)]
    assert plans[0] == plans[1] == plans[2]
    assert len(plans[0]) == 6 and sorted(i for b in plans[0] for i in b) == sorted(e.example_id for e in current)
    # replay lands evenly: R = 6 examples over K = 6 batches -> one per batch, the same slots for vanilla/low-score
    plan = trainer.batch_plan(vanilla, 0, "b")
    assert [sum(vanilla[i].task == "a" for i in b) for b in plan] == [1] * 6
    # another seed (or epoch) orders the current task differently
    other = TorchTrainer(load_tiny(seed=0), batch_size=4, seed=6)
    other.set_stage(2)
    assert _current_batches(other, current, "b") != plans[0]
    assert _current_batches(trainer, current, "b", epoch=1) != plans[0]


def test_replay_spacing_is_stratified():
    trainer = TorchTrainer(load_tiny(seed=0), batch_size=8, seed=0)
    trainer.set_stage(3)
    examples = _examples("c", 200) + _examples("a", 10) + _examples("b", 10)
    plan = trainer.batch_plan(examples, 0, "c")
    slots = [k for k, b in enumerate(plan) for i in b if examples[i].task != "c"]
    assert len(plan) == 25 and len(slots) == 20
    assert slots == [int((j + 0.5) * 25 / 20) for j in range(20)]
    assert all(any(examples[i].task == "c" for i in b) for b in plan)


def test_shuffled_order_is_the_earlier_behaviour_with_pure_replay_batches():
    """Regression for the defect the paired order fixes: length grouping over a window larger than the stage
    sorted the short replay answers into batches made only of replays."""
    trainer = TorchTrainer(load_tiny(seed=0), batch_size=8, seed=0, data_order="shuffled")
    trainer.set_stage(2)
    examples = _examples("b", 200, length=12) + _examples("a", 20, length=0)
    plan = trainer.batch_plan(examples, 0, "b")
    assert any(all(examples[i].task == "a" for i in b) for b in plan)
    paired = TorchTrainer(load_tiny(seed=0), batch_size=8, seed=0)
    paired.set_stage(2)
    assert not any(all(examples[i].task == "a" for i in b) for b in paired.batch_plan(examples, 0, "b"))
    with pytest.raises(ValueError, match=r"data_order must be one of \['paired', 'shuffled'\], got 'sorted'"):
        TorchTrainer(load_tiny(seed=0), data_order="sorted")


def test_rollouts_train_their_own_token_ids_and_cut_ones_no_eos():
    bb = load_tiny(seed=0)
    trainer = TorchTrainer(bb, max_length=64)
    eos = bb.tokenizer.eos_token_id
    text = SFTExample("p", "joy", "t")
    _, response = trainer.tokenize(text)
    assert response == bb.tokenizer("joy", add_special_tokens=False)["input_ids"] + [eos]
    sampled = SFTExample("p", "joy", "t", origin="rollout", response_ids=(7, 8, 9))
    assert trainer.tokenize(sampled)[1] == [7, 8, 9, eos]
    cut = SFTExample("p", "8 x 9 = 72. The answer is", "t", origin="rollout", response_ids=(7, 8), finished=False)
    assert trainer.tokenize(cut)[1] == [7, 8]
    with pytest.raises(ValueError, match="empty, unfinished response"):
        trainer.tokenize(SFTExample("p", "", "t", finished=False))


def test_methods_with_one_seed_see_identical_current_task_batches(tiny_cfg, monkeypatch):
    """End to end: seq_sft, vanilla replay and OPR at one seed train stage 2 on the same current-task batches."""
    current: dict[str, list] = {}
    whole: dict[str, list] = {}
    original = TorchTrainer.batches

    def recording(self, examples, epoch, task=None):
        out = original(self, examples, epoch, task)
        if self.stage == 2:
            cur = {tuple(self.tokenize(e)[1]) for e in examples if e.task == task}
            current[self._method] = [[s for s in b if tuple(s[1]) in cur] for b in out]
            whole[self._method] = out
        return out

    monkeypatch.setattr(TorchTrainer, "batches", recording)
    runs = {"seq_sft": [], "vanilla_replay": [], "opr": ["method.min_reward=null", "method.unfinished=no_eos"]}
    for method, extra in runs.items():
        monkeypatch.setattr(TorchTrainer, "_method", method, raising=False)
        res = run_experiment(tiny_cfg(f"method={method}", "budget=0.5", "checkpoint.save=false",
                                      "analysis.drift=false", "analysis.diagnostics=false", *extra, run=method))
        if method != "seq_sft":
            assert res["stages"][2]["replay"]["kept"] == 6  # round(0.5 * 12) replay examples were mixed in
    assert current["seq_sft"] == current["vanilla_replay"] == current["opr"]
    assert whole["seq_sft"] != whole["vanilla_replay"] != whole["opr"]


def test_ranked_pool_selection_end_to_end(tiny_cfg, tmp_path):
    res = run_experiment(tiny_cfg("method=opr", "method.selection=ranked_pool", "method.pool_size=5",
                                  "method.samples_per_prompt=1", "method.temperature=0.1", "method.min_reward=null",
                                  "method.unfinished=no_eos", "budget=0.25", "checkpoint.save=false"))
    replay = res["stages"][2]["replay"]
    assert replay["selection"] == "ranked_pool"
    assert replay["requested"] == 5 and replay["rollouts"] == 5  # the pool, one sample each
    assert replay["kept"] == 3  # round(0.25 * 12) of the pool's 5, all eligible
    assert 0.0 <= replay["per_task"][res["tasks"][0]]["differs_from_gold"] <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "replay" / "stage2.jsonl").open()]
    assert len(lines) == 3 and all(x["origin"] == "rollout" for x in lines)
    run = res["run"]
    assert run["torch_threads"] >= 1 and run["torch"] and run["transformers"] and run["cpu"]
    assert run["packed_attention"] == "per_sequence_loop"  # opr.attention.describe: the CPU path


def test_bad_selection_is_refused_before_work(tiny_cfg):
    from opr.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="selection must be one of"):
        run_experiment(tiny_cfg("method=opr", "method.selection=best_pool"))
