"""``rollout.backend=vllm``: the start-up checks (real: vllm is not installed here), and the backend's contract
against a stand-in ``vllm`` module that records every call in order: the engine's arguments (external launcher,
seed, sleep mode, dummy load format, max_model_len from the run's limits), one build across weight changes, the
trainer's weights copied in place only when they changed, wake-up / sleep around each generation, the prefix
cache reset, and each rank generating only its share with the gathered answers equal to one process's. vLLM
itself needs a GPU and is not exercised here."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_VARIABLES, TINY, clear_launch_env, compose_cfg, on_thread_ranks

from opr.backbones import load_tiny
from opr.config import ConfigError, check_backend, validate
from opr.generation import SamplingConfig, generate, generate_encoded
from opr.generation_vllm import VLLMBackend, max_model_len_for, weight_fingerprint


def test_unknown_backend_and_missing_vllm_are_named(monkeypatch):
    with pytest.raises(ConfigError, match=r"rollout.backend must be one of \['hf', 'vllm'\], got 'sglang'"):
        check_backend("sglang")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the vllm package"):
        check_backend("vllm")
    check_backend("hf")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_config_refuses_vllm_backend_without_the_package(tmp_path):
    with pytest.raises(ConfigError, match="rollout.backend=vllm needs the vllm package"):
        validate(compose_cfg(TINY + ["rollout.backend=vllm"], tmp_path))
    with pytest.raises(ConfigError, match="rollout.backend must be one of"):
        validate(compose_cfg(TINY + ["rollout.backend=fast"], tmp_path))


class _Completion:
    def __init__(self, token_ids, text, cumulative_logprob):
        self.token_ids, self.text, self.cumulative_logprob = token_ids, text, cumulative_logprob


class _EngineModel:
    """The stand-in engine's model: ``load_weights`` records the pairs it is given (copies of the tensors)."""

    def __init__(self, events):
        self.events = events

    def load_weights(self, weights):
        pairs = [(name, t.detach().clone()) for name, t in weights]
        self.events.append(("load_weights", pairs))
        return {name for name, _ in pairs}


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in ``vllm`` whose engines log every call (``calls["events"]``, in order). Each completion is the
    prompt's last 2 tokens, then EOS for even sample indices; its text names the prompt's tokens, the request
    seed and the sample, so it depends on the request only (not on which rank or list position sent it)."""
    calls = {"builds": [], "events": [], "folders": [], "fail_generate": False}
    lock = threading.Lock()

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, model, tokenizer, **kw):
            folder = Path(model)
            assert tokenizer == model and (folder / "config.json").exists()
            assert (folder / "tokenizer_config.json").exists()
            with lock:
                calls["builds"].append(kw)
                calls["folders"].append(sorted(p.name for p in folder.iterdir()))
            self.events = []
            with lock:
                calls["events"].append(self.events)
            self.events.append(("build",))
            model_obj = _EngineModel(self.events)
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model_obj))))

        def sleep(self, level=1):
            self.events.append(("sleep", level))

        def wake_up(self, tags=None):
            self.events.append(("wake_up", tuple(tags)))

        def reset_prefix_cache(self):
            self.events.append(("reset_prefix_cache",))

        def generate(self, requests, params, use_tqdm=True):
            self.events.append(("generate", [list(r["prompt_token_ids"]) for r in requests],
                                [p.seed for p in params]))
            if calls["fail_generate"]:
                raise RuntimeError("CUDA out of memory (stand-in)")
            outs = []
            for req, p in zip(requests, params):
                comps = []
                for s in range(p.n):
                    ids = req["prompt_token_ids"][-2:] + ([EOS] if s % 2 == 0 else [])
                    comps.append(_Completion(ids, f"{req['prompt_token_ids'][-3:]}|{p.seed}|s{s}", -1.0 * len(ids)))
                outs.append(types.SimpleNamespace(outputs=comps))
            return outs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    clear_launch_env(monkeypatch)  # the backend sets them for one process; put back as they were after the test
    return calls



EOS = None
PROMPTS = ["a question", "another, longer question", "q", "a fourth one", "five", "the sixth prompt here"]


def _tiny():
    global EOS
    bb = load_tiny()
    EOS = bb.tokenizer.eos_token_id
    return bb


def _names(events):
    return [e[0] if e[0] != "wake_up" and e[0] != "sleep" else (e[0], e[1]) for e in events]


def test_engine_arguments_and_config_folder(fake_vllm):
    bb = _tiny()
    backend = VLLMBackend(gpu_memory_utilization=0.5, max_model_len=96, seed=7)
    bb.generation_backend = backend
    generate(bb, PROMPTS[:2], SamplingConfig(max_new_tokens=4))
    assert fake_vllm["builds"] == [{
        "gpu_memory_utilization": 0.5, "dtype": "auto", "enforce_eager": False, "tensor_parallel_size": 1,
        "distributed_executor_backend": "external_launcher", "seed": 7, "enable_sleep_mode": True,
        "load_format": "dummy", "max_model_len": 96}]
    # the engine is built from the config, generation config and tokenizer only: no weights are written
    files = fake_vllm["folders"][0]
    assert "config.json" in files and "generation_config.json" in files
    assert not [f for f in files if f.endswith((".safetensors", ".bin"))]
    # one process without a process group: the external launcher's variables, rank 0 of 1 on a free port
    assert [os.environ.get(k) for k in LAUNCH_VARIABLES[:4]] == ["0", "0", "1", "127.0.0.1"]
    assert int(os.environ["MASTER_PORT"]) > 0
    folder = backend._folder
    backend.close()
    assert not folder.exists()
    assert "max_model_len" not in VLLMBackend().engine_args  # None: vLLM's default (the model's context)


def test_requests_order_eos_and_seeds(fake_vllm):
    bb = _tiny()
    bb.generation_backend = VLLMBackend()
    prompts = PROMPTS[:3]
    out = generate(bb, prompts, SamplingConfig(max_new_tokens=7, temperature=1.0, top_p=0.9, num_samples=2), seed=5)
    encoded = [bb.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert [[g.text for g in gens] for gens in out] == [[f"{e[-3:]}|{5 + i}|s0", f"{e[-3:]}|{5 + i}|s1"]
                                                         for i, e in enumerate(encoded)]
    assert [g.num_tokens for g in out[0]] == [2, 2]  # the EOS of sample 0 is not counted
    assert [g.mean_logprob for g in out[0]] == [-1.0, -1.0]
    assert out[0][0].token_ids == tuple(encoded[0][-2:])
    (generated,) = [e for e in fake_vllm["events"][0] if e[0] == "generate"]
    assert generated[1] == encoded and generated[2] == [5, 6, 7]
    # greedy requests carry no seed and top_p 1
    generate(bb, prompts[:1], SamplingConfig(max_new_tokens=3), seed=5)
    assert [e for e in fake_vllm["events"][0] if e[0] == "generate"][1][2] == [None]


def test_one_build_weights_copied_in_place_only_when_changed(fake_vllm):
    bb = _tiny()
    backend = VLLMBackend()
    bb.generation_backend = backend
    greedy = SamplingConfig(max_new_tokens=3)
    generate(bb, PROMPTS[:2], greedy)
    events = fake_vllm["events"][0]
    # first call: built awake, the trainer's weights copied in, cache reset, generated, asleep
    assert _names(events) == ["build", "load_weights", "reset_prefix_cache", "generate", ("sleep", 1)]
    (_, pairs) = events[1]
    expected = list(bb.model.named_parameters())
    assert [n for n, _ in pairs] == [n for n, _ in expected]
    assert all(torch.equal(t, p) for (_, t), (_, p) in zip(pairs, expected))

    # same weights: woken (weights, then KV cache), nothing copied, no cache reset
    del events[:]
    generate(bb, PROMPTS[:1], greedy)
    assert _names(events) == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), "generate", ("sleep", 1)]

    # an optimizer step changes the weights: copied in between the two wake-ups, then the cache reset
    before = weight_fingerprint(bb.model)
    with torch.no_grad():
        next(bb.model.parameters()).add_(1e-3)
    assert weight_fingerprint(bb.model) != before
    del events[:]
    generate(bb, PROMPTS[:1], greedy)
    assert _names(events) == [("wake_up", ("weights",)), "load_weights", "reset_prefix_cache",
                              ("wake_up", ("kv_cache",)), "generate", ("sleep", 1)]
    assert torch.equal(events[1][1][0][1], next(bb.model.parameters()))
    with torch.no_grad():
        next(bb.model.parameters()).add_(1e-3)
    generate(bb, PROMPTS[:1], greedy)
    assert len(fake_vllm["builds"]) == 1 and backend.engine_builds == 1 and backend.weight_loads == 3


def test_sleep_level_2_copies_the_weights_at_every_wake_up(fake_vllm):
    bb = _tiny()
    bb.generation_backend = VLLMBackend(sleep_level=2)
    generate(bb, PROMPTS[:1], SamplingConfig(max_new_tokens=3))
    events = fake_vllm["events"][0]
    del events[:]
    generate(bb, PROMPTS[:1], SamplingConfig(max_new_tokens=3))  # same weights, but level 2 dropped them
    assert _names(events) == [("wake_up", ("weights",)), "load_weights", "reset_prefix_cache",
                              ("wake_up", ("kv_cache",)), "generate", ("sleep", 2)]


def test_engine_sleeps_when_generation_fails(fake_vllm):
    bb = _tiny()
    backend = VLLMBackend()
    bb.generation_backend = backend
    fake_vllm["fail_generate"] = True
    with pytest.raises(RuntimeError, match="stand-in"):
        generate(bb, PROMPTS[:1], SamplingConfig(max_new_tokens=3))
    assert fake_vllm["events"][0][-1] == ("sleep", 1) and backend.asleep


def test_partitioned_parameters_are_an_error(fake_vllm):
    bb = _tiny()
    bb.generation_backend = VLLMBackend()
    with torch.no_grad():
        bb.model.model.norm.weight.data = torch.empty(0)  # what a ZeRO-3 partition looks like outside a gather
    with pytest.raises(RuntimeError, match=r"1 parameter\(s\) of the trainer's model are empty \(first: "
                                           r"model.norm.weight\): they are ZeRO-3 partitions"):
        generate(bb, PROMPTS[:1], SamplingConfig(max_new_tokens=3))


SHARED = dict(sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2, batch_size=2), seed=11,
              max_new_tokens=[6, 3, 6, 2, 6, 3], prompt_indices=range(10, 16))


def test_each_rank_generates_its_share_and_all_get_the_whole_answer(fake_vllm):
    bb = _tiny()
    encoded = [bb.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    bb.generation_backend = VLLMBackend()
    single = generate_encoded(bb, encoded, **SHARED)

    def rank(ranks):
        mine = copy.copy(bb)  # the same model, its own engine
        mine.generation_backend = VLLMBackend()
        counts: list[int] = []
        out = generate_encoded(mine, encoded, ranks=ranks, share_counts=counts, **SHARED)
        return out, counts, mine.generation_backend._llm.events  # this rank's engine's calls

    (out0, counts0, events0), (out1, counts1, events1) = on_thread_ranks(2, rank)
    assert out0 == out1 == single
    # each rank's engine got only its share (as the built-in loop shares the length-sorted batches); the engines
    # are listed in rank order here (the stand-in's own list is in the order the threads built them)
    engines = [events0, events1]
    assert len(fake_vllm["events"]) == 3 and all(any(e is x for x in fake_vllm["events"]) for e in engines)
    sent = [[ids for e in events if e[0] == "generate" for ids in e[1]] for events in engines]
    assert counts0 == counts1 == [len(s) for s in sent]
    assert all(sent) and sorted(map(tuple, sent[0] + sent[1])) == sorted(map(tuple, encoded))
    seeds = sorted(s for events in engines for e in events if e[0] == "generate" for s in e[2])
    assert seeds == [11 + i for i in range(10, 16)]  # seeded by position in the whole list, not by rank


def test_the_built_in_loop_shares_and_gathers_the_same_way():
    bb = load_tiny()
    encoded = [bb.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    single = generate_encoded(bb, encoded, desc=False, **SHARED)

    def rank(ranks):
        counts: list[int] = []
        return generate_encoded(bb, encoded, desc=False, ranks=ranks, share_counts=counts, **SHARED), counts

    (out0, counts0), (out1, counts1) = on_thread_ranks(2, rank)
    assert out0 == out1 == single and counts0 == counts1 and min(counts0) > 0


def test_a_rank_with_an_empty_share_still_builds_its_engine(fake_vllm):
    bb = _tiny()
    backend = VLLMBackend()
    bb.generation_backend = backend
    assert backend.generate(bb, [], SamplingConfig(), seed=0) == []
    assert backend.engine_builds == 1 and _names(fake_vllm["events"][0]) == ["build"]


def test_backend_option_errors():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: the engine beside the trainer holds a whole "
                                         r"model on each rank's GPU \(tensor_parallel_size=1 only\)"):
        VLLMBackend(tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"sleep_level must be one of \[1, 2\], got 3"):
        VLLMBackend(sleep_level=3)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\], got 0"):
        VLLMBackend(gpu_memory_utilization=0)


def test_max_model_len_from_the_run_limits(tmp_path):
    from opr.run import method_answer_limits, vllm_options

    assert max_model_len_for(1024, [512, 64], 131072) == 1536
    assert max_model_len_for(1024, [512], 1200) == 1200  # never beyond the model's context
    assert max_model_len_for(None, [512], 131072) is None  # prompts not capped: the model's context
    assert method_answer_limits({"max_new_tokens": 40, "grpo": {"max_new_tokens": 96}, "x": [{"max_new_tokens": 7}]}) \
        == [40, 96, 7]

    bb = load_tiny()
    bench = types.SimpleNamespace(tasks=[types.SimpleNamespace(max_new_tokens=24), types.SimpleNamespace(max_new_tokens=48)],
                                  general=[types.SimpleNamespace(max_new_tokens=32)])
    cfg = compose_cfg(TINY + ["eval.max_prompt_length=200", "method=grpo", "method.max_new_tokens=64", "seed=3",
                              "rollout.vllm.gpu_memory_utilization=0.4"], tmp_path)
    options = vllm_options(cfg, bench, bb)
    assert options["max_model_len"] == 200 + 64 and options["seed"] == 3
    assert options["gpu_memory_utilization"] == 0.4 and options["enforce_eager"] is False
    VLLMBackend(**options)  # every option is one the backend takes
    cfg = compose_cfg(TINY + ["eval.max_prompt_length=200"], tmp_path)
    assert vllm_options(cfg, bench, bb)["max_model_len"] == 200 + 48
    assert vllm_options(compose_cfg(TINY + ["rollout.vllm.max_model_len=999"], tmp_path), bench, bb)[
        "max_model_len"] == 999
    assert vllm_options(compose_cfg(TINY, tmp_path), bench, bb)["max_model_len"] is None


@pytest.mark.parametrize("overrides,world,cuda,message", [
    (["rollout.vllm.tensor_parallel_size=2"], 2, False,
     "rollout.backend=vllm needs a CUDA GPU per process (vLLM's engine and its sleep mode run on CUDA only) and "
     "this machine has none (2 processes); use rollout.backend=hf"),
    (["rollout.vllm.tensor_parallel_size=2"], 2, True,
     "rollout.vllm.tensor_parallel_size=2 with 2 processes: the vLLM engine runs beside the trainer, one whole "
     "model on each rank's GPU, so only tensor_parallel_size=1 is allowed"),
    (["rollout.vllm.tensor_parallel_size=4"], 1, True, "rollout.vllm.tensor_parallel_size=4 with 1 process:"),
])
def test_start_up_refusals(overrides, world, cuda, message, tmp_path):
    from opr.run import check_rollout_backend

    cfg = compose_cfg(TINY + ["engine=deepspeed"] + overrides, tmp_path)
    cfg.rollout.backend = "vllm"  # (validation refuses vllm where it is not installed, as here)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_rollout_backend(cfg, world, cuda)
    check_rollout_backend(compose_cfg(TINY + ["engine=deepspeed"], tmp_path), world, cuda)  # hf: nothing to refuse
    ok = compose_cfg(TINY + ["engine=deepspeed"], tmp_path)
    ok.rollout.backend = "vllm"
    if cuda:
        check_rollout_backend(ok, world, cuda)
