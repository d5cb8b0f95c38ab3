"""How far the policy moved: per-stage diagnostics, the analysis side of the rollouts (``opr.rollout``).

The loop calls them after each stage; every function is side-effect free for the models it is given:
train/eval mode is restored, nothing is updated.

* :func:`policy_kl` = mean token KL(π_a ‖ π_b) on π_a's own greedy responses to a fixed sample of prompts.
  At each response position k the KL is exact over the vocabulary,
  Σ_v π_a(v | x, y<k) [log π_a(v | x, y<k) - log π_b(v | x, y<k)], and the mean is over all response
  tokens (EOS included when the response ended with one). With π_a the model after stage t and π_b a copy
  from before the stage (or the base model) this is KL(π_t ‖ π_{t-1}) (or KL(π_t ‖ π_0)).
* :func:`base_logprob` = mean token log-probability, under the base model, of the current model's
  responses: how far the responses drifted from what the base model would write (response-space drift).

Both take examples (prompts), the task map (for chat formatting and answer length) and optionally the
responses; :func:`greedy_responses` computes the responses once so that several diagnostics share them.
They return ``{"mean": float, "tokens": int, "sequences": int, "per_task": {task: float}}`` (token-weighted
means), ready for ``results.json``.

Responses are sampled and encoded by ``opr.rollout``; ``frozen_copy`` is re-exported from there for the
loop, which takes its π_{t-1} snapshot with it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

import torch

from opr.backbones import Backbone
from opr.distributed import Ranks
from opr.generation import autocast
from opr.losses.distill import distill_loss
from opr.losses.sft import pack, target_logits, token_nll
from opr.rollout import Rollout, encode_response, frozen_copy, sample_rollouts
from opr.types import Example, Task

# frozen_copy is re-exported: opr.loop imports it from here.
__all__ = ["base_logprob", "eval_mode", "frozen_copy", "greedy_responses", "policy_kl", "sample_probe"]

# ----------------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode and restore each one's mode afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(models, modes):
            m.train(was)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------------
# diagnostics


def sample_probe(tasks: Sequence[Task], per_task: int, seed: int, split: str = "eval") -> list[Example]:
    """A fixed sample of ``per_task`` prompts of each task's ``split`` (``train``, ``eval`` or ``test``).

    The sample depends only on (seed, task name), so every stage and every method probes the same prompts.
    """
    if split not in ("train", "eval", "test"):
        raise ValueError(f"split must be 'train', 'eval' or 'test', got {split!r}")
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    chosen: list[Example] = []
    for task in tasks:
        rows = getattr(task, split)
        chosen.extend(random.Random(f"probe/{seed}/{task.name}").sample(rows, min(per_task, len(rows))))
    return chosen


def greedy_responses(
    backbone: Backbone,
    prompts: Sequence[Example],
    tasks: Mapping[str, Task],
    model: Optional[torch.nn.Module] = None,
    batch_size: int = 32,
    compute_dtype: str = "float32",
    ranks: Optional[Ranks] = None,
    share_counts: Optional[list[int]] = None,
) -> list[Rollout]:
    """The greedy response of ``model`` (default ``backbone.model``) to each prompt: one Rollout per prompt
    (``ranks``: the prompts shared across the ranks, every rank gets every response; ``share_counts`` receives
    the prompts per rank)."""
    groups = sample_rollouts(
        backbone, prompts, tasks, 1, 0.0, 1.0, batch_size, seed=0, compute_dtype=compute_dtype, model=model,
        ranks=ranks, share_counts=share_counts,
    )
    return [g[0] for g in groups]


def _summary(values: torch.Tensor, counts: torch.Tensor, prompts: Sequence[Example]) -> dict:
    """Per-sequence sums [S] and token counts [S] -> token-weighted means overall and per task."""
    per_task: dict[str, list[float]] = {}
    for ex, v, c in zip(prompts, values.tolist(), counts.tolist()):
        acc = per_task.setdefault(ex.task, [0.0, 0.0])
        acc[0] += v
        acc[1] += c
    total = float(counts.sum())
    return {
        "mean": float(values.sum()) / total if total else float("nan"),
        "tokens": int(total),
        "sequences": int((counts > 0).sum()),
        "per_task": {t: (s / c if c else float("nan")) for t, (s, c) in per_task.items()},
    }


@torch.no_grad()
def _per_token_scores(
    score_fn,
    models: Sequence[torch.nn.Module],
    backbone: Backbone,
    prompts: Sequence[Example],
    tasks: Mapping[str, Task],
    responses: Sequence[Rollout],
    batch_size: int,
    max_length: int,
    compute_dtype: str,
    ranks: Optional[Ranks] = None,
) -> dict:
    """Runs every model of ``models`` over packed (prompt, response) batches; ``score_fn(logits_list,
    targets) -> [M]`` gives one value per response token; sums per sequence and summarises. ``ranks``: the
    batches (the same as on one process) are dealt out round-robin and the per-sequence sums added up across
    the ranks (each sequence is in one batch, so the sums are one process's)."""
    if len(responses) != len(prompts):
        raise ValueError(f"got {len(responses)} responses for {len(prompts)} prompts; need one per prompt")
    tok = backbone.tokenizer
    seqs = [
        encode_response(tok, backbone.format_prompt(ex.prompt, tasks[ex.task].chat), r.text, r.finished, max_length,
                        r.token_ids)
        for ex, r in zip(prompts, responses)
    ]
    sums = torch.zeros(len(seqs), dtype=torch.float64)
    counts = torch.zeros(len(seqs), dtype=torch.float64)
    scorable = [i for i, (_, resp) in enumerate(seqs) if resp]
    batches = [scorable[start : start + batch_size] for start in range(0, len(scorable), batch_size)]
    if ranks is not None and ranks.world_size > 1:
        batches = batches[ranks.rank :: ranks.world_size]
    with eval_mode(*models):
        for idx in batches:
            batch = pack([seqs[i] for i in idx])
            with autocast(compute_dtype):
                logits = [target_logits(m, batch.to(_device(m))) for m in models]
            first = logits[0].device
            values = score_fn([lg.to(first) for lg in logits], batch.targets.to(first))  # [M]
            where = torch.tensor(idx)[batch.seq_of_target]  # [M] sequence index of each token
            sums.index_add_(0, where, values.double().cpu())
            counts.index_add_(0, where, torch.ones(len(where), dtype=torch.float64))
    if ranks is not None and ranks.world_size > 1:
        parts = ranks.all_gather((sums, counts))
        sums, counts = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return _summary(sums, counts, prompts)


def policy_kl(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    backbone: Backbone,
    prompts: Sequence[Example],
    tasks: Mapping[str, Task],
    responses: Optional[Sequence[Rollout]] = None,
    batch_size: int = 8,
    max_length: int = 512,
    compute_dtype: str = "float32",
    ranks: Optional[Ranks] = None,
) -> dict:
    """Mean token KL(π_a ‖ π_b) on π_a's greedy responses to ``prompts`` (``ranks``: shared across the ranks).

    ``responses``: π_a's responses (one per prompt, e.g. from :func:`greedy_responses` with ``model=model_a``);
    computed here when None. The per-position KL is exact over the vocabulary:
    KL_k = Σ_v p_a(v) (log p_a(v) - log p_b(v)) with both distributions conditioned on (x, y<k); values are
    averaged over all response tokens (token-weighted), overall and per task.
    The models may live on different devices (each batch goes to each model's device).

    Shapes inside: per batch of S sequences with M response tokens, logits [M, V] per model -> KL [M].
    Returns ``{"mean", "tokens", "sequences", "per_task"}``; ``mean`` is nan when no response has a token.
    """
    if responses is None:
        responses = greedy_responses(backbone, prompts, tasks, model=model_a, compute_dtype=compute_dtype,
                                     ranks=ranks)

    def kl(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        la, lb = logits
        ones = torch.ones(1, la.shape[0], dtype=torch.bool, device=la.device)
        # distill_loss's reverse_kl is KL(student ‖ teacher); student = π_a, teacher = π_b.
        return distill_loss(la[None], lb[None], ones, kind="reverse_kl").per_token[0]

    return _per_token_scores(kl, [model_a, model_b], backbone, prompts, tasks, responses, batch_size, max_length,
                             compute_dtype, ranks)


def base_logprob(
    base_model: torch.nn.Module,
    backbone: Backbone,
    prompts: Sequence[Example],
    tasks: Mapping[str, Task],
    responses: Sequence[Rollout],
    batch_size: int = 8,
    max_length: int = 512,
    compute_dtype: str = "float32",
    ranks: Optional[Ranks] = None,
) -> dict:
    """Mean token log-probability of ``responses`` (the current model's, one per prompt) under ``base_model``
    (``ranks``: shared across the ranks).

    Shapes inside: logits [M, V], targets [M] -> log-probs [M]. Returns ``{"mean", "tokens", "sequences",
    "per_task"}`` (nats per token; closer to 0 = closer to what the base model would write).
    """

    def logprob(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        return -token_nll(logits[0], targets)

    return _per_token_scores(logprob, [base_model], backbone, prompts, tasks, responses, batch_size, max_length,
                             compute_dtype, ranks)
