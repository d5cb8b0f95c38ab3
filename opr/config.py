"""Typed config schemas and validation, run before anything heavy is built.

Every component is built from its config node with ``_target_``. Its schema is derived from the target
itself: a dataclass target (the methods) *is* its schema; a function or class target (backbone loaders,
benchmarks, trainers) gets a schema from its signature's annotated keyword arguments. Merging the user's node
into the schema rejects unknown keys and wrong types with OmegaConf's message, which we prefix with the
config group so the user sees e.g. ``method: Key 'tempreature' not in 'OnPolicyReplay'``.

Numeric options are range-checked from one table, :data:`RANGES` (dotted key -> :class:`Range`), so a value
that could only fail later (after a model loaded, or after a stage trained) fails here with a message naming
the value and the allowed range: ``engine.lr must be > 0, got -1.0``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Runtime arguments the run passes itself; they are not part of a component's config.
RUNTIME_ARGS = {"backbone", "logger", "seed", "self"}
# Keys a group node may carry besides its target's arguments.
META_KEYS = {"_target_", "name"}
GROUPS = ("backbone", "method", "benchmark", "engine", "logger")


class ConfigError(ValueError):
    """A config value is wrong; the message names the value and what is allowed."""


@dataclass
class EvalConfig:
    batch_size: int = 32
    temperature: float = 0.0
    max_examples: Optional[int] = None
    max_prompt_length: Optional[int] = None
    every_steps: Optional[int] = None  # also evaluate inside each stage every N optimizer steps (stages[t].curve)
    inside_stage_tasks: Optional[list[str]] = None  # tasks / general sets evaluated inside; null: all of them


ROLLOUT_BACKENDS = ("hf", "vllm")


def check_backend(name: str) -> None:
    """Fail at start-up for an unknown ``rollout.backend``, or ``vllm`` without the package (no import of it)."""
    if name not in ROLLOUT_BACKENDS:
        raise ConfigError(f"rollout.backend must be one of {list(ROLLOUT_BACKENDS)}, got {name!r}")
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.backend=vllm needs the vllm package, which is not installed "
                          "(pip install vllm, on a machine with a supported GPU); use rollout.backend=hf")


@dataclass
class VLLMOptions:
    """``rollout.vllm``: the :class:`opr.generation_vllm.VLLMBackend` options."""

    gpu_memory_utilization: float = 0.3
    dtype: str = "auto"
    enforce_eager: bool = False
    max_model_len: Optional[int] = None  # null: eval.max_prompt_length + the longest answer limit (opr.run)
    tensor_parallel_size: int = 1  # 1 only (a whole model per rank; opr.run refuses others)
    sleep_level: int = 1  # between generations: 1 = weights to host memory, 2 = weights dropped


@dataclass
class RolloutConfig:
    batch_size: int = 32
    backend: str = "hf"  # hf (the built-in decode loop) | vllm (GPU machines with vllm installed)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)


@dataclass
class AnalysisConfig:
    drift: bool = True  # weight drift against the base model after every stage (stages[t]["drift"])
    k: int = 16  # top-k singular subspace for the spectral figures
    svd: str = "lowrank"  # lowrank (randomized, ~4 s per SmolLM2 checkpoint) | exact (~20-45 s)
    diagnostics: bool = True  # KL(π_t‖π_{t-1}), KL(π_t‖π_0), base log-prob of responses (stages[t]["diagnostics"])
    probe_per_task: int = 8  # fixed eval prompts per seen task for the diagnostics


@dataclass
class CheckpointConfig:
    save: bool = True
    keep_last: int = 1  # 0 keeps every stage
    # Resumable training state (run_dir/train_state/): saved at every stage end when true (whatever ``save``),
    # and also every ``every_steps`` optimizer steps inside a stage (null: stage ends only).
    train_state: bool = True
    every_steps: Optional[int] = None
    # After a stop signal (SIGTERM, SLURM's pre-emption signal), seconds to wait for the next safe point (an
    # optimizer step, a stage end) to save a training state; past it (a long evaluation, rollout or save) the run
    # leaves at once through the signal's own handler (submitit: requeue), resuming from the last complete state.
    stop_grace_s: float = 120.0


@dataclass
class StageCacheConfig:
    """``stage_cache``: memoised stages shared across runs (``opr.stage_cache``); off while ``dir`` is null (an
    empty ``dir`` is refused, as are an existing file and a folder that cannot be created: :func:`check_cache_dir`)."""

    dir: Optional[str] = None
    max_gb: float = 20.0  # least recently used entries go first; a SmolLM2 stage entry is ~540 MB


@dataclass
class RunConfig:
    """The top level of ``conf/config.yaml``; group nodes are validated against their targets' schemas."""

    seed: int = 0
    run_dir: str = MISSING
    experiment_name: str = "default"
    backbone: Any = MISSING
    method: Any = MISSING
    # Replay budget ρ. A plain value, not a config group: Hydra parses ``budget=0.01`` as a float and
    # refuses float group overrides, while a value takes any ratio (``budget=0.37``) and sweeps alike.
    budget: float = 0.1
    benchmark: Any = MISSING
    engine: Any = MISSING
    logger: Any = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    stage_cache: StageCacheConfig = field(default_factory=StageCacheConfig)
    # Continue from run_dir/train_state: auto (when a complete state exists), true (one must exist), false.
    resume: Any = "auto"
    # On a GPU, refuse before the model loads a run whose memory plan (opr.memory_plan) does not fit the GPU.
    check_memory: bool = True


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option: ``low`` / ``high`` bounds (``None``: unbounded), each inclusive
    unless ``*_open``. ``note`` says why, in the message. ``null`` passes where the option's type allows it
    (the schema decides; the message then says "or null")."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """``> 0``, ``>= 1``, ``in (0, 1]``, ..."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


