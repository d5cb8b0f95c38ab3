"""What several ranks buy: one row of evaluation on W ranks against one, ZeRO-3's all-gathers per optimizer
step with and without its prefetch trace, and the on-policy update split across the ranks against every rank
stepping over the whole rollout batch.

Run (starts its own ``torchrun`` workers; gloo on CPU, NCCL where GPUs are)::

    python -m opr.tools.bench.ranks --ranks 2 --threads 1 --out ranks.json                 # SmolLM2-135M
    python -m opr.tools.bench.ranks --backbone tiny --ranks 3                               # seconds

**Evaluation.** The default run's row (``mini_trace``'s 3 tasks x 100 eval prompts and the 50 general prompts,
greedy, batch 32, per-prompt token limits) through :func:`opr.evaluation.generate_answers` in one process and on
W ranks (``ranks=``: whole length-sorted batches dealt out by rows x tokens, answers gathered). It reports the
wall time of each (the slowest rank's), the prompts each rank decoded, and whether the W-rank answers equal the
one-process answers (they must, all of them). With W processes on fewer cores than W x ``--threads`` the ranks
compete for the cores: the ratio then measures the machine, not the split.

**ZeRO-3 prefetch.** :class:`opr.engine.deepspeed_engine.DeepSpeedTrainer` under ZeRO-3 on W ranks trains the
tiny model for ``--steps`` optimizer steps twice: as the trainer does (the parameter coordinator's step reset
per forward, so its fetch trace completes and it prefetches), and with the reset switched off (as before the
fix: the losses call the decoder directly, DeepSpeed's root-module hook never fires). Per step it counts the
all-gather calls (``torch.distributed`` all-gathers, every kind) and the seconds, and says whether the trace
is complete.

**On-policy update.** One GRPO optimizer step (ZeRO-2) over a fixed rollout batch (``--responses`` sequences of
40 prompt and 60 response tokens, random ids and advantages from a fixed seed, micro-batches of 4) on W ranks,
timed per step in two ways: each rank steps over its part (:func:`opr.methods.on_policy.rank_micro_batches`, as
the on-policy loop does) and each rank steps over every micro-batch (as before the split). Both give the one
process's loss and gradient norm (printed beside them); the split should cost about 1/W of the compute per rank plus the gradient
all-reduce, which both variants pay.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from opr.tools.bench.common import machine_info, table, write_json

ALL_GATHERS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _GroupRanks:
    """:class:`opr.distributed.Ranks` on the default process group, for a worker without a trainer."""

    def __init__(self) -> None:
        from opr import distributed

        self.rank, self.world_size = distributed.this_rank(), distributed.world_size()
        self.all_gather = distributed.gather_all


def _backbone(name: str):
    from opr.backbones import load_smollm2_135m, load_tiny

    return load_tiny(seed=0) if name == "tiny" else load_smollm2_135m()


def eval_worker(backbone_name: str, batch_size: int, out: Path) -> None:
    import torch.distributed as dist

    from opr import distributed
    from opr.benchmarks.mini_trace import load_mini_trace
    from opr.evaluation import EvalSettings, encode_eval_prompts, generate_answers

    layout = distributed.launch_env()
    distributed.init_process_group(layout, timeout_min=30)
    backbone, bench = _backbone(backbone_name), load_mini_trace()
    tasks = list(bench.tasks) + list(bench.general)
    settings = EvalSettings(batch_size=batch_size)
    prompts = encode_eval_prompts(backbone, tasks, settings)
    ranks = _GroupRanks() if layout.world_size > 1 else None
    counts: list[int] = []
    if ranks is not None:
        dist.barrier()
    clock = time.perf_counter()
    _, answers = generate_answers(backbone, tasks, settings, prompts=prompts, ranks=ranks, share_counts=counts)
    seconds = time.perf_counter() - clock
    if layout.rank == 0:
        out.write_text(json.dumps({"world_size": layout.world_size, "seconds": seconds, "prompts_per_rank": counts,
                                   "answers": answers}))


def _count_all_gathers() -> dict:
    """Wrap ``torch.distributed``'s all-gathers with a counter (DeepSpeed calls them through the module)."""
    import torch.distributed as dist

    counter = {"calls": 0}
    for name in ALL_GATHERS:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def counted(*args, _real=real, **kwargs):
            counter["calls"] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, counted)
    return counter


