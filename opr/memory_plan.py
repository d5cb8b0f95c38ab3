"""A memory plan before launch: what one GPU (and one node's host memory) holds for a run, item by item.

The arithmetic is exact for what it counts (parameter, gradient, optimizer and cache tensors: tested against the
bytes of the real tensors of the ``tiny`` model and SmolLM2-135M's shape on CPU) and an estimate for
activations (the tensors autograd saves for the backward pass of a decoder layer; within 15% of the bytes a
real forward saves on CPU, tested). It does not count the CUDA context (~0.5-1 GB), the allocator's
fragmentation, NCCL's buffers or DeepSpeed's communication buckets: keep a margin (``MARGIN``).

What it describes is what the code does today (an item says where it lives):

- **weights**, **gradients**, **optimizer states**: the torch engine keeps fp32 master weights (the model is
  trained in fp32 and computes in ``engine.compute_dtype`` under autocast), fp32 gradients and AdamW's two fp32
  moments: 16 bytes per parameter. DeepSpeed with bf16/fp16 keeps 16-bit weights and gradients and fp32 master
  weights and moments (12 bytes), the accounting of the ZeRO paper (Rajbhandari et al., 2020); ZeRO-2 divides
  gradients and optimizer states by the world size W, ZeRO-3 the weights too. ``offload_optimizer=cpu`` moves
  the optimizer states (and their fp32 gradients) to the host, ``offload_param=cpu`` the ZeRO-3 weight shards.
- **gathered model** (ZeRO-3): between training calls every rank gathers the whole model for evaluation,
  rollouts and checkpoints (:class:`opr.engine.deepspeed_engine.DeepSpeedTrainer`); inside training a working
  set of two layers is gathered at a time.
- **activations** at ``engine.batch_size`` sequences of ``engine.max_length`` tokens (packed), with or without
  gradient checkpointing, and the supervised positions' logits (16-bit, their fp32 copy and its gradient).
- **frozen models**: GRPO's KL reference (``method.kl_coef > 0``) and ``self_distill``'s frozen, EMA or base
  teacher (``trainer.frozen_model``; ``teacher: student`` needs none) are full copies in the policy's dtype on
  every rank under the torch engine (fp32, as its master weights) and ZeRO-2; under ZeRO-3 they are inference
  engines partitioned like the policy: 1/W of a copy per rank (on the host with ``offload_param=cpu``), plus,
  while their forward runs inside a training step, a gathered working set (a module at a time; counted as the
  larger of two layers and the output layer). The policy diagnostics' π_0 and π_{t-1} (every rank, from stage
  2; ``analysis.diagnostics``: each rank scores its share of the probe) are full copies in each rank's host
  memory, moved to its GPU one at a time to score at a stage end (one copy in the generate phase); the drift
  analysis keeps the base weights and one stage's weights on rank 0's host (``analysis.drift``).
- **KV cache** of the largest generation batch: evaluation (``eval.batch_size`` prompts) or rollouts
  (``rollout.batch_size`` prompts x samples, or GRPO's group), at the prompt limit plus the answer limit.
- **vLLM** (``rollout.backend=vllm``): ``gpu_memory_utilization`` of the GPU while it generates (its weights and
  its KV cache, which replaces the built-in loop's); asleep while training, with its weights in host memory at
  ``sleep_level`` 1 (one copy per rank) and none at level 2.

The peak is the larger of two phases: **train** (weights, gradients, optimizer, activations, logits, the
frozen models the objective uses, the ZeRO-3 working set) and **generate** (weights or the gathered model,
gradients and optimizer states still resident, the KV cache, frozen models, the generation logits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

GB = 1e9
MARGIN = 0.9  # the plan must fit in this fraction of the GPU (CUDA context, fragmentation, NCCL buffers)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes (Llama, Qwen2, Qwen3 families)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    context: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        """From a model folder's ``config.json`` (transformers' keys)."""
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type", "")
        return cls(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                   qk_norm=model_type == "qwen3", context=cfg.get("max_position_embeddings"))

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q, k, v, o projections (+ biases), the gated MLP, two RMSNorms
        (+ Qwen3's per-head q/k norms)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * self.head_dim
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        """All parameters: embeddings, output layer (unless tied), layers, final norm."""
        out = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + out + self.layers * self.layer_params() + self.hidden


# Published shapes (the models' config.json) of the backbone presets, for a plan without the weights at hand.
PRESET_SHAPES = {
    "qwen2_5_7b_instruct": ModelShape(28, 3584, 28, 4, 128, 18944, 152064, False, qkv_bias=True, context=32768),
    "qwen3_8b": ModelShape(36, 4096, 32, 8, 128, 12288, 151936, False, qk_norm=True, context=40960),
    "llama3_1_8b_instruct": ModelShape(32, 4096, 32, 8, 128, 14336, 128256, False, context=131072),
    "smollm2_135m": ModelShape(30, 576, 9, 3, 64, 1536, 49152, True, context=8192),
}
PRESET_SHAPES["smollm2_135m_random"] = PRESET_SHAPES["smollm2_135m"]  # the same shapes, random weights


def shape_for(backbone_name: str, path: Optional[str] = None) -> ModelShape:
    """The shape from ``path/config.json`` when ``path`` is a folder, else the preset's published shape."""
    if path and (Path(path).expanduser() / "config.json").is_file():
        return ModelShape.from_config(json.loads((Path(path).expanduser() / "config.json").read_text()))
    if backbone_name not in PRESET_SHAPES:
        raise ValueError(f"no shape known for backbone {backbone_name!r}: give backbone.path=<a folder with "
                         f"config.json>, or one of the presets {sorted(PRESET_SHAPES)}")
    return PRESET_SHAPES[backbone_name]


