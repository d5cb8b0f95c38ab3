"""The memory plan (opr.memory_plan, python -m opr.tools.plan): its arithmetic against the bytes of real tensors
on CPU (parameters of four architectures, KV cache, the torch engine's weights, gradients and AdamW moments,
activations saved for backward), the published sizes of the 7-8B presets, the start-up refusal, and the torch
engine's fp32 master weights under bf16 compute."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import TINY, compose_cfg

from opr.memory_plan import PRESET_SHAPES, ModelShape, kv_cache_bytes, layer_activation_bytes, plan


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small(kind: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, tie_word_embeddings=False))


@pytest.mark.parametrize("kind", ["tiny", "smollm2_random", "qwen2", "qwen3"])
def test_parameter_count_equals_the_model(kind):
    from opr.backbones import load_smollm2_135m_random, load_tiny

    model = {"tiny": lambda: load_tiny(seed=0).model, "smollm2_random": lambda: load_smollm2_135m_random().model,
             "qwen2": lambda: _small("qwen2"), "qwen3": lambda: _small("qwen3")}[kind]()
    shape = ModelShape.from_config(model.config.to_dict())
    assert shape.params == _numel(model)
    if kind == "smollm2_random":
        assert shape == PRESET_SHAPES["smollm2_135m"]


def test_published_preset_sizes():
    # the parameter counts the models' cards and safetensors indexes give
    assert PRESET_SHAPES["qwen2_5_7b_instruct"].params == 7_615_616_512
    assert PRESET_SHAPES["qwen3_8b"].params == 8_190_735_360
    assert PRESET_SHAPES["llama3_1_8b_instruct"].params == 8_030_261_248
    assert PRESET_SHAPES["smollm2_135m"].params == 134_515_008


def test_kv_cache_bytes_equal_the_cache_of_a_prefill():
    from transformers import DynamicCache

    from opr.backbones import load_tiny
    from opr.generation import cache_keyword

    model = load_tiny(seed=0).model
    shape = ModelShape.from_config(model.config.to_dict())
    rows, tokens = 3, 17
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.ones(rows, tokens, dtype=torch.long), use_cache=True, **{cache_keyword(model): cache})
    measured = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                   for layer in cache.layers)
    assert kv_cache_bytes(shape, rows, tokens, "float32") == measured


def _tiny_plan_cfg(**engine) -> dict:
    return {"engine": {"name": "torch", "compute_dtype": "float32", "batch_size": 2, "max_length": 32, **engine},
            "method": {"name": "seq_sft"}, "eval": {"batch_size": 4, "max_prompt_length": 16},
            "rollout": {"batch_size": 4, "backend": "hf"}, "analysis": {"drift": False, "diagnostics": False},
            "benchmark": {"max_new_tokens": 8}, "backbone": {"dtype": "float32"}}


def test_torch_engine_weights_gradients_and_adamw_moments_equal_the_tensors(tmp_path):
    from opr.backbones import load_tiny
    from opr.engine.torch_engine import TorchTrainer
    from opr.types import SFTExample

    backbone = load_tiny(seed=0)
    trainer = TorchTrainer(backbone, batch_size=2, max_length=32)
    trainer.set_stage(1)
    trainer.begin_stage(1)
    examples = [SFTExample(prompt=f"{i} plus 1?", response=f"{i + 1}", task="a", example_id=str(i)) for i in range(2)]
    # one step, then the state as AdamW and autograd leave it (gradients kept: zero_grad comes before a step)
    trainer.fit_sft(examples, task="a", steps=1)
    model = backbone.model
    loss = model(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long)).loss
    loss.backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for k, v in s.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    shape = ModelShape.from_config(model.config.to_dict())
    items = {i.name.split(" (")[0]: i.gpu for i in plan(_tiny_plan_cfg(), shape).items}
    assert (items["weights"], items["gradients"], items["optimizer: AdamW moments"]) == (weights, grads, moments)


@pytest.mark.parametrize("kind", ["tiny", "smollm2_random"])
@pytest.mark.parametrize("tokens", [64, 512])
def test_activation_estimate_is_close_to_what_backward_saves(kind, tokens):
    """The tensors autograd saves in one decoder layer's forward (the weights it also keeps left out): measured
    0.91 (tiny) and 0.94 (SmolLM2's shape) of the estimate's bytes at 64 and 512 tokens, on CPU in fp32."""
    from opr.backbones import load_smollm2_135m_random, load_tiny

    model = load_tiny(seed=0).model if kind == "tiny" else load_smollm2_135m_random().model
    shape = ModelShape.from_config(model.config.to_dict())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):  # every tensor autograd keeps for backward, once per storage, weights aside
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    layer = model.model.layers[0]
    hidden = torch.randn(1, tokens, shape.hidden, requires_grad=True)
    position = torch.arange(tokens).unsqueeze(0)
    emb = model.model.rotary_emb(hidden, position)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, position_embeddings=emb, position_ids=position)
    measured = sum(saved.values())
    estimate = layer_activation_bytes(shape, tokens, "float32")
    assert 0.85 <= estimate / measured <= 1.15, (estimate, measured)


def test_plan_cli_prints_the_verdict_and_exits_1_when_it_does_not_fit(capsys):
    from opr.tools.plan import main

    assert main(["--gpus", "8", "--gpu-gb", "80", "experiment=trace_7b", "method=opr", "benchmark.root=/tmp"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("peak per GPU: ") and out.strip().endswith("(fits in 80 GB)")
    assert main(["--gpus", "1", "--gpu-gb", "80", "backbone=qwen2_5_7b_instruct", "method=opr"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "does not fit in 80 GB" in last


def test_a_run_that_cannot_fit_the_gpu_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    from opr import run
    from opr.config import ConfigError, validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=24e9))
    cfg = validate(compose_cfg(["backbone=qwen2_5_7b_instruct", "method=opr"], tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"needs \d+\.\d GB per GPU, more than 90% of this GPU's 24.0 GB; the "
                                          r"largest items: .*check_memory=false starts anyway"):
        run.check_memory_plan(cfg, 1)
    cfg.check_memory = False
    run.check_memory_plan(cfg, 1)  # the escape hatch
    tiny = validate(compose_cfg(TINY, tmp_path / "tiny"))
    run.check_memory_plan(tiny, 1)  # no shape known for tiny: not checked


def test_torch_engine_keeps_fp32_master_weights_under_bf16_compute():
    from opr.backbones import load_tiny
    from opr.engine.torch_engine import TorchTrainer
    from opr.types import SFTExample

    backbone = load_tiny(seed=0)
    backbone.model.to(torch.bfloat16)  # as a hub preset with dtype: bfloat16 loads it
    trainer = TorchTrainer(backbone, batch_size=2, max_length=32, compute_dtype="bfloat16")
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float32}
    seen = []
    hook = backbone.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.set_stage(1)
    examples = [SFTExample(prompt=f"{i} plus 1?", response=f"{i + 1}", task="a", example_id=str(i)) for i in range(2)]
    trainer.fit_sft(examples, task="a", steps=1)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # computed in bf16
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float32}  # updated in fp32
    assert {v.dtype for s in trainer.optimizer.state.values() for v in s.values() if v.dim()} == {torch.float32}


METHODS = ("seq_sft", "vanilla_replay", "opr", "lowscore_replay", "sdft", "grpo", "self_distill", "sft_then_grpo")


@pytest.mark.parametrize("backbone", ["qwen2_5_7b_instruct", "qwen3_8b", "llama3_1_8b_instruct"])
@pytest.mark.parametrize("preset", ["trace_7b", "scale_7b"])
def test_preset_7b_plans_per_method_fit_80gb(preset, backbone):
    """The 7-8B presets (experiment=trace_7b, and experiment=scale_7b on the default stream) fit 8 x 80 GB for
    every method and every 7-8B backbone."""
    from opr.tools.plan import build_plan

    for method in METHODS:
        data = ["benchmark.root=/tmp"] if preset == "trace_7b" else []
        result, _ = build_plan([f"experiment={preset}", f"backbone={backbone}", f"method={method}", *data], 8, 80.0)
        assert result.fits(), (method, result.table())


def test_without_a_prompt_cap_a_7b_plan_counts_the_whole_context():
    """eval.max_prompt_length=null plans the KV cache for the model's context (Qwen2.5: 32768 tokens), which
    does not fit: why experiment=scale_7b caps prompts at 1024."""
    from opr.tools.plan import build_plan

    zero3 = ["backbone=qwen2_5_7b_instruct", "engine=deepspeed", "engine.zero_stage=3", "engine.compute_dtype=bfloat16",
             "method=seq_sft"]
    uncapped, _ = build_plan(zero3, 8, 80.0)
    capped, _ = build_plan([*zero3, "eval.max_prompt_length=1024"], 8, 80.0)
    assert any("x 33024 tokens" in i.name for i in uncapped.items) and not uncapped.fits()
    assert capped.fits()


def _frozen_items(overrides: list[str], gpus: int = 8) -> dict[str, tuple[float, tuple[str, ...]]]:
    from opr.tools.plan import build_plan

    result, _ = build_plan(["backbone=qwen2_5_7b_instruct", *overrides], gpus, 80.0)
    return {i.name: (i.gpu, i.phases) for i in result.items if "reference" in i.name or "teacher" in i.name}


def test_zero3_plans_the_reference_and_teacher_as_one_shard_plus_a_working_set():
    """Under ZeRO-3 a frozen model costs 1/W of a copy (both phases) plus what its forward gathers (training
    only); ZeRO-2 and the torch engine keep a full copy (the torch engine's in fp32, as its master weights);
    teacher=student has none."""
    from opr.memory_plan import frozen_working_set

    shape = PRESET_SHAPES["qwen2_5_7b_instruct"]
    copy = 2 * shape.params  # bf16
    zero3 = ["engine=deepspeed", "engine.zero_stage=3", "engine.compute_dtype=bfloat16"]
    working = frozen_working_set(shape, 2)
    assert working == 2 * shape.vocab * shape.hidden  # the output layer is the largest module of Qwen2.5-7B
    for method, label in ((["method=grpo", "method.kl_coef=0.05"], "GRPO KL reference"),
                          (["method=self_distill", "method.teacher=ema"], "teacher (ema)")):
        items = _frozen_items([*zero3, *method])
        assert items == {f"{label} (shard)": (copy / 8, ("train", "generate")),
                         f"{label}: gathered while it runs": (working, ("train",))}
        zero2 = _frozen_items(["engine=deepspeed", "engine.zero_stage=2", "engine.compute_dtype=bfloat16", *method])
        assert zero2 == {f"{label} (full copy)": (copy, ("train", "generate"))}
        torch_engine = _frozen_items(["engine.compute_dtype=bfloat16", *method], gpus=1)
        assert torch_engine == {f"{label} (full copy)": (4 * shape.params, ("train", "generate"))}
    assert _frozen_items([*zero3, "method=grpo"]) == {}  # kl_coef 0: no reference
    assert _frozen_items([*zero3, "method=self_distill", "method.teacher=student"]) == {}
    offload = _frozen_items([*zero3, "engine.offload_param=cpu", "method=self_distill"])
    assert offload["teacher (frozen) (shard)"][0] == 0  # the partitions live on the host


def test_diagnostics_copies_are_planned_on_the_host_with_one_on_the_gpu_while_it_scores():
    from opr.tools.plan import build_plan

    shape = PRESET_SHAPES["qwen2_5_7b_instruct"]
    result, _ = build_plan(["backbone=qwen2_5_7b_instruct", "engine=deepspeed", "engine.zero_stage=3",
                            "engine.compute_dtype=bfloat16", "analysis.diagnostics=true"], 8, 80.0)
    [item] = [i for i in result.items if i.name.startswith("diagnostics")]
    # every rank scores its share of the probe: two bf16 host copies per rank, 8 ranks on the node
    assert (item.gpu, item.host, item.phases) == (2 * shape.params, 8 * 4 * shape.params, ("generate",))


def test_drift_copies_are_one_model_across_the_ranks():
    """Each rank keeps the base weights of its share of the parameters and copies the same share of each
    stage's weights: two copies of the model across all ranks, so a node holds its ranks' part of them (before
    the drift was shared, rank 0 held both whole copies)."""
    from opr.tools.plan import build_plan

    shape = PRESET_SHAPES["qwen2_5_7b_instruct"]
    zero3 = ["backbone=qwen2_5_7b_instruct", "engine=deepspeed", "engine.zero_stage=3",
             "engine.compute_dtype=bfloat16", "analysis.drift=true"]
    for gpus, nodes, per_node in ((8, 1, 2 * 2 * shape.params), (16, 2, 2 * 2 * shape.params / 2)):
        result, _ = build_plan(zero3, gpus, 80.0, nodes=nodes)
        [item] = [i for i in result.items if i.name.startswith("drift")]
        assert (item.gpu, item.host) == (0, pytest.approx(per_node))  # two bf16 copies of 1/W each, 8 ranks a node
    result, _ = build_plan(["backbone=qwen2_5_7b_instruct", "analysis.drift=true"], 1, 80.0)
    [item] = [i for i in result.items if i.name.startswith("drift")]
    assert item.host == 2 * 4 * shape.params  # the torch engine's fp32 weights, one process


def test_vllm_is_planned_while_it_generates_and_asleep_while_training(monkeypatch):
    """rollout.backend=vllm: the engine's share of the GPU (its weights and KV cache, in place of the built-in
    loop's cache) in the generate phase only; asleep at sleep_level 1 its weights are in host memory, one
    16-bit copy per rank; at level 2 nowhere."""
    import importlib.util

    from opr.tools.plan import build_plan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    shape = PRESET_SHAPES["qwen2_5_7b_instruct"]
    base = ["backbone=qwen2_5_7b_instruct", "engine=deepspeed", "engine.zero_stage=3", "engine.compute_dtype=bfloat16",
            "rollout.backend=vllm", "rollout.vllm.gpu_memory_utilization=0.25"]
    result, _ = build_plan(base, 8, 80.0)
    [item] = [i for i in result.items if i.name.startswith("vLLM")]
    assert (item.gpu, item.host, item.phases) == (0.25 * 80e9, 8 * 2 * shape.params, ("generate",))
    assert not [i for i in result.items if i.name.startswith("KV cache")]  # vLLM's cache is inside its share
    hf, _ = build_plan(base[:4], 8, 80.0)
    assert [i for i in hf.items if i.name.startswith("KV cache")] and not [i for i in hf.items if "vLLM" in i.name]
    level2, _ = build_plan([*base, "rollout.vllm.sleep_level=2"], 8, 80.0)
    assert [i.host for i in level2.items if i.name.startswith("vLLM")] == [0]
    # training does not see the engine: the train phase is the same as without vLLM's share
    assert result.phase_bytes("train") == hf.phase_bytes("train")
