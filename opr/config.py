"""Typed config schemas and validation, run before anything heavy is built.

Every component is built from its config node with ``_target_``. Its schema is derived from the target
itself: a dataclass target (the methods) *is* its schema; a function or class target (backbone loaders,
benchmarks, trainers) gets a schema from its signature's annotated keyword arguments. Merging the user's node
into the schema rejects unknown keys and wrong types with OmegaConf's message, which we prefix with the
config group so the user sees e.g. ``method: Key 'tempreature' not in 'OnPolicyReplay'``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import importlib.util
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
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
    enforce_eager: bool = True
    max_model_len: Optional[int] = None
    tensor_parallel_size: int = 1


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
    # Resumable training state (run_dir/train_state/): saved at every stage end when true (and ``save``), and
    # also every ``every_steps`` optimizer steps inside a stage (null: stage ends only).
    train_state: bool = True
    every_steps: Optional[int] = None


@dataclass
class StageCacheConfig:
    """``stage_cache``: memoised stages shared across runs (``opr.stage_cache``); off while ``dir`` is null."""

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


# Methods that never read the replay budget. grpo and self_distill read it only with method.replay_budget.
BUDGETLESS_METHODS: frozenset[str] = frozenset({"seq_sft", "sdft"})


def budget_applies(config: collections.abc.Mapping) -> bool:
    """Whether a run's method uses ``budget`` (a resolved config as a plain mapping, e.g. results.json's):
    not for ``seq_sft`` and ``sdft``; for ``grpo`` / ``self_distill`` only with ``method.replay_budget``."""
    method = config.get("method") or {}
    if "replay_budget" in method:
        return bool(method["replay_budget"])
    return method.get("name") not in BUDGETLESS_METHODS


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


def validate_node(group: str, node: DictConfig) -> DictConfig:
    """Check one group node against its target's schema; returns the node with defaults filled in."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"config group '{group}' must be a mapping with a _target_, got {node!r}")
    schema = schema_for(node._target_)
    is_dc = dataclasses.is_dataclass(locate(node._target_))
    meta = {"_target_"} if is_dc else META_KEYS  # a dataclass target (a method) has ``name`` as a field
    try:
        body = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in meta}
        typed = OmegaConf.merge(OmegaConf.structured(schema), body)
    except OmegaConfBaseException as err:
        msg = _describe(err)
        allowed = sorted(f.name for f in dataclasses.fields(schema) if f.init)
        raise ConfigError(f"{group} ({node.get('name', node._target_)}): {msg}. Allowed keys: {allowed}") from err
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"{group} ({node.get('name', node._target_)}): no value given for {missing}; "
                          f"set it on the command line, e.g. {group}.{missing[0]}=...")
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
    if not 0 < base.budget <= 1:
        raise ConfigError(f"budget must be in (0, 1] (replay examples per stage / current task's train size), got {base.budget}")
    for group in GROUPS:
        base[group] = validate_node(group, base[group])
    if base.analysis.svd not in ("lowrank", "exact"):
        raise ConfigError(f"analysis.svd must be 'lowrank' or 'exact', got {base.analysis.svd!r}")
    if base.resume not in (True, False, "auto"):
        raise ConfigError(f"resume must be auto, true or false, got {base.resume!r}")
    if base.checkpoint.every_steps is not None and base.checkpoint.every_steps < 1:
        raise ConfigError(f"checkpoint.every_steps must be >= 1 or null, got {base.checkpoint.every_steps}")
    if base.eval.batch_size < 1 or base.rollout.batch_size < 1:
        raise ConfigError("eval.batch_size and rollout.batch_size must be >= 1")
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
    if base.stage_cache.dir is not None:
        if base.stage_cache.max_gb <= 0:
            raise ConfigError(f"stage_cache.max_gb must be > 0, got {base.stage_cache.max_gb}")
        if base.engine._target_.rsplit(".", 1)[-1] != "TorchTrainer":
            raise ConfigError(f"stage_cache.dir is set but engine={base.engine.get('name')!r}: the stage cache "
                              "works with the single-process engine (engine=torch) only; set stage_cache.dir=null")
    return base


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
