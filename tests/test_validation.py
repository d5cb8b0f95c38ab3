"""Bad values are refused by ``opr.config.validate`` with a ConfigError naming the value and what is allowed,
before anything heavy runs (issue 16): numeric ranges from one table, lists given as a single value, stream
tasks without data; and evaluation prompts longer than the model's context are cut and counted."""

import dataclasses
import json
import logging
import re
import subprocess
import sys

import pytest
from conftest import CONF, ROOT, TINY, compose_cfg
from omegaconf import OmegaConf

from opr.config import GROUPS, RANGES, ConfigError, RunConfig, numeric_options, schema_for, validate


def _validate(override: str, tmp_path):
    """Validate TINY plus ``override`` (space-separated); a TRACE override drops TINY's mini_trace sizes."""
    extra = override.split()
    base = ["backbone=tiny", "benchmark.root=/data/TRACE"] if "benchmark=trace" in extra else TINY
    return validate(compose_cfg(base + extra, tmp_path))


# ------------------------------------------------------------------------------------ numeric ranges
@pytest.mark.parametrize("override,message", [
    # the cases of issue 16: refused only after real work, or with a raw traceback
    ("method.top_p=2", "method.top_p must be in (0, 1], got 2.0"),
    ("engine.lr=-1", "engine.lr must be > 0, got -1.0"),
    ("engine.epochs=0", "engine.epochs must be > 0, got 0.0"),
    ("engine.max_length=1", "engine.max_length must be >= 2 (room for one prompt and one answer token), got 1"),
    ("eval.temperature=-1", "eval.temperature must be >= 0 (0 = greedy), got -1.0"),
    ("seed=-1", "seed must be in [0, 4294967295], got -1"),
    ("seed=4294967296", "seed must be in [0, 4294967295], got 4294967296"),
    ("benchmark.train_size=0", "benchmark.train_size must be >= 1 (a stream task needs training examples), got 0"),
    ("eval.max_examples=-1", "eval.max_examples must be >= 1 or null (null evaluates every example), got -1"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0 (0 keeps every stage), got -1"),
    # the rest of the table, a value of each
    ("budget=0", "budget must be in (0, 1] (replay examples per stage / current task's train size), got 0.0"),
    ("engine.batch_size=0", "engine.batch_size must be >= 1, got 0"),
    ("engine.grad_accum=0", "engine.grad_accum must be >= 1, got 0"),
    ("engine.warmup_ratio=1.5", "engine.warmup_ratio must be in [0, 1] (a fraction of the stage's optimizer steps), got 1.5"),
    ("engine.max_grad_norm=-1", "engine.max_grad_norm must be >= 0 or null (0 or null: no clipping), got -1.0"),
    ("engine.max_steps=0", "engine.max_steps must be >= 1 or null (null: no cap), got 0"),
    ("engine.weight_decay=-0.1", "engine.weight_decay must be >= 0, got -0.1"),
    ("engine.betas=[0.9,1.0]", "engine.betas.1 must be in [0, 1), got 1.0"),
    ("engine.lr=nan", "engine.lr must be > 0, got nan"),
    ("+engine.epochs_per_task={emotion:0}", "engine.epochs_per_task.emotion must be > 0, got 0.0"),
    ("engine=deepspeed engine.lr=0", "engine.lr must be > 0, got 0.0"),
    ("engine=deepspeed engine.zero_stage=1", "engine.zero_stage must be in [2, 3], got 1"),
    ("eval.max_examples=0", "eval.max_examples must be >= 1 or null"),
    ("eval.max_prompt_length=0", "eval.max_prompt_length must be >= 1 or null, got 0"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("rollout.batch_size=0", "rollout.batch_size must be >= 1, got 0"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization must be in (0, 1], got 1.5"),
    ("rollout.vllm.sleep_level=3", "rollout.vllm.sleep_level must be in [1, 2] (vLLM's sleep levels), got 3"),
    ("rollout.vllm.max_model_len=1", "rollout.vllm.max_model_len must be >= 2 or null (room for one prompt and one "
                                     "answer token), got 1"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps must be >= 1 or null (null: at stage ends only), got 0"),
    ("analysis.k=0", "analysis.k must be >= 1, got 0"),
    ("analysis.probe_per_task=-1", "analysis.probe_per_task must be >= 0"),
    ("stage_cache.max_gb=0", "stage_cache.max_gb must be > 0, got 0.0"),
    ("benchmark.eval_size=0", "benchmark.eval_size must be >= 1"),
    ("benchmark.test_size=-1", "benchmark.test_size must be >= 0, got -1"),
    ("benchmark.general_size=-1", "benchmark.general_size must be >= 0 (0 = no general set), got -1"),
    ("benchmark.num_tasks=0", "benchmark.num_tasks must be >= 1 or null, got 0"),
    ("benchmark=trace benchmark.max_train=0", "benchmark.max_train must be >= 1 or null"),
    ("benchmark=trace benchmark.max_eval=0", "benchmark.max_eval must be >= 1 or null"),
    ("benchmark=trace benchmark.max_test=-1", "benchmark.max_test must be >= 0 or null (0 skips the test split), got -1"),
    ("benchmark=trace benchmark.max_new_tokens={FOMC:0}", "benchmark.max_new_tokens.FOMC must be >= 1, got 0"),
    ("backbone.hidden_size=0", "backbone.hidden_size must be >= 1, got 0"),
    # method options that are probabilities, temperatures, rewards and counts, in every method that has them
    ("method.temperature=-0.5", "method.temperature must be >= 0 (0 = greedy), got -0.5"),
    ("method.top_p=0", "method.top_p must be in (0, 1], got 0.0"),
    ("method.samples_per_prompt=0", "method.samples_per_prompt must be >= 1, got 0"),
    ("method.pool_size=0", "method.pool_size must be >= 1 or null (null: every training prompt), got 0"),
    ("method.min_reward=101", "method.min_reward must be in [0, 100] or null (rewards are on the 0-100 scale), got 101.0"),
    ("method.max_per_prompt=0", "method.max_per_prompt must be >= 1, got 0"),
    ("method=lowscore_replay method.top_p=1.5", "method.top_p must be in (0, 1], got 1.5"),
    ("method=opr_ranked method.samples_per_prompt=0", "method.samples_per_prompt must be >= 1, got 0"),
    ("method=sdft method.min_reward=150", "method.min_reward must be in [0, 100] (rewards are on the 0-100 scale), got 150.0"),
    ("method=sdft method.max_new_tokens=0", "method.max_new_tokens must be >= 1 or null"),
    ("method=grpo method.top_p=2", "method.top_p must be in (0, 1], got 2.0"),
    ("method=grpo method.min_reward=-1", "method.min_reward must be in [0, 100]"),
    ("method=grpo method.group_size=1", "method.group_size must be >= 2 (a group of 1 has no baseline), got 1"),
    ("method=grpo method.kl_coef=-1", "method.kl_coef must be >= 0, got -1.0"),
    ("method=self_distill method.min_reward=200", "method.min_reward must be in [0, 100]"),
    ("method=self_distill method.ema_rate=0", "method.ema_rate must be in (0, 1], got 0.0"),
    ("method=self_distill method.steps=0", "method.steps must be >= 1, got 0"),
])
def test_out_of_range_values_are_named_with_their_range(override, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _validate(override, tmp_path)


@pytest.mark.parametrize("override", [
    "seed=0", "seed=4294967295", "budget=1", "checkpoint.keep_last=0", "eval.max_examples=null",
    "eval.max_examples=1", "eval.temperature=0", "engine.warmup_ratio=1", "engine.max_grad_norm=null",
    "engine.max_length=2", "analysis.probe_per_task=0", "method.top_p=1", "method.min_reward=0",
    "method.min_reward=100", "method=lowscore_replay method.min_reward=null", "method=opr method.pool_size=null",
    "benchmark.test_size=0", "benchmark.general_size=0", "benchmark=trace benchmark.max_test=0",
])
def test_values_at_the_edges_of_their_range_pass(override, tmp_path):
    _validate(override, tmp_path)


def _group_targets() -> dict[str, set[str]]:
    """Group -> the ``_target_`` of every option file of that group."""
    out: dict[str, set[str]] = {g: set() for g in GROUPS}
    for group in GROUPS:
        for path in (CONF / group).glob("*.yaml"):
            target = OmegaConf.load(path).get("_target_")
            if target:  # variants (opr_ranked) take their target from the option they extend
                out[group].add(target)
    return out


# Numeric options deliberately left without a range: any value is meaningful.
UNRANGED = {
    "benchmark.data_seed",  # seeds Python's random.Random with a string: any integer works
}


def test_every_numeric_option_has_a_range():
    """A new numeric option must get a RANGES entry (or be listed in UNRANGED with its reason)."""
    keys = [k for k in numeric_options(RunConfig) if k.split(".")[0] not in GROUPS]
    for group, targets in _group_targets().items():
        for target in targets:
            keys += numeric_options(schema_for(target), group)
    missing = sorted(set(keys) - set(RANGES) - UNRANGED)
    assert not missing, f"numeric options without a range in opr.config.RANGES: {missing}"
    assert "engine.epochs_per_task.*" in keys and "method.top_p" in keys and "seed" in keys  # the walk works


def test_every_range_names_an_existing_option():
    """No RANGES key is a typo that silently checks nothing."""
    known = {k for k in numeric_options(RunConfig) if k.split(".")[0] not in GROUPS}
    for group, targets in _group_targets().items():
        for target in targets:
            known |= set(numeric_options(schema_for(target), group))
    assert not set(RANGES) - known, sorted(set(RANGES) - known)


def test_a_trainer_made_in_code_gets_the_same_ranges():
    """engine.epochs=0 ended in an IndexError once a stage's data was built; the trainer refuses it at once."""
    from opr.backbones import load_tiny
    from opr.engine.torch_engine import TorchTrainer

    bb = load_tiny()
    with pytest.raises(ConfigError, match=re.escape("engine.epochs must be > 0, got 0")):
        TorchTrainer(bb, epochs=0, device="cpu")
    with pytest.raises(ConfigError, match=re.escape("engine.epochs_per_task.topic must be > 0, got -1")):
        TorchTrainer(bb, epochs_per_task={"topic": -1}, device="cpu")
    TorchTrainer(bb, max_grad_norm=None, max_steps=None, device="cpu")  # null where the signature allows it


def test_bad_seed_fails_before_model_load(tmp_path):
    """numpy refuses seeds outside 32 bits with a traceback after the model loaded; now train.py says so first."""
    out = subprocess.run([sys.executable, "train.py", "seed=-1", "backbone=smollm2_135m", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert "seed must be in [0, 4294967295], got -1" in text
    assert "Traceback" not in text and "dequantising" not in text and not (tmp_path / "results.json").exists()


# ------------------------------------------------------------------------------------ lists and mappings
@pytest.mark.parametrize("override,message", [
    ("benchmark.tasks=emotion", "benchmark.tasks must be a list, e.g. [emotion], got 'emotion'"),
    ("benchmark=trace benchmark.tasks=FOMC", "benchmark.tasks must be a list, e.g. [FOMC], got 'FOMC'"),
    ("engine.betas=0.9", "engine.betas must be a list, e.g. [0.9], got 0.9"),
])
def test_a_single_value_for_a_list_says_list(override, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _validate(override, tmp_path)


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_epochs_per_task_as_the_engine_comment_shows(engine, tmp_path):
    """The command line the config comment gives for ``epochs_per_task`` composes and validates."""
    text = (CONF / "engine" / f"{engine}.yaml").read_text()
    shown = re.search(r"(\S*engine\.epochs_per_task=\{[^}]*\})", text)
    assert shown, f"conf/engine/{engine}.yaml shows no epochs_per_task override"
    cfg = validate(compose_cfg(TINY + [f"engine={engine}", shown.group(1)], tmp_path))
    assert dict(cfg.engine.epochs_per_task) == {"emotion": 2.0, "topic": 1.0}
    # over a preset that already sets some tasks, the same form adds and replaces entries
    cfg = compose_cfg(["experiment=trace_paper", "benchmark.root=/data/TRACE", "+engine.epochs_per_task={FOMC: 60}"])
    assert validate(cfg).engine.epochs_per_task["FOMC"] == 60 and cfg.engine.epochs_per_task["C-STANCE"] == 5


# ------------------------------------------------------------------------------------ stream data
def _trace_tree(root, eval_records=3, train_records=4):
    for split, n in (("train", train_records), ("eval", eval_records), ("test", 0)):
        rows = [{"prompt": f"q{i}\nAnswer:", "answer": "A"} for i in range(n)]
        (root / "FOMC").mkdir(parents=True, exist_ok=True)
        (root / "FOMC" / f"{split}.json").write_text(json.dumps(rows))
    return root


@pytest.mark.parametrize("empty,message", [
    ("eval", r"TRACE task 'FOMC': .*eval\.json holds no records; every stream task needs evaluation examples"),
    ("train", r"TRACE task 'FOMC': .*train\.json holds no records; every stream task needs training examples"),
])
def test_empty_trace_split_is_refused_before_the_model_loads(empty, message, tmp_path, monkeypatch):
    """An empty eval list failed with a traceback after the model loaded; an empty train list trained on
    nothing and ended ``complete``."""
    import functools

    from opr import backbones
    from opr.run import run_experiment

    root = _trace_tree(tmp_path / "trace", **{f"{empty}_records": 0})

    @functools.wraps(backbones.load_tiny)  # the same signature: validation derives the schema from it
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(backbones, "load_tiny", no_model)
    cfg = compose_cfg(["backbone=tiny", "benchmark=trace", f"benchmark.root={root}", "benchmark.tasks=[FOMC]"],
                      tmp_path / "run")
    with pytest.raises(ConfigError, match=r"benchmark \(trace\): " + message):
        run_experiment(cfg)
    assert not (tmp_path / "run" / "results.json").exists()


# ------------------------------------------------------------------------------------ evaluation prompts
def _long_prompt_task(chars: int):
    from opr.metrics import text as M
    from opr.types import Example, Task

    examples = [Example("t/eval/0", "t", "x" * chars + "\nAnswer:", "A"), Example("t/eval/1", "t", "short\nAnswer:", "A")]
    return Task("t", [], examples, reward=M.make_reward("exact_match"), max_new_tokens=4, chat=False)


def test_eval_prompts_longer_than_the_context_are_cut_and_counted(caplog):
    """With eval.max_prompt_length null, a prompt is cut on the left at the model's context minus the task's
    max_new_tokens (a 40,000-character TRACE prompt tried to allocate 6.5 GB), and the cut ones are counted."""
    from opr import evaluation as E
    from opr.backbones import load_tiny

    bb = load_tiny()
    bb.model.config.max_position_embeddings = 64  # the tiny tokenizer is one token per character
    task = _long_prompt_task(200)
    assert E.prompt_limit(bb, task, None) == 60 and E.prompt_limit(bb, task, 30) == 30
    with caplog.at_level(logging.WARNING, logger="opr"):
        score = E.evaluate_task(bb, task, E.EvalSettings(batch_size=2))
    assert score.prompts_cut == 1 and score.n == 2
    assert "eval t: 1 of 2 prompts are longer than 60 tokens and were cut on the left" in caplog.text
    # the same answers as an explicit limit of 60
    explicit = E.evaluate_task(bb, task, E.EvalSettings(batch_size=2, max_prompt_length=60))
    assert explicit.prompts_cut == 1 and explicit.score == score.score
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room for a prompt in the model's context of 64"):
        E.prompt_limit(bb, dataclasses.replace(task, max_new_tokens=64), None)


def test_short_eval_prompts_are_not_cut(tmp_path):
    """The default run's prompts fit: nothing is cut and the predictions are those of no limit at all."""
    from opr import evaluation as E
    from opr.backbones import load_tiny
    from opr.benchmarks.mini_trace import load_mini_trace
    from opr.generation import SamplingConfig, generate

    bb = load_tiny()
    task = load_mini_trace(num_tasks=1, train_size=1, eval_size=4, test_size=0, general_size=0).tasks[0]
    score = E.evaluate_task(bb, task, E.EvalSettings(batch_size=4), out_file=tmp_path / "p.jsonl")
    assert score.prompts_cut == 0
    prompts = [bb.format_prompt(e.prompt, task.chat) for e in task.eval]
    plain = generate(bb, prompts, SamplingConfig(max_new_tokens=task.max_new_tokens, batch_size=4))
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [g[0].text for g in plain]


def test_rollout_prompts_are_cut_at_the_context_like_evaluation(monkeypatch):
    from opr import rollout
    from opr.backbones import load_tiny
    from opr.types import Example, Task

    bb = load_tiny()
    task = Task("t", train=[], eval=[], reward=lambda p, e: 0.0, max_new_tokens=16)
    seen = {}

    def fake_generate(backbone, prompts, sampling, **kw):
        seen["cut"] = kw["max_prompt_tokens"]
        return [[] for _ in prompts]

    monkeypatch.setattr(rollout, "generate", fake_generate)
    rollout.sample_rollouts(bb, [Example("t/0", "t", "x" * 5000, "y")], {"t": task})
    assert seen["cut"] == bb.model.config.max_position_embeddings - 16
    rollout.sample_rollouts(bb, [Example("t/0", "t", "x", "y")], {"t": task}, max_new_tokens=40,
                            max_prompt_tokens=None)
    assert seen["cut"] == bb.model.config.max_position_embeddings - 40
    rollout.sample_rollouts(bb, [Example("t/0", "t", "x", "y")], {"t": task}, max_prompt_tokens=64)
    assert seen["cut"] == 64


def _two_task_stream():
    from opr.benchmarks.mini_trace import load_mini_trace

    bench = load_mini_trace(num_tasks=2, train_size=1, eval_size=5, test_size=0, general_size=3)
    return list(bench.tasks) + list(bench.general)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_evaluation_pass_gives_each_tasks_own_answers(tmp_path, temperature):
    """evaluate_all generates every task's prompts in one length-sorted pass with per-prompt limits; each
    task's predictions equal those of the task evaluated alone (greedy, and sampled: a prompt is seeded by
    its index in its own task), the prompts are encoded once and reused, and stale prompts are not used."""
    import dataclasses

    from opr import evaluation as E
    from opr.generation import SamplingConfig, generate
    from tests.test_generation import varied_tiny

    bb = varied_tiny()
    tasks = [dataclasses.replace(t, max_new_tokens=m) for t, m in zip(_two_task_stream(), (4, 9, 6))]
    settings = E.EvalSettings(batch_size=4, temperature=temperature)
    prompts = E.encode_eval_prompts(bb, tasks, settings)
    assert [len(e) for e in prompts.encoded] == [5, 5, 3] and prompts.cut == (0, 0, 0)
    together = E.evaluate_all(bb, tasks, settings, tmp_path / "all", seed=3, prompts=prompts)
    for task, score in zip(tasks, together):
        alone = E.evaluate_task(bb, task, settings, out_file=tmp_path / "one" / f"{task.name}.jsonl", seed=3)
        assert score == alone
        rows = [json.loads(x) for x in (tmp_path / "all" / f"{task.name}.jsonl").read_text().splitlines()]
        assert rows == [json.loads(x) for x in (tmp_path / "one" / f"{task.name}.jsonl").read_text().splitlines()]
        if temperature == 0:  # and the task's own plain generate() pass
            plain = generate(bb, [bb.format_prompt(e.prompt, task.chat) for e in task.eval],
                             SamplingConfig(max_new_tokens=task.max_new_tokens, batch_size=4), desc=False)
            assert [r["prediction"] for r in rows] == [g[0].text for g in plain]
    assert len({r for s in together for r in [s.task]}) == 3
    # prompts encoded for other settings or tasks are not reused
    assert not prompts.matches(tasks[:2], settings)
    assert not prompts.matches(tasks, dataclasses.replace(settings, max_examples=2))
    short = E.evaluate_all(bb, tasks, dataclasses.replace(settings, max_examples=2), None, seed=3, prompts=prompts)
    assert [s.n for s in short] == [2, 2, 2]