def zero3_worker(steps: int, prefetch: bool, out: Path) -> None:
    from opr import distributed
    from opr.backbones import load_tiny
    from opr.engine.deepspeed_engine import DeepSpeedTrainer
    from opr.types import SFTExample

    layout = distributed.launch_env()
    distributed.init_process_group(layout, timeout_min=30)
    counter = _count_all_gathers()
    trainer = DeepSpeedTrainer(load_tiny(seed=0), zero_stage=3, batch_size=2, grad_accum=2, max_length=64, lr=1e-3)
    if not prefetch:  # as before the fix
        trainer._reset_zero3_step = lambda: None
    records: list[dict] = []
    state = {"calls": 0, "clock": time.perf_counter()}

    def hook(stage_step: int, make_state) -> None:
        now = time.perf_counter()
        records.append({"step": stage_step, "all_gathers": counter["calls"] - state["calls"],
                        "seconds": now - state["clock"], "trace_complete": trainer.zero3_trace_complete()})
        state["calls"], state["clock"] = counter["calls"], time.perf_counter()

    examples = [SFTExample(prompt=f"What is {i} plus {2 * i + 1}?", response=f"The answer is {3 * i + 1}.",
                           task="arith", example_id=str(i)) for i in range(4 * layout.world_size * steps)]
    trainer.set_stage(1)
    trainer.step_hook = hook
    state["calls"], state["clock"] = counter["calls"], time.perf_counter()
    trainer.fit_sft(examples, task="arith", steps=steps)
    if layout.rank == 0:
        out.write_text(json.dumps(records))


def _rollout_batch(vocab: int, responses: int, seed: int = 0) -> list:
    """GRPO micro-batches of 4 (prompt 40, response 60 random token ids; one advantage per response)."""
    import torch

    from opr.losses.sft import pack
    from opr.methods.grpo import _PolicyBatch

    g = torch.Generator().manual_seed(seed)
    seqs = [(torch.randint(3, vocab, (40,), generator=g).tolist(), torch.randint(3, vocab, (60,), generator=g).tolist())
            for _ in range(responses)]
    adv = torch.randn(responses, generator=g)
    return [_PolicyBatch(pack(seqs[i : i + 4]), adv[i : i + 4].clone()) for i in range(0, responses, 4)]


def update_worker(backbone_name: str, responses: int, steps: int, split: bool, out: Path) -> None:
    from opr import distributed
    from opr.engine.deepspeed_engine import DeepSpeedTrainer
    from opr.methods.grpo import GRPO
    from opr.methods.on_policy import rank_micro_batches

    layout = distributed.launch_env()
    distributed.init_process_group(layout, timeout_min=30)
    backbone = _backbone(backbone_name)
    trainer = DeepSpeedTrainer(backbone, zero_stage=2, batch_size=4, max_length=128, lr=1e-6)
    loss_fn = GRPO().loss_fn(None)
    micro = _rollout_batch(len(backbone.tokenizer), responses)
    trainer.set_stage(1)
    trainer.begin_stage(steps + 1)
    records = []
    for step in range(steps + 1):  # step 0 warms up (DeepSpeed's buffers)
        for mb in micro:
            mb.logp_old = None  # as a fresh rollout batch: its first update caches the behaviour log-probs
        local = rank_micro_batches(micro, layout.rank, layout.world_size) if split else list(micro)
        clock = time.perf_counter()
        result = trainer.optimizer_step(local, loss_fn, [mb.num_targets for mb in local])
        seconds = max(distributed.gather_all(time.perf_counter() - clock))  # the slowest rank's
        if step:
            records.append({"step": step, "seconds": seconds, "loss": result["loss"], "grad_norm": result["grad_norm"],
                            "micro_batches": len(local)})
    if layout.rank == 0:
        out.write_text(json.dumps(records))


