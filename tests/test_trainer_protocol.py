"""The trainer contract (opr.engine.base.Trainer): both engines implement every member with a compatible
signature, the loop and the method context use the trainer only through it (no hasattr/getattr probing), and
every optimizer step of every method reaches the step hook, with a resumable position inside a stage's first
fit_sft and in the on-policy methods' steps."""

from __future__ import annotations

import ast
import inspect
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_same_run, compose_cfg

from opr import checkpoint as ckpt
from opr.backbones import load_tiny
from opr.engine.base import NonFiniteLoss, Trainer
from opr.engine.deepspeed_engine import DeepSpeedTrainer
from opr.engine.torch_engine import TorchTrainer
from opr.loop import ContinualLoop
from opr.losses.sft import pack
from opr.run import run_experiment
from opr.types import SFTExample

ROOT = Path(__file__).resolve().parents[1]

ATTRIBUTES = {"rank", "world_size", "global_step", "batch_size", "grad_accum", "max_length", "compute_dtype",
              "device", "epochs_per_task", "logger", "last_step", "step_hook", "pending_resume"}
METHODS = {"set_stage", "begin_stage", "resume_position", "optimizer_step", "fit_sft", "num_optimizer_steps",
           "tokenize", "full_state_dict", "rank_state", "inference", "barrier", "any_rank", "all_gather",
           "frozen_model", "frozen_state_dict", "load_frozen_state_dict", "ema_update"}


def _protocol_members() -> tuple[set[str], set[str]]:
    attributes = set(Trainer.__annotations__)
    methods = {n for n, v in vars(Trainer).items() if inspect.isfunction(v) and not n.startswith("_")}
    return attributes, methods


def _examples(n: int) -> list[SFTExample]:
    return [SFTExample(prompt=f"What is {i} plus {i}?", response=f"{2 * i}", task="arith", example_id=str(i))
            for i in range(n)]


@pytest.fixture(scope="module")
def torch_trainer() -> TorchTrainer:
    return TorchTrainer(load_tiny(seed=0), batch_size=2, max_length=64, device="cpu")


@pytest.fixture(scope="module")
def deepspeed_trainer() -> DeepSpeedTrainer:
    # a world of one without a process group: the constructor needs DeepSpeed only from the first stage on
    import opr.engine.deepspeed_engine as ds

    mp = pytest.MonkeyPatch()
    mp.setattr(ds, "init_distributed", lambda timeout_min=30.0: (0, 1, 0))
    try:
        return DeepSpeedTrainer(load_tiny(seed=0), batch_size=2, max_length=64)
    finally:
        mp.undo()


# ------------------------------------------------------------------------------------------ the contract
def test_protocol_lists_exactly_the_members_the_loop_and_methods_use():
    attributes, methods = _protocol_members()
    assert attributes == ATTRIBUTES
    assert methods == METHODS
    for name in methods:
        assert inspect.getdoc(getattr(Trainer, name)), f"Trainer.{name} says what it does and who calls it"


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_engines_implement_every_member_with_a_compatible_signature(engine, request):
    trainer = request.getfixturevalue(f"{engine}_trainer")
    assert isinstance(trainer, Trainer)
    attributes, methods = _protocol_members()
    for name in attributes:
        assert hasattr(trainer, name), f"{type(trainer).__name__} has no {name}"
    for name in methods:
        impl = getattr(type(trainer), name)
        assert callable(impl)
        want = list(inspect.signature(getattr(Trainer, name)).parameters.values())
        have = list(inspect.signature(impl).parameters.values())
        assert [p.name for p in have[: len(want)]] == [p.name for p in want], (type(trainer).__name__, name)
        for w, h in zip(want, have):
            assert h.kind == w.kind and h.default == w.default, (type(trainer).__name__, name, h.name)
        assert all(p.default is not inspect.Parameter.empty for p in have[len(want):]), (type(trainer).__name__, name)
    # the hook is called in one place for both engines: DeepSpeed replaces the step itself, not optimizer_step
    assert "optimizer_step" not in vars(DeepSpeedTrainer)


def test_torch_engine_is_a_world_of_one(torch_trainer):
    assert (torch_trainer.rank, torch_trainer.world_size) == (0, 1)
    assert torch_trainer.any_rank(True) is True and torch_trainer.any_rank(False) is False
    assert torch_trainer.barrier() is None and torch_trainer.all_gather({"a": 1}) == [{"a": 1}]
    assert torch_trainer.rank_state() is None  # no ranks/ folder in a torch engine's training state