def _at_least(low: float, note: str = "") -> Range:
    return Range(low=low, note=note)


def _positive(note: str = "") -> Range:
    return Range(low=0, low_open=True, note=note)


_PROBABILITY = Range(0, 1, low_open=True)  # (0, 1]: top_p, ratios
_REWARD = Range(0, 100, note=" (rewards are on the 0-100 scale)")
# numpy's seeds (np.random.seed in opr.run.seed_everything) must fit in 32 bits
_SEED = Range(0, 2**32 - 1)

# Every numeric option's allowed values, by dotted key. ``*`` stands for every entry of a mapping or list
# (``engine.epochs_per_task.*``). A key applies wherever the option exists: ``method.top_p`` to every method
# that has a ``top_p``; keys of other targets are skipped. Rules that join two options (greedy with one
# sample, GRPO's temperature > 0, jsd_alpha only for kind=jsd) stay in the methods' ``__post_init__``, which
# validation runs too. ``tests/test_validation.py`` checks that every numeric option of every config is here.
RANGES: dict[str, Range] = {
    "seed": _SEED,
    "budget": Range(0, 1, low_open=True, note=" (replay examples per stage / current task's train size)"),
    # eval / rollout / analysis / checkpoint / stage_cache
    "eval.batch_size": _at_least(1),
    "eval.temperature": _at_least(0, " (0 = greedy)"),
    "eval.max_examples": _at_least(1, " (null evaluates every example)"),
    "eval.max_prompt_length": _at_least(1),
    "eval.every_steps": _at_least(1),
    "rollout.batch_size": _at_least(1),
    "rollout.vllm.gpu_memory_utilization": _PROBABILITY,
    "rollout.vllm.max_model_len": _at_least(2, " (room for one prompt and one answer token)"),
    "rollout.vllm.tensor_parallel_size": _at_least(1),
    "rollout.vllm.sleep_level": Range(1, 2, note=" (vLLM's sleep levels)"),
    "analysis.k": _at_least(1),
    "analysis.probe_per_task": _at_least(0, " (0 = no diagnostics, as analysis.diagnostics=false)"),
    "checkpoint.keep_last": _at_least(0, " (0 keeps every stage)"),
    "checkpoint.every_steps": _at_least(1, " (null: at stage ends only)"),
    "checkpoint.stop_grace_s": _positive(" (seconds)"),
    "stage_cache.max_gb": _positive(),
    # engine (torch, and deepspeed, which takes every torch option)
    "engine.lr": _positive(),
    "engine.weight_decay": _at_least(0),
    "engine.betas.*": Range(0, 1, high_open=True),
    "engine.warmup_ratio": Range(0, 1, note=" (a fraction of the stage's optimizer steps)"),
    "engine.max_grad_norm": _at_least(0, " (0 or null: no clipping)"),
    "engine.batch_size": _at_least(1),
    "engine.grad_accum": _at_least(1),
    "engine.max_length": _at_least(2, " (room for one prompt and one answer token)"),
    "engine.epochs": _positive(),
    "engine.epochs_per_task.*": _positive(),
    "engine.max_steps": _at_least(1, " (null: no cap)"),
    "engine.log_every": _at_least(1),
    "engine.zero_stage": Range(2, 3),
    "engine.collective_timeout_min": _positive(" (minutes)"),
    # benchmarks (mini_trace; trace)
    "benchmark.num_tasks": _at_least(1),
    "benchmark.train_size": _at_least(1, " (a stream task needs training examples)"),
    "benchmark.eval_size": _at_least(1, " (every task is evaluated after every stage)"),
    "benchmark.test_size": _at_least(0),
    "benchmark.general_size": _at_least(0, " (0 = no general set)"),
    "benchmark.max_train": _at_least(1, " (null reads every record; a stream task needs training examples)"),
    "benchmark.max_eval": _at_least(1, " (null reads every record)"),
    "benchmark.max_test": _at_least(0, " (0 skips the test split)"),
    "benchmark.max_new_tokens.*": _at_least(1),
    # backbones with a shape of their own (tiny)
    "backbone.hidden_size": _at_least(1),
    "backbone.num_layers": _at_least(1),
    "backbone.num_heads": _at_least(1),
    "backbone.intermediate_size": _at_least(1),
    # methods
    "method.pool_size": _at_least(1, " (null: every training prompt)"),
    "method.samples_per_prompt": _at_least(1),
    "method.temperature": _at_least(0, " (0 = greedy)"),
    "method.top_p": _PROBABILITY,
    "method.min_reward": _REWARD,
    "method.max_per_prompt": _at_least(1),
    "method.steps": _at_least(1),
    "method.prompts_per_step": _at_least(1),
    "method.group_size": _at_least(2, " (a group of 1 has no baseline)"),
    "method.updates_per_batch": _at_least(1),
    "method.clip_eps": Range(0, 1, high_open=True),
    "method.clip_eps_high": _at_least(0),
    "method.kl_coef": _at_least(0),
    "method.max_new_tokens": _at_least(1, " (null: the task's answer length)"),
    "method.ema_rate": _PROBABILITY,
    "method.jsd_alpha": Range(0, 1, low_open=True, high_open=True),
    "method.topk": _at_least(1, " (null: the full vocabulary)"),
    "method.importance_clip": _positive(),
    "method.teacher_length_factor": _at_least(1),
    "method.stop_on_collapse.min_finished": Range(0, 1, note=" (a fraction of the rollout batch's responses)"),
    "method.stop_on_collapse.patience": _at_least(1, " (rollout batches in a row)"),
    "method.sft_steps": _at_least(1, " (null: the task's epochs, as seq_sft)"),
    "method.rl_steps": _at_least(1),
    "method.rl_lr": _positive(" (null: engine.lr)"),
    "method.lr": _positive(" (null: engine.lr)"),
}
# sft_then_grpo's RL phase takes GRPO's options under method.rl, with GRPO's ranges
RANGES.update({f"method.rl.{key}": RANGES[f"method.{key}"] for key in (
    "prompts_per_step", "group_size", "updates_per_batch", "temperature", "top_p", "max_new_tokens", "clip_eps",
    "clip_eps_high", "kl_coef", "min_reward", "stop_on_collapse.min_finished", "stop_on_collapse.patience")})