# ------------------------------------------------------------------------------------------------ pieces
def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int, dtype: str) -> int:
    """Keys and values of every layer for ``rows`` sequences of ``tokens`` tokens: 2 L kv hd rows tokens bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * rows * tokens * BYTES[dtype]


def layer_activation_bytes(shape: ModelShape, tokens: int, dtype: str) -> int:
    """Bytes one decoder layer saves for its backward pass over ``tokens`` packed tokens (SDPA or
    flash-attention: no tokens x tokens matrix): the two norms' inputs and outputs, q, k, v, the attention
    output, the o-projection's input, the MLP's gate, up, their activation and product; in the compute dtype.
    An estimate, within a factor of the bytes a real backward saves (tested)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token = 4 * shape.hidden + (q + 2 * kv) + 2 * q + 4 * shape.intermediate
    return tokens * per_token * BYTES[dtype]


def logits_bytes(shape: ModelShape, positions: int, dtype: str) -> int:
    """The output layer's logits at ``positions`` supervised tokens: the compute-dtype logits, their fp32 copy
    for the cross-entropy and its gradient."""
    return positions * shape.vocab * (BYTES[dtype] + 4 + 4)


def frozen_working_set(shape: ModelShape, weight_bytes: int) -> int:
    """What a ZeRO-3 frozen model (reference, teacher) has gathered at once while its forward runs: DeepSpeed
    gathers a module's parameters before it runs and releases them after (with prefetching, the next ones), so
    at most about two decoder layers, or the output layer (vocab x hidden), the largest single module."""
    return weight_bytes * max(2 * shape.layer_params(), shape.vocab * shape.hidden)