def test_torch_engine_frozen_model_is_a_full_copy_with_an_ema_over_the_policy(torch_trainer):
    tr = torch_trainer
    frozen = tr.frozen_model(tr.model)
    pairs = list(zip(frozen.parameters(), tr.model.parameters(), strict=True))
    assert not frozen.training and all(not f.requires_grad for f, _ in pairs)
    assert all(f.data_ptr() != p.data_ptr() and torch.equal(f, p) for f, p in pairs)  # a copy, not the policy
    start = {k: v.clone() for k, v in tr.frozen_state_dict(frozen).items()}
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(1.0)
    tr.ema_update(frozen, 0.25)
    assert all(torch.allclose(f, p - 0.75, atol=1e-6) for f, p in pairs)  # (1 - 0.25) f + 0.25 (f + 1)
    tr.load_frozen_state_dict(frozen, start)
    assert all(torch.allclose(f, p - 1.0, atol=1e-6) for f, p in pairs)
    with torch.no_grad():
        for p in tr.model.parameters():
            p.sub_(1.0)


def test_non_finite_loss_is_still_importable_from_the_torch_engine():
    from opr.engine import NonFiniteLoss as from_package
    from opr.engine.torch_engine import NonFiniteLoss as old

    assert old is NonFiniteLoss and from_package is NonFiniteLoss