def _hints(schema) -> dict[str, Any]:
    try:
        return typing.get_type_hints(schema)
    except (NameError, TypeError):  # an annotation that cannot be resolved: the raw ones
        return {f.name: f.type for f in dataclasses.fields(schema)}


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (types.UnionType, typing.Union) and type(None) in typing.get_args(tp)


def _non_null(tp):
    """``X`` of ``Optional[X]``; ``tp`` itself otherwise."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if _is_optional(tp) and len(args) == 1 else tp


def _field_type(schema, parts: list[str]):
    """The annotated type of dotted ``parts`` in dataclass ``schema`` (``*``: a mapping's value or a list's
    element); ``None`` when the schema has no such option."""
    tp = schema
    for part in parts:
        if part == "*":
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if _is_optional(tp) and len(args) == 1:
                args = list(typing.get_args(args[0]))
            if not args:
                return None
            tp = args[-1]  # dict[K, V] -> V, list[T] -> T
        elif dataclasses.is_dataclass(tp) or (_is_optional(tp) and dataclasses.is_dataclass(_non_null(tp))):
            tp = _non_null(tp)  # an optional nested option (method.stop_on_collapse): its fields
            hints = _hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        else:
            return None
    return tp


def _values(node: Any, parts: list[str], key: str):
    """(dotted key, value) of every value at ``parts`` in ``node`` (``*`` expands mappings and lists). Only
    the values asked for are read (and their interpolations resolved)."""
    if not parts:
        yield key, node
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(node, DictConfig):
            items = ((k, node[k]) for k in node)
        elif isinstance(node, ListConfig):
            items = enumerate(node)
        else:
            items = ()
        for k, v in items:
            yield from _values(v, rest, f"{key}.{k}")
    elif isinstance(node, DictConfig) and head in node:
        yield from _values(node[head], rest, f"{key}.{head}" if key else head)


def check_ranges(node: DictConfig, schema, prefix: str = "") -> None:
    """Check the :data:`RANGES` keys under ``prefix`` (a group name, or "" for the top level without the
    groups) against ``node``, typed by ``schema`` (``None``: untyped, null passes everywhere); raise
    :class:`ConfigError` naming the value and range."""
    for key, allowed in RANGES.items():
        parts = key.split(".")
        if prefix:
            if parts[0] != prefix:
                continue
            parts = parts[1:]
        elif parts[0] in GROUPS:
            continue
        nullable = _is_optional(_field_type(schema, parts))
        for name, value in _values(node, parts, prefix):
            if value is None and (nullable or schema is None):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in allowed:
                null = " or null" if nullable else ""
                raise ConfigError(f"{name} must be {allowed.describe()}{null}{allowed.note}, got {value}")


def check_options(group: str, options: collections.abc.Mapping) -> None:
    """The :data:`RANGES` of ``group`` applied to a component's keyword ``options`` where it is made in code,
    not from a config (``TorchTrainer(backbone, lr=...)``): the same rules and messages as :func:`validate`."""
    check_ranges(OmegaConf.create({k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}),
                 None, group)


def numeric_options(schema, prefix: str = "") -> list[str]:
    """The dotted keys of every numeric option of dataclass ``schema`` (``*`` for the entries of a mapping
    or list of numbers), for the check that :data:`RANGES` covers them all."""
    out = []
    for name, tp in _hints(schema).items():
        key = f"{prefix}.{name}" if prefix else name
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if _is_optional(tp) and len(args) == 1 else tp
        if dataclasses.is_dataclass(base):
            out += numeric_options(base, key)
        elif base in (int, float):
            out.append(key)
        elif typing.get_origin(base) in (dict, list) and typing.get_args(base)[-1:] in ((int,), (float,)):
            out.append(f"{key}.*")
    return out


def _describe(err: OmegaConfBaseException) -> str:
    """OmegaConf's first message line, prefixed with the offending key when it knows it."""
    msg = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def locate(path: str):
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"_target_ {path!r} cannot be imported: {err}") from err


