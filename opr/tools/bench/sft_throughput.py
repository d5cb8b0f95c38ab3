"""SFT throughput: this project's trainer against TRL's ``SFTTrainer`` (completion-only loss).

Run (SmolLM2-135M on CPU; each variant runs in its own process so that peak RSS is its own)::

    python -m opr.tools.bench.sft_throughput --steps 20 --out sft.json                    # fp32
    python -m opr.tools.bench.sft_throughput --steps 20 --dtype bfloat16 --out sft.json   # bf16 autocast, all variants

Every variant trains the same fresh model on the same examples (a round-robin mix of the seven mini_trace
tasks' training examples, chat-formatted prompts, gold answers + EOS, cut to ``--max-length`` tokens) with
the same effective batch, AdamW (lr, betas, eps 1e-8, weight decay, no decay on norms and biases), constant
learning rate, gradient clipping at 1.0 and the same compute dtype (``--dtype``: fp32, or bf16 autocast with
fp32 master weights, which is ``engine.compute_dtype=bfloat16`` for us and ``bf16=True`` for TRL):

- ``opr``: :class:`opr.engine.torch_engine.TorchTrainer` (padding-free packing with per-sequence attention,
  :mod:`opr.attention`; logits at supervised positions only; fused AdamW);
- ``trl_default``: ``SFTTrainer`` with its default data path (padded batches, random order) and its default
  activation (gradient) checkpointing, which ``SFTConfig`` turns on (it recomputes the forward pass in the
  backward pass to save memory);
- ``trl_padding_free``: ``padding_free=True`` + ``train_sampling_strategy="group_by_length"`` and activation
  checkpointing off (the fastest options of TRL 1.x / transformers 5.x for unpacked prompt-completion data;
  ``packing=True`` would change the batches and the number of steps, so it is not comparable);
- ``trl_aligned``: ``padding_free=True``, no activation checkpointing, on *our* batches: the dataset is given in the order of
  ``TorchTrainer.batches`` (seed, stage 0, epoch 0) with ``train_sampling_strategy="sequential"``, so its
  step k sees exactly our step k's examples. Its per-step losses are compared with ``opr``'s.
- ``opr_fp32``: ours in fp32 whatever ``--dtype`` says (run by default when ``--dtype`` is not fp32): the
  reference that shows the lower-precision run trains the same trajectory (second loss check).

TRL runs on transformers' stock ``sdpa`` attention and its own default optimizer (``adamw_torch_fused``).
The examples are given to TRL already tokenized (``input_ids`` + ``completion_mask`` from
``TorchTrainer.tokenize``), so both see identical token ids. Throughput = supervised (non-pad, completion)
tokens per second; the first step is left out of the per-step means (warm-up), and reported separately.

``--profile`` runs each variant under ``torch.profiler`` (CPU) and reports where the time goes: self CPU time
per operator class (matmuls, attention, softmax / cross-entropy, optimizer, the rest). The profiler adds
overhead, so profiled throughput numbers are not the benchmark's; run without it for those.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from opr.tools.bench.common import (
    DTYPES,
    load_mini_trace_all,
    machine_info,
    mixed_examples,
    peak_rss_mb,
    table,
    write_json,
)
from opr.types import SFTExample

VARIANTS = ("opr", "trl_default", "trl_padding_free", "trl_aligned", "opr_fp32")


def build_examples(num: int) -> list[SFTExample]:
    """``num`` gold SFT examples, round-robin over the seven mini_trace tasks' training splits."""
    bench = load_mini_trace_all(max(1, -(-num // 7)))
    return [SFTExample(prompt=ex.prompt, response=ex.answer, task=t.name, chat=t.chat, example_id=ex.id)
            for t, ex in mixed_examples(bench.tasks, num, split="train")]


class StepRecorder:
    """Per-step wall time, loss and supervised tokens (a logger for TorchTrainer, a callback body for TRL)."""

    def __init__(self) -> None:
        self.t_last = time.perf_counter()
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []

    def start(self) -> None:
        self.t_last = time.perf_counter()

    def record(self, loss: float, tokens: int) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.t_last)
        self.t_last = now
        self.losses.append(float(loss))
        self.tokens.append(int(tokens))

    # TorchTrainer's logger interface
    def log_step(self, metrics: dict, step: int) -> None:
        self.record(metrics["train/loss"], metrics["train/tokens"])


def summarize(rec: StepRecorder) -> dict:
    steady = slice(1, None) if len(rec.seconds) > 1 else slice(None)
    sec, tok = rec.seconds[steady], rec.tokens[steady]
    return {
        "steps": len(rec.seconds), "first_step_s": rec.seconds[0], "s_per_step": sum(sec) / len(sec),
        "tokens_per_s": sum(tok) / sum(sec), "supervised_tokens": sum(rec.tokens), "losses": rec.losses,
        "step_seconds": rec.seconds, "step_tokens": rec.tokens,
    }


def run_ours(args: argparse.Namespace, bb, examples: list[SFTExample]) -> StepRecorder:
    rec = StepRecorder()
    trainer = make_trainer(args, bb, dtype="float32" if args.variant == "opr_fp32" else args.dtype)
    trainer.logger = rec
    rec.start()
    trainer.fit_sft(examples, desc=args.variant)
    return rec


def make_trainer(args: argparse.Namespace, bb, dtype: str = "float32"):
    from opr.engine.torch_engine import TorchTrainer

    return TorchTrainer(bb, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), schedule="constant",
                        max_grad_norm=1.0, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        max_length=args.max_length, compute_dtype=dtype, epochs=1.0, max_steps=args.steps,
                        seed=args.seed)


def run_trl(args: argparse.Namespace, bb, examples: list[SFTExample], variant: str) -> tuple[StepRecorder, str]:
    import trl  # benchmark dependency only (requirements-bench.txt)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    # TRL runs on transformers' stock sdpa, as a researcher would run it on CPU. Our backbones switch to
    # opr_sdpa, which TRL's padding-free batches would also reach (they carry cu_seq_lens_q).
    bb.model.set_attn_implementation("sdpa")
    ours = make_trainer(args, bb)
    if variant == "trl_aligned":  # our batch order, flattened; TRL reads it sequentially
        seqs = [s for batch in ours.batches(examples, epoch=0) for s in batch]
    else:
        seqs = [ours.tokenize(e) for e in examples]
    data = Dataset.from_dict({
        "input_ids": [p + r for p, r in seqs],
        "completion_mask": [[0] * len(p) + [1] * len(r) for p, r in seqs],
    })
    rec = StepRecorder()
    counted = {"tokens": 0}

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):  # count the supervised targets each step sees
            counted["tokens"] += int((inputs["labels"][..., 1:] != -100).sum())
            return super().compute_loss(model, inputs, *a, **kw)

    class Timer(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec.record(logs["loss"], counted["tokens"])
                counted["tokens"] = 0

    padding_free = variant != "trl_default"
    strategy = {"trl_default": "random", "trl_padding_free": "group_by_length", "trl_aligned": "sequential"}[variant]
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr, weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.999,
            adam_epsilon=1e-8, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
            seed=args.seed, bf16=args.dtype == "bfloat16", fp16=False, dataloader_num_workers=0, disable_tqdm=True,
            # padding-free TRL refuses a max_length it cannot enforce; the inputs are already cut to it
            max_length=None if padding_free else args.max_length, completion_only_loss=True, packing=False, padding_free=padding_free,
            train_sampling_strategy=strategy,
            # SFTConfig turns activation checkpointing on by default; the fast variants turn it off (ours has none)
            activation_checkpointing=not padding_free,
        )
        trainer = Counting(model=bb.model, args=cfg, train_dataset=data, processing_class=bb.tokenizer,
                           callbacks=[Timer()])
        rec.start()
        trainer.train()
    return rec, trl.__version__