def _attribute_probes_on_trainer(path: Path) -> list[str]:
    """``hasattr``/``getattr`` calls whose object is a trainer (``trainer``, ``self.trainer``, ``ctx.trainer``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            target = node.args[0] if node.args else None
            name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else ""
            if "trainer" in name:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_loop_does_not_probe_the_trainer():
    files = [ROOT / "opr" / "loop.py", ROOT / "opr" / "methods" / "base.py"]
    assert [p for f in files for p in _attribute_probes_on_trainer(f)] == []
    loop_src = (ROOT / "opr" / "loop.py").read_text()
    assert "opr.engine.torch_engine" not in loop_src and "hasattr(" not in loop_src


def test_probe_finder_finds_probes(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("hasattr(self.trainer, 'x')\ngetattr(trainer, 'y', 1)\ngetattr(ctx.trainer, 'z')\ngetattr(a, 'b')\n")
    assert len(_attribute_probes_on_trainer(f)) == 3


# ------------------------------------------------------------------------------------------ the step hook
def test_every_optimizer_step_reaches_the_hook_with_a_position_in_the_first_fit_or_from_after(torch_trainer):
    tr = torch_trainer
    calls: list[tuple[int, dict | None]] = []
    tr.step_hook = lambda step, make_state: calls.append((step, make_state() if make_state else None))
    try:
        tr.set_stage(1)
        # a method's own objective: begin_stage + optimizer_step (GRPO, self-distillation)
        tr.begin_stage(3)
        seqs = [tr.tokenize(e) for e in _examples(2)]
        for _ in range(3):
            tr.optimizer_step([pack(seqs)], tr.sft_loss, [pack(seqs).num_targets])
        assert calls == [(1, None), (2, None), (3, None)]
        calls.clear()
        # ... with a position: ``after`` runs first (the method's bookkeeping), its position gets the trainer's
        tr.begin_stage(2)
        seen: list[dict] = []
        out = tr.optimizer_step([pack(seqs)], tr.sft_loss, [pack(seqs).num_targets],
                                after=lambda o: seen.append(o) or (lambda: {"mine": len(seen)}))
        (step, state), = calls
        assert seen == [out] and step == 1 and state["mine"] == 1 and state["trainer"]["stage_step"] == 1
        # resume_position: after begin_stage, restores the optimizer and the schedule, returns the method's part
        tr.begin_stage(2)
        tr.pending_resume = {**state, "rank_states": None}
        assert tr.resume_position() == {"mine": 1} and tr.stage_step == 1 and tr.pending_resume is None
        assert tr.optimizer.state_dict()["state"], "the Adam moments came back"
        assert tr.resume_position() is None
        calls.clear()
        # fit_sft: the hook once per step, after the step is recorded (the position includes it)
        stats = tr.fit_sft(_examples(6), task="arith")
        assert [s for s, _ in calls] == list(range(1, stats.steps + 1)) and stats.steps == 3
        assert all(state is not None and state["steps"] == s and len(state["losses"]) == s for s, state in calls)
        calls.clear()
        # a second fit_sft of the same stage: no resumable position
        tr.fit_sft(_examples(6), task="arith")
        assert [state for _, state in calls] == [None, None, None]
        calls.clear()
        # a failed step does not reach the hook
        tr.set_stage(2)
        tr.begin_stage(1)
        with pytest.raises(NonFiniteLoss):
            tr.optimizer_step([pack(seqs)], lambda m, b: (torch.tensor(float("nan"), requires_grad=True), {}), [1])
        assert calls == []
    finally:
        tr.step_hook = None


GRPO = TINY + ["method=grpo", "method.group_size=4", "method.steps=2", "method.prompts_per_step=4", "method.kl_coef=0.05",
               "method.updates_per_batch=2", "budget=0.2"]


def _record_hook_calls(monkeypatch) -> list[tuple[int, int, bool]]:
    calls: list[tuple[int, int, bool]] = []
    real = ContinualLoop._step_hook

    def recording(self, stage, entry, data):
        hook = real(self, stage, entry, data)

        def wrapped(stage_step, make_state):
            calls.append((stage, stage_step, make_state is not None))
            hook(stage_step, make_state)
        return wrapped

    monkeypatch.setattr(ContinualLoop, "_step_hook", recording)
    return calls


def test_on_policy_steps_reach_the_hook_with_a_position_and_sigterm_saves_after_the_next_step(
        tmp_path, monkeypatch):
    """GRPO trains through optimizer_step with a position at each step: the hook gets it at every step; a
    SIGTERM during stage 2's first step saves a mid-stage state right after that step (between the two updates
    of its rollout batch: the batch, the KL reference and the optimizer are in it) and stops; the same command
    resumes from it and finishes as the uninterrupted run, every stage figure equal."""
    calls = _record_hook_calls(monkeypatch)
    reference = run_experiment(compose_cfg(GRPO, tmp_path / "ref"))
    assert reference["status"] == "complete"
    for s in reference["stages"][1:]:
        assert s["train"]["steps"] == 4
        assert [(st, has) for stage, st, has in calls if stage == s["stage"]] == [(i, True) for i in range(1, 5)]
    info = json.loads((ckpt.latest_train_state(tmp_path / "ref") / ckpt.STATE_MARKER).read_text())
    assert info["kind"] == "stage_end" and info["stage"] == 2  # no every_steps, no signal: stage ends only

    calls.clear()
    real = TorchTrainer.optimizer_step

    def interrupted_step(self, *args, **kwargs):
        if self.stage == 2 and self.stage_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # a pre-emption during stage 2's first step
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TorchTrainer, "optimizer_step", interrupted_step)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        run_experiment(compose_cfg(GRPO, run_dir))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [c for c in calls if c[0] == 2] == [(2, 1, True)]  # stopped right after that step
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and "SIGTERM" in results["error"] and "resume" in results["error"]
    folder = ckpt.latest_train_state(run_dir)
    info = json.loads((folder / ckpt.STATE_MARKER).read_text())
    assert (info["kind"], info["stage"], info["stage_step"]) == ("mid_stage", 2, 1)
    position = ckpt.load_train_state(folder)["state"]["fit"]["on_policy"]
    assert (position["step"], position["update"]) == (0, 0) and position["micro"]  # the batch's 2nd update is next
    assert set(position["modules"]) == {"reference"}

    monkeypatch.setattr(TorchTrainer, "optimizer_step", real)
    resumed = run_experiment(compose_cfg(GRPO, run_dir))
    assert {k: v for k, v in resumed["resumed"][-1].items() if k != "run"} == {
        "kind": "mid_stage", "stage": 2, "global_step": 5}
    assert_same_run(reference, resumed)


def test_torch_engine_mid_stage_state_has_no_rank_files(tmp_path, monkeypatch):
    real = TorchTrainer.optimizer_step

    def interrupted_step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.stage == 1 and self.stage_step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(TorchTrainer, "optimizer_step", interrupted_step)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_experiment(compose_cfg(TINY + ["method=seq_sft", "benchmark.num_tasks=1"], run_dir))
    folder = ckpt.latest_train_state(run_dir)
    info = json.loads((folder / ckpt.STATE_MARKER).read_text())
    assert info["kind"] == "mid_stage" and info["stage"] == 1 and info["stage_step"] == 1
    assert not (folder / ckpt.RANKS_DIR).exists()