def _plain(tp):
    """``X | None`` (PEP 604) -> ``Optional[X]``; tuples and sequences -> ``list`` (what OmegaConf can type)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return Optional[_plain(args[0])]
        return Any
    if origin in (tuple, list, collections.abc.Sequence):
        args = typing.get_args(tp)
        return list[_plain(args[0])] if args else list
    return tp


def budget_applies(config: collections.abc.Mapping) -> bool:
    """Whether a run's method uses ``budget`` (a resolved config as a plain mapping, e.g. results.json's), as
    the method class declares it: ``uses_budget(method options)`` of the class of ``method._target_``, else of
    ``method.name`` (``opr.methods.method_class``). Not for ``seq_sft`` and ``sdft``; for ``grpo`` /
    ``self_distill`` only with ``method.replay_budget``. A method without such a class here uses the budget
    unless its options say ``replay_budget: false``."""
    from opr.methods import method_class  # imports the method's module (torch) only when asked

    method = config.get("method") or {}
    cls = method_class(method)
    if cls is not None and hasattr(cls, "uses_budget"):
        return bool(cls.uses_budget(method))
    return bool(method.get("replay_budget", True))


def run_budget(config: collections.abc.Mapping) -> Optional[float]:
    """The replay ratio of a run's config (a plain number, or ``{"ratio": x}`` in older runs); ``None`` when
    the method ignores the budget (:func:`budget_applies`) or none is set. Raises ``ValueError`` for a value
    that is not a number."""
    if not budget_applies(config):
        return None
    raw = config.get("budget")
    ratio = raw.get("ratio") if isinstance(raw, collections.abc.Mapping) else raw
    if ratio is None:
        return None
    try:
        return float(ratio)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config budget.ratio must be a number, got {ratio!r}") from err


def init_parameters(obj) -> dict[str, tuple[inspect.Parameter, Any]]:
    """The named keyword parameters of a function or class constructor with their type hints, in order.

    A class whose ``__init__`` takes ``**kwargs`` passes them on to its base class, so the base class's
    parameters are followed and added (``DeepSpeedTrainer(zero_stage, ..., **trainer_options)`` takes every
    ``TorchTrainer`` option). ``*args`` / ``**kwargs`` themselves are left out.
    """
    params: dict[str, tuple[inspect.Parameter, Any]] = {}
    owners = [c for c in obj.__mro__ if "__init__" in vars(c) and c is not object] if inspect.isclass(obj) else [obj]
    for owner in owners:
        fn = owner.__init__ if inspect.isclass(owner) else owner
        hints = typing.get_type_hints(fn)
        forwards = False
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind == p.VAR_KEYWORD:
                forwards = True
            elif p.kind != p.VAR_POSITIONAL and name not in params:
                params[name] = (p, hints.get(name, Any))
        if not forwards:
            break
    return params


def schema_for(target: str):
    """The dataclass describing the keyword arguments of ``target``."""
    obj = locate(target)
    if dataclasses.is_dataclass(obj):
        return obj
    fields = []
    for name, (p, hint) in init_parameters(obj).items():
        if name in RUNTIME_ARGS or name in META_KEYS:
            continue
        tp = _plain(hint)
        default = MISSING if p.default is inspect.Parameter.empty else p.default
        if isinstance(default, (list, tuple, dict)):
            fields.append((name, tp, field(default_factory=lambda d=default: list(d) if isinstance(d, tuple) else d)))
        else:
            fields.append((name, tp, field(default=default)))
    return dataclasses.make_dataclass(f"{getattr(obj, '__name__', 'target')}Config", fields)


def _check_lists(group: str, schema, body: dict) -> None:
    """A single value where the schema wants a list (``benchmark.tasks=emotion``): say so, with the list
    it probably meant, instead of OmegaConf's "AnyNode is not a ListConfig"."""
    for name, tp in _hints(schema).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if _is_optional(tp) and len(args) == 1 else tp
        value = body.get(name)
        if (base is list or typing.get_origin(base) is list) and isinstance(value, (str, int, float)):
            raise ConfigError(f"{group}.{name} must be a list, e.g. [{value}], got {value!r}")


