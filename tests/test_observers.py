"""The loop's observers (opr.observers): what each one reads and writes, and which ones a config builds."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import torch

from opr.evaluation import TaskScore
from opr.observers import DiagnosticsObserver, LoggerObserver, Observer, ReplayDumpObserver
from opr.results import StageRecord
from opr.types import SFTExample


class RecordingLogger:
    def __init__(self) -> None:
        self.calls: list = []

    def log_stage(self, stage, metrics) -> None:
        self.calls.append(("stage", stage, metrics))

    def log_final(self, results, run_dir) -> None:
        self.calls.append(("final", results, run_dir))

# a stage context of one process, for observers told of a stage start (ctx.trainer: rank 0 of 1, no ranks)
ONE_PROCESS = SimpleNamespace(trainer=None)


def score(task: str, value: float) -> TaskScore:
    return TaskScore(task=task, score=value, n=2, empty_rate=0.0, format_error_rate=None)


def test_the_base_observer_does_nothing() -> None:
    o = Observer()
    entry = StageRecord(stage=1, task="a")
    before = entry.to_json()
    o.on_run_start(None)
    o.on_stage_start(1, None, None)
    o.on_stage_data(1, None, entry)
    o.on_stage_evaluated(1, [], [])
    o.on_stage_end(1, entry, cached=False)
    o.on_stage_finish(1, entry)
    state: dict = {}
    o.on_train_state("mid_stage", state)
    o.on_run_end(None)
    assert entry.to_json() == before and state == {}


def test_logger_observer_logs_scores_then_analysis_on_the_stage_axis(tmp_path) -> None:
    logger = RecordingLogger()
    o = LoggerObserver(logger, tmp_path)
    o.on_stage_evaluated(1, [score("a", 50.0)], [score("g", 10.0)])
    entry = StageRecord(stage=1, task="a")
    o.on_stage_end(1, entry, cached=False)  # nothing computed: nothing logged
    entry.drift = {"rel_l2": 0.5}
    entry.diagnostics = {"kl_base": {"mean": 0.1}, "kl_prev": None}
    o.on_stage_end(1, entry, cached=True)  # cached fields are logged as computed ones
    assert logger.calls == [
        ("stage", 1, {"stage1/eval/a": 50.0, "stage1/general/g": 10.0, "stage1/empty_rate/a": 0.0}),
        ("stage", 1, {"stage1/drift/rel_l2": 0.5, "stage1/diagnostics/kl_base": 0.1}),
    ]


def test_replay_dump_holds_past_tasks_only(tmp_path) -> None:
    o = ReplayDumpObserver(tmp_path)
    entry = StageRecord(stage=2, task="b")
    current = [SFTExample(prompt="p", response="r", task="b")]
    o.on_stage_data(2, SimpleNamespace(examples=current), entry)
    assert not (tmp_path / "replay").exists()
    past = SFTExample(prompt="q", response="s", task="a")
    o.on_stage_data(2, SimpleNamespace(examples=current + [past]), entry)
    lines = (tmp_path / "replay" / "stage2.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == ["a"]


def test_diagnostics_keep_the_stage_start_policy_in_mid_stage_states() -> None:
    model = torch.nn.Linear(2, 2)
    o = DiagnosticsObserver(SimpleNamespace(model=model), benchmark=None, per_task=1, seed=0,
                            eval_settings=None, max_length=8)
    o.on_stage_start(1, ONE_PROCESS, None)  # stage 1 starts from π_0
    state: dict = {}
    o.on_train_state("mid_stage", state)
    assert state == {"prev_is_base": True}
    with torch.no_grad():
        model.weight.add_(1.0)
    o.on_stage_start(2, ONE_PROCESS, None)  # π_1, copied at the stage start
    state = {}
    o.on_train_state("stage_end", state)
    assert state == {}
    o.on_train_state("mid_stage", state)
    assert torch.equal(state["prev_model"]["weight"], model.weight.detach())
    with torch.no_grad():
        model.weight.add_(1.0)
    o.on_stage_start(2, ONE_PROCESS, state)  # a resumed stage gets π_1 back from its state
    assert torch.equal(o.prev_model.weight, state["prev_model"]["weight"])
    o.on_stage_end(2, StageRecord(stage=2, task="b"), cached=True)  # a cache hit: nothing recomputed
    assert o.prev_model is None


def test_diagnostics_keep_pi_0_and_pi_prev_in_host_memory_and_score_one_at_a_time_on_the_policys_device(
        monkeypatch) -> None:
    """π_0 and π_{t-1} are host copies made parameter by parameter (fresh tensors, no gradients); at the stage
    end each is moved to the policy's device for its scores, one after the other, and back to the host after."""
    import opr.diagnostics as diag
    import opr.observers as obs

    model = torch.nn.Linear(2, 2)
    o = DiagnosticsObserver(SimpleNamespace(model=model), benchmark=SimpleNamespace(tasks=[SimpleNamespace(name="a")]),
                            per_task=1, seed=0, eval_settings=SimpleNamespace(batch_size=1, compute_dtype="float32"),
                            max_length=8)
    with torch.no_grad():
        model.weight.add_(1.0)
    o.on_stage_start(2, ONE_PROCESS, None)
    for copy in (o.base_model, o.prev_model):
        assert {p.device.type for p in copy.parameters()} == {"cpu"} and not copy.training
        assert all(not p.requires_grad for p in copy.parameters())
        assert copy.weight.data_ptr() != model.weight.data_ptr()
    assert torch.equal(o.prev_model.weight, model.weight) and not torch.equal(o.base_model.weight, model.weight)

    inside: list = []  # which copy is on the policy's device while each score runs

    @contextlib.contextmanager
    def recording(m, device):
        inside.append(m)
        yield
        inside.remove(m)

    scored: list = []
    monkeypatch.setattr(obs, "moved_to", recording)
    monkeypatch.setattr(diag, "sample_probe", lambda *a, **k: [])
    monkeypatch.setattr(diag, "greedy_responses", lambda *a, **k: [])
    monkeypatch.setattr(diag, "policy_kl", lambda a, b, *r, **k: scored.append(("kl", b, list(inside))) or {})
    monkeypatch.setattr(diag, "base_logprob", lambda b, *r, **k: scored.append(("lp", b, list(inside))) or {})
    o.on_stage_end(2, StageRecord(stage=2, task="a"), cached=False)
    base, prev = o.base_model, scored[-1][1]
    assert scored == [("kl", base, [base]), ("lp", base, [base]), ("kl", prev, [prev])]