@dataclass
class Item:
    name: str
    gpu: float  # bytes per GPU (rank 0, the most loaded)
    host: float = 0.0  # bytes of host memory per node
    phases: tuple[str, ...] = ("train", "generate")
    note: str = ""


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)
    gpus: int = 1
    gpu_gb: Optional[float] = None

    def phase_bytes(self, phase: str) -> float:
        return sum(i.gpu for i in self.items if phase in i.phases)

    @property
    def peak_bytes(self) -> float:
        return max(self.phase_bytes("train"), self.phase_bytes("generate"))

    @property
    def host_bytes(self) -> float:
        return sum(i.host for i in self.items)

    def fits(self) -> Optional[bool]:
        return None if self.gpu_gb is None else self.peak_bytes <= MARGIN * self.gpu_gb * GB

    def largest(self, k: int = 3) -> list[Item]:
        phase = "train" if self.phase_bytes("train") >= self.phase_bytes("generate") else "generate"
        return sorted((i for i in self.items if phase in i.phases), key=lambda i: -i.gpu)[:k]

    def table(self) -> str:
        lines = [f"{'item':<42} {'GB/GPU':>8} {'host GB/node':>13}  phases          note"]
        for i in self.items:
            lines.append(f"{i.name:<42} {i.gpu / GB:>8.2f} {i.host / GB:>13.2f}  {'+'.join(i.phases):<15} {i.note}")
        lines.append(f"{'train phase':<42} {self.phase_bytes('train') / GB:>8.2f}")
        lines.append(f"{'generate phase':<42} {self.phase_bytes('generate') / GB:>8.2f}")
        lines.append(f"host memory per node: {self.host_bytes / GB:.1f} GB")
        verdict = "" if self.gpu_gb is None else (
            f" ({'fits' if self.fits() else 'does not fit'} in {self.gpu_gb:g} GB"
            f"{'' if self.fits() else f'; {MARGIN:.0%} of it usable'})")
        lines.append(f"peak per GPU: {self.peak_bytes / GB:.1f} GB{verdict}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the plan
def plan(cfg, shape: ModelShape, gpus: int = 1, gpu_gb: Optional[float] = None, nodes: int = 1) -> Plan:
    """The memory plan of a validated run config (a mapping with the run's groups) on ``gpus`` GPUs in all
    (one rank each, over ``nodes`` nodes), for a model of ``shape``."""
    engine, method, ev, rollout, analysis = cfg["engine"], cfg["method"], cfg["eval"], cfg["rollout"], cfg["analysis"]
    deepspeed = engine.get("name") == "deepspeed" or str(engine.get("_target_", "")).endswith("DeepSpeedTrainer")
    W = gpus if deepspeed else 1
    ranks_per_node = max(1, gpus // nodes) if deepspeed else 1
    P = shape.params
    compute = engine["compute_dtype"]
    half = BYTES[compute] if compute != "float32" else 4
    stage = engine.get("zero_stage", 0) if deepspeed else 0
    out = Plan(gpus=gpus, gpu_gb=gpu_gb)
    add = out.items.append

    # weights, gradients, optimizer states
    if not deepspeed:
        add(Item("weights (fp32 master)", 4 * P, note="the torch engine trains fp32 weights, autocast computes"))
        add(Item("gradients (fp32)", 4 * P, phases=("train",)))
        add(Item("optimizer: AdamW moments (fp32)", 8 * P))
    else:
        wbytes = half
        param_offload = stage == 3 and engine.get("offload_param", "none") == "cpu"
        shard = wbytes * P / (W if stage == 3 else 1)
        add(Item(f"weights ({'shard, ' if stage == 3 else ''}{compute})", 0 if param_offload else shard,
                 host=shard * ranks_per_node if param_offload else 0,
                 note="offloaded to the host" if param_offload else ("1/W of the model" if stage == 3 else "")))
        add(Item(f"gradients ({compute}, 1/W)", wbytes * P / W))
        opt = (12 if compute != "float32" else 8) * P / W
        offload = engine.get("offload_optimizer", "none") == "cpu"
        add(Item("optimizer: fp32 master + Adam moments" if compute != "float32" else "optimizer: Adam moments",
                 0 if offload else opt, host=opt * ranks_per_node if offload else 0,
                 note="offloaded to the host" if offload else "1/W (ZeRO)"))
        if stage == 3:
            add(Item("gathered model (between training calls)", wbytes * P * (W - 1) / W, phases=("generate",),
                     note="every rank gathers the whole model to generate"))
            add(Item("ZeRO-3 working set (2 layers gathered)", 2 * wbytes * shape.layer_params(), phases=("train",)))

    # activations and logits of one micro-batch
    tokens = engine["batch_size"] * engine["max_length"]
    per_layer = layer_activation_bytes(shape, tokens, compute if compute != "float32" else "float32")
    if engine.get("gradient_checkpointing", False):
        act = shape.layers * tokens * shape.hidden * half + per_layer
        note = "checkpointed: each layer's input, one layer recomputed"
    else:
        act = shape.layers * per_layer
        note = "every layer's saved tensors"
    add(Item(f"activations ({engine['batch_size']} x {engine['max_length']} tokens)", act, phases=("train",),
             note=note))
    add(Item("logits at the supervised tokens", logits_bytes(shape, tokens, compute), phases=("train",),
             note="upper bound: every token supervised"))

    # frozen models: in the policy's dtype (the torch engine's fp32 masters; DeepSpeed's compute dtype)
    copy = (half if deepspeed else 4) * P

    def frozen(label: str) -> None:
        if stage != 3:
            add(Item(f"{label} (full copy)", copy, note="unsharded, on every rank"))
            return
        offload = engine.get("offload_param", "none") == "cpu"
        add(Item(f"{label} (shard)", 0 if offload else copy / W, host=copy / W * ranks_per_node if offload else 0,
                 note="1/W of a copy, partitioned like the policy" + (", on the host" if offload else "")))
        add(Item(f"{label}: gathered while it runs", frozen_working_set(shape, half), phases=("train",),
                 note="a module at a time: at most 2 layers or the output layer"))

    name = method.get("name", "")
    if name in ("grpo", "sft_then_grpo") and (method.get("kl_coef") or 0) > 0:
        frozen("GRPO KL reference")
    teacher = method.get("teacher", "frozen")
    if name.startswith("self_distill") and teacher != "student":
        frozen(f"teacher ({teacher})")
    if analysis.get("diagnostics") and analysis.get("probe_per_task"):
        add(Item("diagnostics: pi_0, pi_(t-1)", copy, host=2 * copy * ranks_per_node, phases=("generate",),
                 note="host copies on every rank; one on the GPU while it scores"))
    if analysis.get("drift"):
        add(Item("drift: base + stage weights (host)", 0, host=2 * copy * ranks_per_node / W,
                 note="host copies of each rank's share of the parameters: 1/W of the model per rank"))

    # generation: the larger of the evaluation batch and the rollout batch, in the built-in loop's KV cache or vLLM's
    if rollout.get("backend") == "vllm":
        share = rollout["vllm"]["gpu_memory_utilization"]
        asleep = half * P * ranks_per_node if rollout["vllm"].get("sleep_level", 1) == 1 else 0
        add(Item("vLLM engine (weights + KV cache)", share * gpu_gb * GB if gpu_gb is not None else 0, host=asleep,
                 phases=("generate",), note=f"rollout.vllm.gpu_memory_utilization={share} of the GPU"
                 + ("" if gpu_gb is not None else " (give --gpu-gb to count it)")
                 + "; asleep while training" + (", weights on the host" if asleep else "")))
    else:
        prompt = ev.get("max_prompt_length") or (shape.context or engine["max_length"])
        answer = _answer_limit(cfg)
        eval_rows = ev["batch_size"]
        roll_rows = rollout["batch_size"] * max(method.get("samples_per_prompt") or 1, method.get("group_size") or 1)
        rows = max(eval_rows, roll_rows)
        cache_dtype = compute if compute != "float32" or not deepspeed else "float32"
        add(Item(f"KV cache ({rows} rows x {prompt + answer} tokens)",
                 kv_cache_bytes(shape, rows, prompt + answer, cache_dtype),
                 phases=("generate",), note="largest of eval.batch_size and the rollout rows"))

    # host: every rank of a node builds the model on the host before it is moved or partitioned
    add(Item("host: model built per rank at start-up", 0, host=ranks_per_node * BYTES.get(
        cfg["backbone"].get("dtype", "float32"), 4) * P, phases=(), note="transient, before training"))
    return out


def _answer_limit(cfg) -> int:
    """The longest answer limit of the stream (``benchmark.max_new_tokens``: one number or per task), else 256."""
    limits = cfg["benchmark"].get("max_new_tokens")
    if isinstance(limits, dict) and limits:
        return max(int(v) for v in limits.values())
    if isinstance(limits, int):
        return limits
    return 256