# operator name -> class, first match wins (aten names as the CPU profiler reports them)
OP_CLASSES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_efficient_attention")),
    ("softmax / cross-entropy", ("softmax", "log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("optimizer", ("_foreach_", "adam", "lerp", "addcdiv", "addcmul", "norm")),
    ("embedding", ("embedding",)),
)


def op_class(name: str) -> str:
    for label, needles in OP_CLASSES:
        if any(n in name for n in needles):
            return label
    return "other (elementwise, copies, ...)"


def profiled(fn):
    """Run ``fn()`` under the CPU profiler; returns (its result, self CPU seconds and share per operator class,
    the ten operators with the most self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    events = prof.key_averages()
    per_class: dict[str, float] = {}
    for e in events:
        per_class[op_class(e.key)] = per_class.get(op_class(e.key), 0.0) + e.self_cpu_time_total / 1e6
    total = sum(per_class.values()) or 1.0
    classes = {k: {"seconds": v, "share": v / total} for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])}
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    return out, {"classes": classes, "top_ops": [{"op": e.key, "seconds": e.self_cpu_time_total / 1e6,
                                                  "calls": e.count} for e in top]}


def worker(args: argparse.Namespace) -> dict:
    from opr.backbones import load_smollm2_135m, load_smollm2_135m_random, load_tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    loaders = {"smollm2_135m": load_smollm2_135m, "smollm2_135m_random": load_smollm2_135m_random,
               "tiny": load_tiny}
    bb = loaders[args.backbone]()
    examples = build_examples(args.steps * args.batch_size * args.grad_accum)
    def run():
        if args.variant.startswith("opr"):
            return run_ours(args, bb, examples), None
        return run_trl(args, bb, examples, args.variant)

    profile = None
    if args.profile:
        (rec, version), profile = profiled(run)
    else:
        rec, version = run()
    return {"variant": args.variant, "trl_version": version, "peak_rss_mb": peak_rss_mb(), "profile": profile,
            **summarize(rec)}


def compare(rows: dict[str, dict], a: str, b: str, tolerance: float) -> dict:
    """Per-step loss differences between variants ``a`` and ``b`` (run on the same examples per step);
    empty when either did not run."""
    if a not in rows or b not in rows:
        return {}
    diffs = [abs(x - y) for x, y in zip(rows[a]["losses"], rows[b]["losses"])]
    return {"variants": [a, b], "steps": len(diffs), "max_abs_diff": max(diffs),
            "mean_abs_diff": sum(diffs) / len(diffs), "tolerance": tolerance,
            "within_tolerance": max(diffs) <= tolerance,
            "tokens_equal": rows[a]["step_tokens"] == rows[b]["step_tokens"]}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backbone", choices=["smollm2_135m", "smollm2_135m_random", "tiny"], default="smollm2_135m",
                   help="smollm2_135m_random: SmolLM2's shapes, random weights (timing where the GGUF is absent)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per variant (0 = torch's default)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype of every variant but opr_fp32 (bfloat16: autocast, fp32 master weights)")
    p.add_argument("--variants", nargs="*", help=f"subset of {' '.join(VARIANTS)} (default: all; opr_fp32 "
                   "only when --dtype is not float32)")
    p.add_argument("--tolerance", type=float, help="max |loss difference| per step, opr vs trl_aligned "
                   "(default 1e-3 in float32, 2e-2 in bfloat16)")
    p.add_argument("--precision-tolerance", type=float, default=5e-2,
                   help="max |loss difference| per step, opr vs opr_fp32 (lower precision vs fp32)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--profile", action="store_true", help="report self CPU time per operator class (slower)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = [v for v in VARIANTS if v != "opr_fp32" or args.dtype != "float32"]
    if args.tolerance is None:
        args.tolerance = 1e-3 if args.dtype == "float32" else 2e-2
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1:
        raise SystemExit(f"--steps, --batch-size and --grad-accum must be >= 1, got {args.steps}, "
                         f"{args.batch_size}, {args.grad_accum}")
    bad = [v for v in args.variants + ([args.variant] if args.variant else []) if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; allowed: {', '.join(VARIANTS)}")
    if args.variant:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return {}
    rows: dict[str, dict] = {}
    failed: dict[str, str] = {}
    load_before = machine_info()["load_average"]
    for v in args.variants:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, "-m", "opr.tools.bench.sft_throughput", "--variant", v, "--worker-out", path,
               *(a for k, val in [("--steps", args.steps), ("--batch-size", args.batch_size),
                                  ("--grad-accum", args.grad_accum), ("--max-length", args.max_length),
                                  ("--lr", args.lr), ("--weight-decay", args.weight_decay), ("--seed", args.seed),
                                  ("--threads", args.threads), ("--dtype", args.dtype),
                                  ("--backbone", args.backbone)] for a in (k, str(val))),
               *(["--profile"] if args.profile else [])]
        t = time.perf_counter()
        done = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode != 0:  # report the others; the failure is in the worker's output above
            failed[v] = f"worker exited with status {done.returncode}"
            print(f"{v}: FAILED ({failed[v]})")
            continue
        rows[v] = {**json.loads(Path(path).read_text()), "process_s": time.perf_counter() - t}
        os.unlink(path)
        print(f"{v}: {rows[v]['tokens_per_s']:.1f} supervised tok/s, {rows[v]['s_per_step']:.2f} s/step")
    trl_best = max((r["tokens_per_s"] for k, r in rows.items() if k.startswith("trl")), default=None)
    summary = [{k: r[k] for k in ("variant", "steps", "s_per_step", "tokens_per_s", "first_step_s", "peak_rss_mb")}
               for r in rows.values()]
    for s in summary:
        s["x_trl_fastest"] = s["tokens_per_s"] / trl_best if trl_best else float("nan")
    check = compare(rows, "opr", "trl_aligned", args.tolerance)
    precision_check = compare(rows, "opr", "opr_fp32", args.precision_tolerance)
    payload = {
        "benchmark": "sft_throughput", "settings": {k: v for k, v in vars(args).items()
                                                    if k not in ("variant", "worker_out", "out")},
        "machine": {**machine_info(), "load_average_before": load_before},
        "trl_version": next((r["trl_version"] for r in rows.values() if r.get("trl_version")), None),
        "summary": summary, "loss_check": check, "precision_check": precision_check, "failed": failed, "variants": rows,
    }
    print(table(summary))
    for c in (check, precision_check):
        if c:
            a, b = c["variants"]
            print(f"loss {a} vs {b} over {c['steps']} steps: max |diff| {c['max_abs_diff']:.2e} "
                  f"(tolerance {c['tolerance']:.0e}: {'ok' if c['within_tolerance'] else 'EXCEEDED'}); "
                  f"same supervised tokens per step: {c['tokens_equal']}")
    for v, r in rows.items():
        if r.get("profile"):
            shares = ", ".join(f"{k} {c['share']:.0%} ({c['seconds']:.1f} s)" for k, c in r["profile"]["classes"].items())
            print(f"profile {v}: {shares}")
    print(f"load average before {load_before}, after {payload['machine']['load_average']}")
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
