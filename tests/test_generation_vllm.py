"""``rollout.backend=vllm``: the start-up checks (real: vllm is not installed here), and the adapter's contract
against a stand-in ``vllm`` module (request building, ordering, EOS counting, seeds, engine rebuilds only when
the torch weights change). vLLM itself needs a GPU and is not exercised here."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_cfg

from opr.backbones import load_tiny
from opr.config import ConfigError, check_backend, validate
from opr.generation import SamplingConfig, generate
from opr.generation_vllm import VLLMBackend, weight_fingerprint


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


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in ``vllm``: each completion is the prompt's last 2 tokens, then EOS for even sample indices."""
    calls = {"builds": [], "generate": []}

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, model, tokenizer, **kw):
            assert (Path(model) / "config.json").exists() and (Path(model) / "model.safetensors").exists()
            calls["builds"].append(kw)
            self.eos = None

        def generate(self, requests, params, use_tqdm=True):
            calls["generate"].append((requests, params))
            outs = []
            for req, p in zip(requests, params):
                comps = []
                for s in range(p.n):
                    ids = req["prompt_token_ids"][-2:] + ([EOS] if s % 2 == 0 else [])
                    comps.append(_Completion(ids, f"r{len(outs)}s{s}", -1.0 * len(ids)))
                outs.append(types.SimpleNamespace(outputs=comps))
            return outs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


EOS = None


def test_adapter_requests_order_eos_and_rebuilds(fake_vllm):
    global EOS
    bb = load_tiny()
    EOS = bb.tokenizer.eos_token_id
    backend = VLLMBackend(gpu_memory_utilization=0.5)
    bb.generation_backend = backend
    prompts = ["a question", "another, longer question", "q"]
    out = generate(bb, prompts, SamplingConfig(max_new_tokens=7, temperature=1.0, top_p=0.9, num_samples=2), seed=5)
    assert [[g.text for g in gens] for gens in out] == [["r0s0", "r0s1"], ["r1s0", "r1s1"], ["r2s0", "r2s1"]]
    assert [g.num_tokens for g in out[0]] == [2, 2]  # the EOS of sample 0 is not counted
    assert [g.mean_logprob for g in out[0]] == [-1.0, -1.0]
    requests, params = fake_vllm["generate"][0]
    assert requests[0]["prompt_token_ids"] == bb.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    assert [p.seed for p in params] == [5, 6, 7] and {p.top_p for p in params} == {0.9}
    assert {(p.n, p.max_tokens, p.temperature) for p in params} == {(2, 7, 1.0)}
    assert fake_vllm["builds"] == [{"gpu_memory_utilization": 0.5, "dtype": "auto", "enforce_eager": True,
                                    "tensor_parallel_size": 1}]

    # same weights: no rebuild; greedy requests carry no seed and top_p 1
    out = generate(bb, prompts[:1], SamplingConfig(max_new_tokens=3), seed=5)
    assert backend.engine_builds == 1 and len(out[0]) == 1
    _, params = fake_vllm["generate"][1]
    assert params[0].seed is None and params[0].top_p == 1.0 and params[0].temperature == 0.0

    # an optimizer step changes the weights: the engine is rebuilt from them
    before = weight_fingerprint(bb.model)
    with torch.no_grad():
        next(bb.model.parameters()).add_(1e-3)
    assert weight_fingerprint(bb.model) != before
    generate(bb, prompts[:1], SamplingConfig(max_new_tokens=3), seed=5)
    assert backend.engine_builds == 2
    folder = backend._folder
    backend.close()
    assert not folder.exists()