def _given(body: dict, dotted: str) -> tuple:
    """``(value,)`` at the dotted key of a node's plain ``body``; ``()`` where there is none."""
    value: Any = body
    for part in dotted.split(".") if dotted else ["\0"]:
        if not isinstance(value, dict) or part not in value:
            return ()
        value = value[part]
    return (value,)


def validate_node(group: str, node: DictConfig) -> DictConfig:
    """Check one group node against its target's schema; returns the node with defaults filled in."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"config group '{group}' must be a mapping with a _target_, got {node!r}")
    schema = schema_for(node._target_)
    is_dc = dataclasses.is_dataclass(locate(node._target_))
    meta = {"_target_"} if is_dc else META_KEYS  # a dataclass target (a method) has ``name`` as a field
    try:
        body = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in meta}
        _check_lists(group, schema, body)
        typed = OmegaConf.merge(OmegaConf.structured(schema), body)
    except OmegaConfBaseException as err:
        msg = _describe(err)
        # the keys of the node that refused it: a nested option's own (method.stop_on_collapse: its guard's)
        owner, where = getattr(err, "object_type", None), ""
        full_key = str(getattr(err, "full_key", None) or "")
        if not (dataclasses.is_dataclass(owner) and owner is not schema and "." in full_key):
            owner = schema
        else:
            where = f" of {group}.{full_key.rsplit('.', 1)[0]}"
        allowed = sorted(f.name for f in dataclasses.fields(owner) if f.init)
        given = _given(body, full_key)
        got = f" (got {given[0]!r})" if given and repr(given[0]) not in msg else ""
        raise ConfigError(f"{group} ({node.get('name', node._target_)}): {msg}{got}. Allowed keys{where}: "
                          f"{allowed}") from err
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"{group} ({node.get('name', node._target_)}): no value given for {missing}; "
                          f"set it on the command line, e.g. {group}.{missing[0]}=...")
    check_ranges(typed, schema, group)
    if is_dc:
        try:  # run the dataclass's own checks (__post_init__) now, before any model loads
            OmegaConf.to_object(typed)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{group} ({node.get('name')}): {err}") from err
    return OmegaConf.create({**{k: node[k] for k in meta if k in node}, **OmegaConf.to_container(typed)})


def validate(cfg: DictConfig) -> DictConfig:
    """Validate the whole composed config; raise ConfigError naming the bad value and what is allowed."""
    try:
        base = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {_describe(err)}") from err
    check_ranges(base, RunConfig)
    for group in GROUPS:
        base[group] = validate_node(group, base[group])
    if base.analysis.svd not in ("lowrank", "exact"):
        raise ConfigError(f"analysis.svd must be 'lowrank' or 'exact', got {base.analysis.svd!r}")
    if base.resume not in (True, False, "auto"):
        raise ConfigError(f"resume must be auto, true or false, got {base.resume!r}")
    check_backend(base.rollout.backend)
    if "device" in base.engine:  # before any model loads: a GPU asked for on a machine without one
        from opr.engine.torch_engine import resolve_device

        try:
            if base.engine._target_.rsplit(".", 1)[-1] == "TorchTrainer":
                resolve_device(base.engine.device)
            elif base.engine.device != "auto":
                raise ValueError(f"engine.device={base.engine.device!r} applies to engine=torch; under DeepSpeed "
                                 "each rank trains on its own local GPU: leave it at auto")
        except ValueError as err:
            raise ConfigError(str(err)) from err
    expand_user_paths(base)
    if base.stage_cache.dir is not None:
        if base.engine._target_.rsplit(".", 1)[-1] != "TorchTrainer":
            raise ConfigError(f"stage_cache.dir is set but engine={base.engine.get('name')!r}: the stage cache "
                              "works with the single-process engine (engine=torch) only; set stage_cache.dir=null")
        check_cache_dir(base.stage_cache.dir)
    return base


# Options that name a place on disk: a leading ``~`` is the user's home, expanded here (Hydra refuses an unquoted
# ``~`` on the command line, but ``'~/x'`` quoted, or a value from a config file or an environment variable,
# reaches the code as written, and Python's file functions take ``~`` as a folder name).
PATH_OPTIONS = (("run_dir",), ("stage_cache", "dir"), ("backbone", "cache_dir"), ("benchmark", "root"),
                ("logger", "dir"))


def expand_user_paths(cfg: DictConfig) -> None:
    """Expand a leading ``~`` (``~`` or ``~user``) in every :data:`PATH_OPTIONS` value that is a string."""
    for *groups, key in PATH_OPTIONS:
        node = cfg
        for g in groups:
            node = node.get(g) if isinstance(node, DictConfig) else None
        if not isinstance(node, DictConfig) or key not in node or OmegaConf.is_missing(node, key):
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:  # an interpolation that resolves only inside Hydra's run (run_dir): not here
            continue
        if isinstance(value, str) and value.startswith("~"):
            node[key] = os.path.expanduser(value)


def check_cache_dir(directory: str) -> None:
    """Refuse, before anything loads, a ``stage_cache.dir`` that is empty (it would put the entries into the
    current directory: null is how the cache is turned off), an existing file, or a folder that cannot be
    created. Creates the folder (the cache would at its first use)."""
    if not directory.strip():
        raise ConfigError(f"stage_cache.dir={directory!r} is empty: it would put the cache's entries into the "
                          "current directory; give a folder (e.g. stage_cache.dir=$HOME/.cache/opr/stages) or "
                          "null to turn the stage cache off")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"stage_cache.dir={directory!r} is an existing file, not a folder; give a folder (one "
                          "that exists or can be created) or null to turn the stage cache off")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"stage_cache.dir={directory!r} cannot be created ({err.strerror or err}); give a folder "
                          "that exists or can be created, or null to turn the stage cache off") from err


def build(node: DictConfig, **runtime: Any):
    """Instantiate a validated group node, adding runtime arguments (backbone, logger, seed)."""
    from hydra.utils import instantiate

    body = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}
    target = locate(body["_target_"])
    if dataclasses.is_dataclass(target) and "name" in node:
        body["name"] = node.name
    accepted = set(init_parameters(target)) if not dataclasses.is_dataclass(target) else set()
    extra = {k: v for k, v in runtime.items() if dataclasses.is_dataclass(target) or k in accepted}
    if "name" in accepted and "name" in node:  # e.g. load_pretrained(name=...) for its error messages
        extra["name"] = node.name
    # Runtime objects are passed to the partial, not through instantiate: Hydra would turn a dataclass
    # argument (the Backbone) into a config node.
    return instantiate(body, _partial_=True, _convert_="all")(**extra)
