"""DeepSpeed engine: the generated config, and per-step equivalence with the torch engine on 2 CPU ranks.

The equivalence test trains the tiny backbone for two stages of 3 optimizer steps each (17 examples, global
micro-batch 4, grad_accum 2: the last step of a stage has one micro-batch, whose single example leaves rank 0
an empty shard) under ZeRO-2 and ZeRO-3 with ``torchrun --nproc_per_node 2`` (gloo), and with the
single-process torch engine at ``batch_size x world_size``; the per-step losses must agree to 1e-5 relative
(float32). Between the stages every rank generates greedily for a different number of prompts, which under
ZeRO-3 works only if the model is materialised (no collectives in its forward). This file is also the worker
script: ``python tests/test_deepspeed.py --engine {torch,deepspeed} --zero-stage N --out FILE``.

GRPO's equivalence test runs ``train.py`` with ``method=grpo`` on 2 ranks (its rollout batches split across
them) and in one process with the torch engine: the same rollouts and per-step losses (1e-5 relative), and each
rank sampled only its share. Mid-stage resume (SFT and GRPO): SIGKILL, then the same command.

ZeRO-3 frozen models (GRPO's KL reference, ``self_distill``'s teacher): each rank holds 1/W of the parameter
bytes of a full copy and gathers a module at a time inside the forward (``--check frozen``: partitions, saved
and loaded weights, EMA, reuse), and ``self_distill`` with a frozen, EMA or base teacher on 2 ranks gives the
single-process losses (1e-4 relative); under bf16 (``--check frozen_bf16``) the partitions are bf16 and the EMA
is the bf16 lerp of the full tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, assert_same_run, run_until_mid_stage_then_kill

from opr import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
PER_RANK_BATCH, WORLD, GRAD_ACCUM, NUM_EXAMPLES = 2, 2, 2, 17
REL_TOL = 1e-5


def _deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # ImportError, or a broken install that fails while importing
        return f"deepspeed is not importable ({type(err).__name__}: {err}); pip install deepspeed"
    return None


pytestmark = [pytest.mark.deepspeed,
              pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))]


# ------------------------------------------------------------------------------------------------ worker
def _examples(n: int):
    from opr.types import SFTExample

    return [SFTExample(prompt=f"What is {i} plus {2 * i + 1}?", response=f"The answer is {3 * i + 1}.",
                       task="arith", example_id=str(i)) for i in range(n)]


class _Recorder:
    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.trainer = None

    def log_step(self, metrics: dict, step: int) -> None:
        # under ZeRO-3: whether the parameter coordinator has a complete fetch trace after this step (it prefetches)
        trace = self.trainer.zero3_trace_complete() if hasattr(self.trainer, "zero3_trace_complete") else None
        self.steps.append({"step": step, "trace_complete": trace, **metrics})


def worker(engine: str, zero_stage: int, out: Path, offload_optimizer: str = "none") -> None:
    import torch

    from opr.backbones import load_tiny
    from opr.generation import SamplingConfig, generate

    torch.manual_seed(0)
    backbone = load_tiny(seed=0)
    rec = _Recorder()
    if engine == "torch":
        from opr.engine.torch_engine import TorchTrainer

        trainer = TorchTrainer(backbone, lr=1e-3, batch_size=PER_RANK_BATCH * WORLD, grad_accum=GRAD_ACCUM,
                               max_length=64, seed=0, logger=rec)
    else:
        from opr.engine.deepspeed_engine import DeepSpeedTrainer

        trainer = DeepSpeedTrainer(backbone, zero_stage=zero_stage, lr=1e-3, batch_size=PER_RANK_BATCH,
                                   grad_accum=GRAD_ACCUM, max_length=64, seed=0, logger=rec,
                                   offload_optimizer=offload_optimizer)
    rec.trainer = trainer
    prompts = [backbone.format_prompt(f"What is {i} plus 3?", True) for i in range(4)]
    result: dict = {"rank": trainer.rank, "world_size": trainer.world_size, "stages": []}
    for stage in (1, 2):
        trainer.set_stage(stage)
        stats = trainer.fit_sft(_examples(NUM_EXAMPLES + stage - 1), task="arith")
        # A rank-dependent number of prompts: generation must need no collective (materialised under ZeRO-3).
        n = 2 + trainer.rank
        gens = generate(backbone, prompts[:n], SamplingConfig(max_new_tokens=6, batch_size=2))
        checksum = float(sum(p.detach().double().sum() for p in backbone.model.parameters()))
        result["stages"].append({"steps": stats.steps, "tokens": stats.supervised_tokens,
                                 "generations": [g[0].text for g in gens[:2]], "checksum": checksum})
    result["losses"] = [s["train/loss"] for s in rec.steps]
    result["optimizer"] = type(getattr(trainer, "_torch_optimizer", None) or trainer.optimizer).__name__
    result["trace_complete"] = [s["trace_complete"] for s in rec.steps]
    result["grad_norms"] = [s["train/grad_norm"] for s in rec.steps]
    if trainer.rank == 0:
        out.write_text(json.dumps(result))


def frozen_worker(out: Path) -> None:
    """ZeRO-3 frozen models on every rank: their partitions, a forward together, the saved and loaded weights,
    an EMA update, and the reuse of the partitions by the next stage's frozen model (``--check frozen``)."""
    import torch
    import torch.distributed as dist

    from opr.backbones import load_tiny
    from opr.engine.deepspeed_engine import DeepSpeedTrainer
    from opr.losses.sft import pack, target_logits, token_nll

    torch.manual_seed(0)
    backbone = load_tiny(num_layers=4, seed=0)  # 4 layers: a layer is a small part of the model
    model = backbone.model
    trainer = DeepSpeedTrainer(backbone, zero_stage=3, lr=1e-2, batch_size=2, max_length=64, seed=0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = sum(p.numel() for p in model.parameters())

    def max_diff(a: dict, b: dict) -> float:
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    def frozen_bytes(frozen) -> dict:
        return {"partition": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in frozen.parameters()),
                "gathered": sum(p.data.numel() * p.data.element_size() for p in frozen.parameters())}

    tok = backbone.tokenizer
    seqs = [(tok(f"What is {i} plus 2?")["input_ids"], tok(f"It is {i + 2}.")["input_ids"]) for i in range(3)]
    batch = pack(seqs)
    trainer.set_stage(1)
    frozen = trainer.frozen_model(model)  # the policy is whole here (no engine yet: as at a first stage)
    made = frozen_bytes(frozen)
    peak = []  # the frozen model's gathered bytes as each module with parameters starts its forward
    hooks = [m.register_forward_pre_hook(lambda *_: peak.append(frozen_bytes(frozen)["gathered"]))
             for m in frozen.modules() if list(m.parameters(recurse=False))]
    with torch.no_grad():
        logits_policy, logits_frozen = target_logits(model, batch), target_logits(frozen, batch)
    for h in hooks:
        h.remove()
    result: dict = {
        "full_bytes": full * 4, "made": made, "after_forward": frozen_bytes(frozen), "gathered_peak": max(peak),
        "layer_bytes": sum(p.numel() * 4 for p in model.get_decoder().layers[0].parameters()),
        "embedding_bytes": model.get_input_embeddings().weight.numel() * 4,
        "logits_diff": float((logits_policy - logits_frozen).abs().max()),
        "policy_unchanged": max_diff(start, {k: v for k, v in model.state_dict().items()}),
    }
    saved = trainer.frozen_state_dict(frozen)
    result["saved_keys_rank"] = len(saved)
    if trainer.rank == 0:
        result["saved_diff"] = max_diff(saved, start)

    def loss_fn(m, mb):
        return token_nll(target_logits(m, mb), mb.targets).sum(), {}

    trainer.begin_stage(2)  # the policy's engine: from here the policy is partitioned in training, whole outside
    trainer.optimizer_step([batch], loss_fn, [batch.num_targets])
    policy_partition = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    after_step = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.ema_update(frozen, 0.25)
    ema = trainer.frozen_state_dict(frozen)
    if trainer.rank == 0:
        expected = {k: start[k].lerp(after_step[k], 0.25) for k in start}
        result["ema_diff"] = max_diff(ema, expected)
        result["policy_moved"] = max_diff(after_step, start)
    trainer.load_frozen_state_dict(frozen, start)  # as a resume loads rank 0's saved weights on every rank
    loaded = trainer.frozen_state_dict(frozen)
    if trainer.rank == 0:
        result["loaded_diff"] = max_diff(loaded, start)
    trainer.set_stage(2)
    again = trainer.frozen_model(model)  # the next stage: the same partitions, now holding the trained policy
    with torch.no_grad():
        logits_policy, logits_again = target_logits(model, batch), target_logits(again, batch)
    try:  # a model of another architecture is refused, naming what differs
        trainer.frozen_model(load_tiny(num_layers=2, hidden_size=32, seed=0).model)
        result["other_architecture"] = None
    except ValueError as err:
        result["other_architecture"] = str(err)
    result.update(reused=again is frozen, reused_logits_diff=float((logits_policy - logits_again).abs().max()),
                  policy_partition=policy_partition, engines=len(trainer._frozen_engines))
    ranks = [None] * trainer.world_size
    dist.all_gather_object(ranks, result)
    if trainer.rank == 0:
        out.write_text(json.dumps(ranks))