def _launch(ranks: int, args: Sequence[str], threads: int) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun) if torchrun.exists() else shutil.which("torchrun") or "torchrun",
                "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    done = subprocess.run([*launcher, "-m", "opr.tools.bench.ranks", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({done.returncode}): {done.stderr[-3000:]}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", choices=("smollm2_135m", "tiny"), default="smollm2_135m")
    ap.add_argument("--ranks", type=int, default=2, help="ranks to compare with one process (>= 2)")
    ap.add_argument("--batch-size", type=int, default=32, help="evaluation batch (eval.batch_size)")
    ap.add_argument("--steps", type=int, default=6, help="ZeRO-3 optimizer steps per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    ap.add_argument("--parts", nargs="+", choices=("eval", "zero3", "update"), default=["eval", "zero3", "update"],
                    help="which measurements to run (default: all three)")
    ap.add_argument("--responses", type=int, default=32, help="responses in the on-policy update's rollout batch")
    ap.add_argument("--worker", choices=("eval", "zero3", "update"), help=argparse.SUPPRESS)
    ap.add_argument("--split", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--prefetch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "eval":
        return eval_worker(args.backbone, args.batch_size, args.result)
    if args.worker == "zero3":
        return zero3_worker(args.steps, bool(args.prefetch), args.result)
    if args.worker == "update":
        return update_worker(args.backbone, args.responses, args.steps, bool(args.split), args.result)
    if args.ranks < 2:
        raise SystemExit(f"--ranks must be >= 2 (compared with one process), got {args.ranks}")
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (the trace completes after the first), got {args.steps}")
    results: dict = {"machine": machine_info(), "args": vars(args) | {"result": None}}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            results.update({"eval": _eval_part, "zero3": _zero3_part, "update": _update_part}[part](args, Path(tmp)))
    write_json(args.out, results)


def _eval_part(args: argparse.Namespace, tmp: Path) -> dict:
    evals = {}
    for world in (1, args.ranks):
        result = tmp / f"eval{world}.json"
        _launch(world, ["--worker", "eval", "--backbone", args.backbone, "--batch-size", str(args.batch_size),
                        "--result", str(result)], args.threads)
        evals[world] = json.loads(result.read_text())
    one, many = evals[1], evals[args.ranks]
    rows = [{"processes": w, "seconds": round(e["seconds"], 2), "prompts_per_rank": e["prompts_per_rank"] or "all"}
            for w, e in evals.items()]
    same = sum(a == b for ta, tb in zip(one["answers"], many["answers"]) for a, b in zip(ta, tb))
    total = sum(len(t) for t in one["answers"])
    print(f"evaluation of one row ({args.backbone}, batch {args.batch_size}, {args.threads} thread(s) per process)")
    print(table(rows))
    print(f"{args.ranks} ranks / 1 process wall time: {many['seconds'] / one['seconds']:.2f}x; answers identical: "
          f"{same}/{total}")
    return {"eval": {str(w): {k: v for k, v in e.items() if k != "answers"} for w, e in evals.items()},
            "eval_answers_identical": [same, total]}


def _zero3_part(args: argparse.Namespace, tmp: Path) -> dict:
    zero3 = {}
    for prefetch in (0, 1):
        result = tmp / f"zero3_{prefetch}.json"
        _launch(args.ranks, ["--worker", "zero3", "--steps", str(args.steps), "--prefetch", str(prefetch),
                             "--result", str(result)], args.threads)
        zero3["with reset (the trainer)" if prefetch else "without reset (before)"] = json.loads(result.read_text())
    zrows = [{"variant": v, **r} for v, recs in zero3.items() for r in recs]
    print(f"\nZeRO-3 on {args.ranks} ranks, tiny model, per optimizer step (2 micro-batches of 2 per rank)")
    print(table(zrows, ["variant", "step", "all_gathers", "seconds", "trace_complete"]))
    return {"zero3": zero3}


def _update_part(args: argparse.Namespace, tmp: Path) -> dict:
    updates = {}
    for world, split in ((1, 1), (args.ranks, 0), (args.ranks, 1)):
        result = tmp / f"update_{world}_{split}.json"
        _launch(world, ["--worker", "update", "--backbone", args.backbone, "--responses", str(args.responses),
                        "--steps", str(args.steps), "--split", str(split), "--result", str(result)], args.threads)
        name = "1 process" if world == 1 else f"{world} ranks, " + ("split (the loop)" if split else "whole (before)")
        updates[name] = json.loads(result.read_text())
    rows = [{"variant": v, "micro_batches_per_rank": recs[0]["micro_batches"],
             "median_s_per_step": round(sorted(r["seconds"] for r in recs)[len(recs) // 2], 3),
             "losses": " ".join(f"{r['loss']:.6f}" for r in recs),
             "grad_norms": " ".join(f"{r['grad_norm']:.6f}" for r in recs)} for v, recs in updates.items()]
    print(f"\nGRPO update ({args.backbone}, ZeRO-2, {args.responses} responses in micro-batches of 4, "
          f"{args.threads} thread(s) per process), per optimizer step after one warm-up step")
    print(table(rows))
    one, whole, split = (r["median_s_per_step"] for r in rows)
    print(f"split / whole on {args.ranks} ranks: {split / whole:.2f}x; split / 1 process: {split / one:.2f}x")
    return {"update": updates}

if __name__ == "__main__":
    main()