def frozen_bf16_worker(out: Path) -> None:
    """A ZeRO-3 frozen model under ``compute_dtype=bfloat16`` made from a float32 policy (a first stage, before
    the policy's engine casts it): bf16 partitions like the policy's, the EMA over them, and the policy's logits
    once loaded from (or remade for the next stage from) the bf16 policy (``--check frozen_bf16``)."""
    import torch
    import torch.distributed as dist

    from opr.backbones import load_tiny
    from opr.engine.deepspeed_engine import DeepSpeedTrainer
    from opr.losses.sft import pack, target_logits, token_nll

    torch.manual_seed(0)
    backbone = load_tiny(num_layers=4, seed=0)
    model, tok = backbone.model, backbone.tokenizer
    trainer = DeepSpeedTrainer(backbone, zero_stage=3, lr=1e-2, batch_size=2, max_length=64, seed=0,
                               compute_dtype="bfloat16")
    batch = pack([(tok(f"What is {i} plus 2?")["input_ids"], tok(f"It is {i + 2}.")["input_ids"]) for i in range(3)])
    trainer.set_stage(1)
    frozen = trainer.frozen_model(model)
    result: dict = {"frozen_dtypes": sorted({str(p.ds_tensor.dtype) for p in frozen.parameters()}),
                    "partition_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in frozen.parameters()),
                    "full_params": sum(p.numel() for p in model.parameters())}
    trainer.begin_stage(2)
    trainer.optimizer_step([batch], lambda m, mb: (token_nll(target_logits(m, mb), mb.targets).sum(), {}),
                           [batch.num_targets])
    before = trainer.frozen_state_dict(frozen)
    trainer.ema_update(frozen, 0.5)
    after = trainer.frozen_state_dict(frozen)
    policy = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if trainer.rank == 0:  # the partitions' EMA is the bf16 lerp of the full tensors, element by element
        result["ema_diff"] = max(float((after[k].float() - before[k].lerp(policy[k], 0.5).float()).abs().max())
                                 for k in after)
        result["policy_moved"] = max(float((before[k].float() - policy[k].float()).abs().max()) for k in after)
    trainer.load_frozen_state_dict(frozen, policy)
    with torch.no_grad():
        result["loaded_logits_diff"] = float((target_logits(model, batch) - target_logits(frozen, batch)).abs().max())
    trainer.set_stage(2)
    again = trainer.frozen_model(model)
    with torch.no_grad():
        result["reused_logits_diff"] = float((target_logits(model, batch) - target_logits(again, batch)).abs().max())
    result["policy_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    ranks = [None] * trainer.world_size
    dist.all_gather_object(ranks, result)
    if trainer.rank == 0:
        out.write_text(json.dumps(ranks))


# ------------------------------------------------------------------------------------------------ tests
def test_deepspeed_config_from_args():
    from opr.engine.deepspeed_engine import deepspeed_config, shard_bounds

    cfg = deepspeed_config(zero_stage=3, batch_size=4, grad_accum=2, world_size=8, compute_dtype="bfloat16",
                           max_grad_norm=0.5, offload_optimizer="cpu", offload_param="cpu")
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_allow_untested_optimizer"] and cfg["zero_force_ds_cpu_optimizer"] is False
    fp32 = deepspeed_config(zero_stage=2, batch_size=1, grad_accum=1, world_size=1, max_grad_norm=None)
    assert "bf16" not in fp32 and "fp16" not in fp32 and fp32["gradient_clipping"] == 0.0
    assert "offload_optimizer" not in fp32["zero_optimization"]
    fp16 = deepspeed_config(zero_stage=2, batch_size=1, grad_accum=1, world_size=2, compute_dtype="float16")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    with pytest.raises(ValueError, match="zero_stage must be one of"):
        deepspeed_config(zero_stage=1, batch_size=1, grad_accum=1, world_size=1)
    with pytest.raises(ValueError, match="offload_param='cpu' needs zero_stage=3"):
        deepspeed_config(zero_stage=2, batch_size=1, grad_accum=1, world_size=1, offload_param="cpu")
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        deepspeed_config(zero_stage=2, batch_size=1, grad_accum=1, world_size=1, compute_dtype="fp8")
    with pytest.raises(ValueError, match="offload_optimizer must be one of"):
        deepspeed_config(zero_stage=2, batch_size=1, grad_accum=1, world_size=1, offload_optimizer="nvme")
    assert [shard_bounds(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
    assert [shard_bounds(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
def test_zero3_frozen_models_hold_one_partition_per_rank(tmp_path):
    """The reference / teacher under ZeRO-3 on 2 ranks: each rank holds half of a full copy's parameter bytes
    (the policy's own partition size), gathers a layer at a time only inside the forward that every rank calls
    together, and gives the policy's logits exactly; its saved weights (rank 0) are the full weights, an EMA
    update of the partitions equals the full lerp, loading puts them back, and the next stage reuses the
    partitions (one engine)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    launcher = [torchrun, "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    ranks = _run(["--engine", "deepspeed", "--check", "frozen"], tmp_path / "out.json", launcher)
    assert len(ranks) == WORLD
    for r in ranks:
        # 1/W of the full copy's bytes (up to each parameter's padding to a multiple of W: none for tiny's shapes)
        assert r["made"]["partition"] == r["after_forward"]["partition"] == r["full_bytes"] // WORLD
        assert r["made"]["partition"] == r["policy_partition"]  # partitioned like the policy
        assert r["made"]["gathered"] == r["after_forward"]["gathered"] == 0  # nothing kept between forwards
        # gathered inside the forward: at most a layer's parameters and the tied embedding (used again by the
        # output layer), never the whole model
        assert 0 < r["gathered_peak"] <= r["layer_bytes"] + r["embedding_bytes"] < r["full_bytes"] / 2
        assert r["logits_diff"] == 0.0 and r["policy_unchanged"] == 0.0
        assert r["reused"] and r["engines"] == 1 and r["reused_logits_diff"] == 0.0
    assert "model.embed_tokens.weight has shape (100, 32) in the model given, (100, 64) in the policy" in \
        ranks[0]["other_architecture"]
    assert ranks[0]["saved_keys_rank"] > 0 and ranks[1]["saved_keys_rank"] == 0  # saved once, by rank 0
    assert ranks[0]["saved_diff"] == 0.0 and ranks[0]["loaded_diff"] == 0.0
    assert ranks[0]["policy_moved"] > 0 and ranks[0]["ema_diff"] == 0.0
    # the memory plan's items for this frozen model are these bytes (its working set an upper bound)
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from opr.backbones import load_tiny
    from opr.config import validate
    from opr.memory_plan import ModelShape, plan

    shape = ModelShape.from_config(load_tiny(num_layers=4).model.config.to_dict())
    cfg = validate(compose_cfg(TINY + ["engine=deepspeed", "engine.zero_stage=3", "method=grpo", "method.kl_coef=0.05"],
                               tmp_path / "plan"))
    items = {i.name: i.gpu for i in plan(OmegaConf.to_container(cfg, resolve=True), shape, gpus=WORLD).items}
    assert items["GRPO KL reference (shard)"] == ranks[0]["made"]["partition"]
    assert items["GRPO KL reference: gathered while it runs"] >= ranks[0]["gathered_peak"]


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
def test_zero3_frozen_models_in_bf16(tmp_path):
    """compute_dtype=bfloat16 (the 7B preset's): the frozen model's partitions are bf16 (2 bytes per parameter,
    1/W each), its EMA equals the bf16 lerp of the full tensors, and loaded from the bf16 policy (or remade from
    it at the next stage) it gives the policy's logits exactly."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    launcher = [torchrun, "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    ranks = _run(["--engine", "deepspeed", "--check", "frozen_bf16"], tmp_path / "out.json", launcher)
    for r in ranks:
        assert r["frozen_dtypes"] == r["policy_dtypes"] == ["torch.bfloat16"]
        assert r["partition_bytes"] == 2 * r["full_params"] // WORLD
        assert r["loaded_logits_diff"] == 0.0 and r["reused_logits_diff"] == 0.0
    assert ranks[0]["policy_moved"] > 0 and ranks[0]["ema_diff"] == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path, launcher: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*launcher, str(Path(__file__)), *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory) -> dict:
    return _run(["--engine", "torch"], tmp_path_factory.mktemp("torch") / "out.json", [sys.executable])


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_losses_match_torch_engine(zero_stage, torch_reference, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    launcher = [torchrun, "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    got = _run(["--engine", "deepspeed", "--zero-stage", str(zero_stage)], tmp_path / "out.json", launcher)
    ref = torch_reference
    assert got["world_size"] == WORLD and got["rank"] == 0
    assert len(got["losses"]) == len(ref["losses"]) == 6  # 2 stages x 3 optimizer steps
    assert got["losses"] == pytest.approx(ref["losses"], rel=REL_TOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    # ZeRO-3 prefetches only along a complete trace, which needs a step reset per forward (the losses bypass the
    # root module's hook that DeepSpeed resets in): complete from the first step of each stage on
    assert got["trace_complete"] == ([True] * 6 if zero_stage == 3 else [None] * 6)
    for g, r in zip(got["stages"], ref["stages"]):
        assert g["steps"] == r["steps"] == 3 and g["tokens"] == r["tokens"]
        assert g["checksum"] == pytest.approx(r["checksum"], rel=1e-5)  # the full (materialised) weights
        assert g["generations"] == r["generations"]


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
def test_optimizer_offload_steps_with_deepspeed_cpu_adam(torch_reference, tmp_path):
    """``offload_optimizer=cpu`` steps with DeepSpeed's CPU Adam (AdamW mode, the same parameter groups), the
    update rule of the torch engine's AdamW: the same losses over 2 stages on 2 ranks (ZeRO-2)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    launcher = [torchrun, "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    got = _run(["--engine", "deepspeed", "--zero-stage", "2", "--offload-optimizer", "cpu"], tmp_path / "out.json",
               launcher)
    assert got["optimizer"] == "DeepSpeedCPUAdam" and torch_reference["optimizer"] == "AdamW"
    assert got["losses"] == pytest.approx(torch_reference["losses"], rel=REL_TOL)
    assert [g["checksum"] for g in got["stages"]] == pytest.approx([r["checksum"] for r in torch_reference["stages"]],
                                                                   rel=1e-5)


# ------------------------------------------------------------------------------------------------ resume
# The torch-engine resume test's run (tests/test_resume.py: OPR, 3 epochs, a training state after every step)
# on 2 ranks, with the per-rank batch halved so that the global batch is the same.
DS_RUN = TINY + ["method=opr", "budget=0.5", "engine=deepspeed", "engine.batch_size=2", "engine.epochs=3",
                 "checkpoint.every_steps=1", "seed=1"]


def _torchrun_train(run_dir: Path, port: int, zero_stage: int) -> list[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(ROOT / "train.py"), *DS_RUN, f"engine.zero_stage={zero_stage}", f"hydra.run.dir={run_dir}"]


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sigkill_mid_stage_then_resume_matches_uninterrupted(zero_stage, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def finish(run_dir: Path) -> dict:
        done = subprocess.run(_torchrun_train(run_dir, _free_port(), zero_stage), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=400)
        assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
        return json.loads((run_dir / "results.json").read_text())

    reference = finish(tmp_path / "ref")
    assert reference["run"]["world_size"] == WORLD

    run_dir = tmp_path / "killed"
    info = run_until_mid_stage_then_kill(_torchrun_train(run_dir, _free_port(), zero_stage), run_dir, env, stage=2,
                                         min_step=2, timeout=300)
    folder = ckpt.latest_train_state(run_dir)
    assert sorted(p.name for p in (folder / ckpt.RANKS_DIR).iterdir()) == ["rank0.pt", "rank1.pt"]
    assert info["stage_step"] < reference["stages"][2]["train"]["steps"]

    resumed = finish(run_dir)  # the same command again: resume=auto continues the killed stage
    assert resumed["resumed"][0]["kind"] == "mid_stage" and resumed["resumed"][0]["stage"] == 2
    assert_same_run(reference, resumed)


# GRPO's mid-stage position (the batch between its updates, the KL reference) with each rank's optimizer
# partition: 2 rollout batches x 2 updates per stage, a state after every step.
DS_GRPO = ["method=grpo", "method.group_size=4", "method.kl_coef=0.05", "method.steps=2", "method.prompts_per_step=4",
           "method.updates_per_batch=2"]


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_grpo_sigkill_mid_stage_then_resume_matches_uninterrupted(zero_stage, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def cmd(run_dir: Path) -> list[str]:
        return _torchrun_train(run_dir, _free_port(), zero_stage) + DS_GRPO

    def finish(run_dir: Path) -> dict:
        done = subprocess.run(cmd(run_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
        return json.loads((run_dir / "results.json").read_text())

    reference = finish(tmp_path / "ref")
    run_dir = tmp_path / "killed"
    run_until_mid_stage_then_kill(cmd(run_dir), run_dir, env, stage=2, min_step=1, timeout=300)
    folder = ckpt.latest_train_state(run_dir)
    assert sorted(p.name for p in (folder / ckpt.RANKS_DIR).iterdir()) == ["rank0.pt", "rank1.pt"]
    resumed = finish(run_dir)
    assert resumed["resumed"][0]["kind"] == "mid_stage" and resumed["resumed"][0]["stage"] == 2
    assert_same_run(reference, resumed)


# ------------------------------------------------------------------------------------------------ GRPO over 2 ranks
# The on-policy methods split each rollout batch's prompts across the ranks (rank r samples prompts r, r + 2,
# ... with the seeds they have in the whole batch) and gather the scored groups, so both ranks train on the
# whole batch. 3 prompts per batch: rank 0 samples 2 of each batch, rank 1 one. The 2-rank run must give the
# single-process torch engine's rollouts (rewards, finished fractions, supervised tokens: equal) and per-step
# losses (the SFT test's tolerance).
GRPO_SPLIT = TINY + ["method=grpo", "method.group_size=4", "method.steps=2", "method.prompts_per_step=3", "method.kl_coef=0.05",
                     "budget=0.5", "seed=1", "engine.batch_size=2"]


@pytest.fixture(scope="module")
def grpo_torch_reference(tmp_path_factory) -> dict:
    from conftest import compose_cfg

    from opr.run import run_experiment

    return run_experiment(compose_cfg(GRPO_SPLIT, tmp_path_factory.mktemp("grpo_torch") / "run"))


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_grpo_rollouts_split_across_ranks_match_one_process(zero_stage, grpo_torch_reference, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run_dir = tmp_path / "ds"
    cmd = [torchrun, "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1", "--master_port",
           str(_free_port()), str(ROOT / "train.py"), *GRPO_SPLIT, "engine=deepspeed",
           f"engine.zero_stage={zero_stage}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    got, ref = json.loads((run_dir / "results.json").read_text()), grpo_torch_reference
    assert got["status"] == ref["status"] == "complete" and got["run"]["world_size"] == WORLD
    for g, r in zip(got["stages"][1:], ref["stages"][1:], strict=True):
        gt, rt = g["train"], r["train"]
        # each rank sampled only its share: 2 batches x (2, 1) prompts; one process records no shares
        assert gt["prompts_per_rank"] == [4, 2] and "prompts_per_rank" not in rt
        # and trained on its part of each update (up to 12 responses in micro-batches of 2: up to 3 each per step);
        # before the update was split, each rank ran every micro-batch and no share was recorded
        shares = gt["micro_batches_per_rank"]
        assert len(shares) == 2 and min(shares) > 0 and max(shares) - min(shares) <= gt["steps"], shares
        assert max(shares) <= 3 * gt["steps"] and "micro_batches_per_rank" not in rt
        for key in ("steps", "rollout_batches", "rollouts", "reward_per_step", "finished_fraction_per_step",
                    "degenerate_fraction_per_step", "supervised_tokens", "skipped_steps"):
            assert gt[key] == rt[key], key
        for key in ("first_loss", "last_loss", "mean_loss", "mean_kl", "mean_entropy", "mean_clip_frac"):
            assert gt[key] == pytest.approx(rt[key], rel=REL_TOL, abs=1e-7), key
        assert gt["kl_per_step"] == pytest.approx(rt["kl_per_step"], rel=REL_TOL, abs=1e-7)
        assert gt["grad_norm_per_step"] == pytest.approx(rt["grad_norm_per_step"], rel=1e-4)
    for key in ("matrix", "general"):  # the evaluations of the trained weights (greedy)
        flat = [[v for row in (run[key] if key == "matrix" else run[key]["matrix"]) for v in row] for run in (got, ref)]
        assert flat[0] == pytest.approx(flat[1]), key
    for g, r in zip(got["stages"][1:], ref["stages"][1:], strict=True):  # the drift, each rank its share of it
        assert g["drift"].keys() == r["drift"].keys() and "spectral/k" in g["drift"]
        param = [{k: v for k, v in run["drift"].items() if k.startswith("param/")} for run in (g, r)]
        assert param[0] == pytest.approx(param[1], rel=1e-3)


# self_distill's frozen, EMA and base teachers are ZeRO-3 inference engines partitioned like the policy (each rank 1/W,
# gathered inside the forward both ranks call on the same micro-batches; the EMA moves each rank's partition):
# 2 ranks give the single-process torch engine's rollouts and losses.
SD_SPLIT = TINY + ["method=self_distill", "method.steps=2", "method.prompts_per_step=3", "method.samples_per_prompt=2",
                   "engine.lr=3e-3",
                   "budget=0.5", "seed=1", "engine.batch_size=2"]


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
@pytest.mark.parametrize("teacher", ["frozen", "ema", "base"])
def test_self_distill_zero3_teacher_on_two_ranks_matches_one_process(teacher, tmp_path):
    from conftest import compose_cfg

    from opr.run import run_experiment

    options = [*SD_SPLIT, f"method.teacher={teacher}", "method.ema_rate=0.5"]
    ref = run_experiment(compose_cfg(options, tmp_path / "torch"))
    run_dir = tmp_path / "ds"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "train.py"), *options, "engine=deepspeed",
           "engine.zero_stage=3", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    got = json.loads((run_dir / "results.json").read_text())
    assert got["status"] == ref["status"] == "complete" and got["run"]["world_size"] == WORLD
    for g, r in zip(got["stages"][1:], ref["stages"][1:], strict=True):
        gt, rt = g["train"], r["train"]
        assert gt["prompts_per_rank"] == [4, 2]
        shares = gt["micro_batches_per_rank"]  # up to 6 responses in micro-batches of 2 per step: 3 in all
        assert len(shares) == 2 and min(shares) > 0 and max(shares) <= 2 * gt["steps"], shares
        for key in ("steps", "rollouts", "reward_per_step", "finished_fraction_per_step", "supervised_tokens"):
            assert gt[key] == rt[key], key
        assert rt["last_loss"] > 0  # the teacher differs from the student (its context, from stage 2 its weights)
        for key in ("first_loss", "last_loss", "mean_loss", "mean_entropy"):
            assert gt[key] == pytest.approx(rt[key], rel=1e-4, abs=0), key
        assert gt["grad_norm_per_step"] == pytest.approx(rt["grad_norm_per_step"], rel=1e-4)


# ------------------------------------------------------------------------------------------------ inside-stage eval
# eval.every_steps evaluates inside a stage's training, where ZeRO-3 holds the model partitioned: every rank
# gathers it (trainer.inference()) and evaluates its share of the prompts. It once ran on rank 0 alone and hung
# in ZeRO-3's parameter broadcast while rank 1 waited in the next collective.
CURVE_RUN = TINY + ["method=seq_sft", "eval.every_steps=1", "eval.batch_size=2", "analysis.drift=false",
                    "analysis.diagnostics=false", "seed=1"]


@pytest.fixture(scope="module")
def curve_torch_reference(tmp_path_factory) -> dict:
    from conftest import compose_cfg

    from opr.run import run_experiment

    return run_experiment(compose_cfg(CURVE_RUN, tmp_path_factory.mktemp("curve_torch") / "run"))


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_inside_stage_eval_on_two_ranks_gives_the_one_process_curve(zero_stage, curve_torch_reference, tmp_path):
    run_dir = tmp_path / "ds"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "train.py"), *CURVE_RUN, "engine=deepspeed",
           "engine.batch_size=2", f"engine.zero_stage={zero_stage}", "engine.collective_timeout_min=2",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    got, ref = json.loads((run_dir / "results.json").read_text()), curve_torch_reference
    assert got["status"] == "complete" and got["run"]["world_size"] == WORLD
    for g, r in zip(got["stages"][1:], ref["stages"][1:], strict=True):
        assert len(g["curve"]) == len(r["curve"]) == 4  # 3 steps + the stage end
        for pg, pr in zip(g["curve"], r["curve"]):
            assert (pg["step"], pg["stage_step"], pg["scores"]) == (pr["step"], pr["stage_step"], pr["scores"])
            assert pg["loss"] == (None if pr["loss"] is None else pytest.approx(pr["loss"], rel=REL_TOL))


# ------------------------------------------------------------------------------------------------ one truth per run
# Every rank must train on the same stage data: a rank that builds other data (here rank 1 drops an example,
# as one differently sampled token would change a count) would step out of lockstep and hang the others in
# their next collective. The loop compares a hash of the data across the ranks and fails at once, naming the
# stage. The driver patches seq_sft's stage_data on rank 1 and runs train.py's main.
SKEWED_DRIVER = """
import runpy, sys
from opr.methods.seq_sft import SequentialSFT
original = SequentialSFT.stage_data
def skewed(self, ctx):
    data = original(self, ctx)
    if ctx.trainer.rank == 1:
        data.examples = data.examples[:-1]
    return data
SequentialSFT.stage_data = skewed
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun is not installed")
def test_ranks_with_different_stage_data_fail_naming_the_stage(tmp_path):
    import time

    driver = tmp_path / "skewed.py"
    driver.write_text(SKEWED_DRIVER)
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(driver), str(ROOT / "train.py"), *TINY, "method=seq_sft",
           "engine=deepspeed", "engine.batch_size=2", "analysis.drift=false", "analysis.diagnostics=false",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    clock = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "stage 1 (emotion): the ranks built different stage data" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - clock < 200  # failed, not hung until the 30-minute collective time-out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "different stage data" in results["error"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="equivalence worker (see the module docstring)")
    parser.add_argument("--engine", choices=["torch", "deepspeed"], required=True)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--check", choices=["losses", "frozen", "frozen_bf16"], default="losses")
    parser.add_argument("--offload-optimizer", choices=["none", "cpu"], default="none")
    a = parser.parse_args()
    if a.check == "frozen":
        frozen_worker(a.out)
    elif a.check == "frozen_bf16":
        frozen_bf16_worker(a.out)
    else:
        worker(a.engine, a.zero_stage, a.out, a.offload_optimizer)
