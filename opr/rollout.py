"""Rollouts: sample responses from a model, score them with their task's reward, keep the ones wanted.

Every method that generates (``opr``, ``lowscore_replay``, ``sdft``, ``grpo``, ``self_distill``) and the
per-stage diagnostics (``opr.diagnostics``) sample through this module; nothing here trains or measures.

* sample and score: :class:`Rollout` and :func:`sample_rollouts`: sampled (or greedy) responses with their
  task reward and whether they ended with EOS (a response cut at ``max_new_tokens`` did not choose to stop,
  so no EOS is trained or scored for it).
* keep: :func:`select_rollouts` (the rollouts of one prompt, ranked by reward or confidence, only the
  :func:`eligible` ones) and :func:`rank_pool` (the top k of many prompts' candidates).
* train on them: :func:`encode_response` gives (prompt ids, response ids) as the trainer packs them;
  :func:`frozen_copy` is a detached, eval-mode copy of a model (stage-start teacher, reference policy,
  π_{t-1} snapshot).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from opr.backbones import Backbone, encode_prompts, keep_last
from opr.distributed import Ranks
from opr.evaluation import context_length
from opr.generation import SamplingConfig, generate
from opr.types import Example, Task

# ----------------------------------------------------------------------------------------------------------
# sample and score


@dataclass(frozen=True)
class Rollout:
    """One response to ``example``: its text, its task reward (0-100), whether it ended with EOS, the mean
    token log-probability under the sampling distribution, the sampled token ids (EOS excluded), and whether
    it passes the task's acceptance check (``Task.accept``; ``None`` where the task has none)."""

    example: Example
    text: str
    reward: float
    finished: bool
    mean_logprob: float = 0.0
    token_ids: tuple[int, ...] = ()
    accepted: Optional[bool] = None


def sample_rollouts(
    backbone: Backbone,
    examples: Sequence[Example],
    tasks: Mapping[str, Task],
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    compute_dtype: str = "float32",
    model: Optional[torch.nn.Module] = None,
    max_new_tokens: Optional[int] = None,
    max_prompt_tokens: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
    ranks: Optional[Ranks] = None,
    share_counts: Optional[list[int]] = None,
) -> list[list[Rollout]]:
    """``num_samples`` responses per example (greedy when ``temperature == 0``), scored by each task's reward.

    Generation goes through the shared :func:`opr.generation.generate`, one call per task (each task has its
    own chat setting and answer length ``task.max_new_tokens``, unless ``max_new_tokens`` overrides it).
    ``model`` generates instead of ``backbone.model`` when given (same tokenizer and prompt format).
    ``max_prompt_tokens`` cuts longer prompts on the left (``eval.max_prompt_length``; when None, at the
    model's context minus the answer's token limit, as evaluation does).
    Returns one list of ``num_samples`` rollouts per example, in the order of ``examples``.

    ``indices``: sample only the examples at these positions of ``examples`` (one rank's share of a rollout
    batch), each with the generation seeds it has when the whole list is sampled (its position among its
    task's examples of the whole list); returns their lists only, in the order of ``indices``.

    ``ranks`` (every rank together; not with ``indices``): each task's prompts are shared across the ranks
    and every rank gets every rollout, as one process samples them (:func:`opr.generation.generate_encoded`);
    ``share_counts`` receives the prompts each rank sampled.
    """
    if ranks is not None and indices is not None:
        raise ValueError("sample_rollouts: give either indices (this rank's share, chosen by the caller) or ranks "
                         "(shared here), not both")
    counts = [0] * (1 if ranks is None else ranks.world_size)
    if model is not None:
        backbone = dataclasses.replace(backbone, model=model)
    out: list[list[Rollout]] = [[] for _ in examples]
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if ex.task not in tasks:
            raise KeyError(f"example {ex.id!r} belongs to task {ex.task!r}, which is not among {sorted(tasks)}")
        by_task.setdefault(ex.task, []).append(i)
    wanted = None if indices is None else set(indices)
    for name, idx in by_task.items():
        positions = None  # the seeds' prompt positions (within the task's examples of the whole list)
        if wanted is not None:
            positions = [k for k, i in enumerate(idx) if i in wanted]
            idx = [idx[k] for k in positions]
            if not idx:
                continue
        task = tasks[name]
        limit = max_new_tokens or task.max_new_tokens
        sampling = SamplingConfig(limit, temperature, top_p, num_samples, batch_size)
        prompts = [backbone.format_prompt(examples[i].prompt, task.chat) for i in idx]
        task_counts: list[int] = []
        cut = max_prompt_tokens
        if cut is None:  # as evaluation does: a prompt must leave room for its answer in the model's context
            context = context_length(backbone)
            cut = context - limit if context is not None and context > limit else None
        gens = generate(backbone, prompts, sampling, seed=seed, compute_dtype=compute_dtype, desc=False,
                        max_prompt_tokens=cut, prompt_indices=positions, ranks=ranks, share_counts=task_counts)
        counts = [a + b for a, b in zip(counts, task_counts)]
        for i, samples in zip(idx, gens):
            ex = examples[i]
            # generate() cuts at the first of the model's EOS ids (Backbone.eos_ids) and counts no EOS; a
            # response shorter than the limit therefore ended with one, a response at the limit did not.
            out[i] = [Rollout(ex, g.text, float(task.reward(g.text, ex)), g.num_tokens < limit, g.mean_logprob,
                              g.token_ids, None if task.accept is None else bool(task.accept(g.text, ex)))
                      for g in samples]
    if share_counts is not None:
        share_counts[:] = counts
    return out if indices is None else [out[i] for i in indices]


# ----------------------------------------------------------------------------------------------------------
# keep

UNFINISHED = ("drop", "no_eos")


def _rank_value(r: Rollout, key: str) -> float:
    if key == "reward":
        return r.reward
    if key == "confidence":
        return r.mean_logprob
    raise ValueError(f"unknown ranking key {key!r}; allowed: reward, confidence")


def eligible(r: Rollout, order: str, threshold: float | None, use_accept: bool, unfinished: str) -> bool:
    """Whether a rollout may be kept at all, before ranking.

    A cut-off rollout (no EOS within the token limit) is never eligible under ``unfinished="drop"``; under
    ``"no_eos"`` it is trained without EOS. For ``order="highest"``, the reward must reach ``threshold`` and,
    with ``use_accept``, the task's acceptance check must not have failed; for ``"lowest"`` (the low-score
    control) the reward must not exceed ``threshold`` and acceptance is not asked.
    """
    if unfinished == "drop" and not r.finished:
        return False
    if order == "highest":
        if threshold is not None and r.reward < threshold:
            return False
        return not (use_accept and r.accepted is False)
    return threshold is None or r.reward <= threshold


def select_rollouts(
    rollouts: Sequence[Rollout],
    order: Literal["highest", "lowest"],
    key: Literal["reward", "confidence"] = "reward",
    rule: Literal["best", "threshold"] = "best",
    threshold: float | None = None,
    max_per_prompt: int = 1,
    use_accept: bool = False,
    unfinished: str = "no_eos",
) -> list[Rollout]:
    """Keep the rollouts of one prompt by rank.

    Rollouts are ranked by ``key`` (``reward``, or ``confidence`` = mean token log-probability; ``highest``
    or ``lowest`` first; ties keep sampling order) and identical texts are kept once. Only :func:`eligible`
    rollouts count. ``rule="best"`` keeps the first ``max_per_prompt``; ``rule="threshold"`` keeps every
    eligible rollout (up to ``max_per_prompt``) and requires a threshold.
    """
    if rule not in ("best", "threshold"):
        raise ValueError(f"unknown keep rule {rule!r}; allowed: best, threshold")
    if rule == "threshold" and threshold is None:
        raise ValueError("keep rule 'threshold' needs a threshold")
    if order not in ("highest", "lowest"):
        raise ValueError(f"order must be 'highest' or 'lowest', got {order!r}")
    if unfinished not in UNFINISHED:
        raise ValueError(f"unfinished must be one of {list(UNFINISHED)}, got {unfinished!r}")
    sign = -1.0 if order == "highest" else 1.0
    ranked = sorted(enumerate(rollouts), key=lambda ir: (sign * _rank_value(ir[1], key), ir[0]))
    kept: list[Rollout] = []
    seen: set[str] = set()
    for _, r in ranked:
        if not eligible(r, order, threshold, use_accept, unfinished) or r.text in seen:
            continue
        seen.add(r.text)
        kept.append(r)
        if len(kept) >= max_per_prompt:
            break
    return kept


def rank_pool(candidates: Sequence[Rollout], k: int, order: Literal["highest", "lowest"],
              key: Literal["reward", "confidence"] = "reward") -> list[Rollout]:
    """The ``k`` best (``highest``) or worst (``lowest``) of many prompts' candidates (e.g. one per prompt of a
    past task), by ``key``; reward ties are broken by confidence (mean token log-probability, the more
    confident first for ``highest``), then by pool order. This is the reference implementation's selection:
    rank the whole pool, keep the top ρ·N (OPR-RU by the task metric, OPR-SC by confidence)."""
    sign = -1.0 if order == "highest" else 1.0

    def rank(ir: tuple[int, Rollout]) -> tuple[float, float, int]:
        i, r = ir
        return sign * _rank_value(r, key), sign * r.mean_logprob, i

    return [r for _, r in sorted(enumerate(candidates), key=rank)[:k]]


# ----------------------------------------------------------------------------------------------------------
# train on them


def encode_response(
    tokenizer, prompt_text: str, response_text: str, finished: bool, max_length: int,
    response_ids: Optional[Sequence[int]] = None,
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) for a packed batch, at most ``max_length`` tokens together.

    ``response_ids`` (a rollout's sampled tokens, EOS excluded) are used as they are when given: re-encoding
    the decoded text can give other ids than the model sampled, and then the log-probabilities (GRPO's
    ``logp_old``, the distillation targets) would be of a sequence the model never produced. The prompt is
    encoded as generation encoded it (:func:`opr.backbones.encode_prompts`: the family's BOS where it
    expects one), so the replayed prompt ids are the ones the response was sampled after.

    The response gets the tokenizer's EOS appended when ``finished``, whichever of the model's EOS ids
    (:attr:`opr.backbones.Backbone.eos_ids`) ended it: training teaches one end token, the one gold
    answers end with (``TorchTrainer.tokenize``). It is cut on the right to ``max_length - 1`` tokens and the
    prompt keeps its last tokens (a leading BOS stays: :func:`opr.backbones.keep_last`; the trainer's rule).
    The response may come back empty (an unfinished response of no text): callers skip those.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt and one response token), got {max_length}")
    if response_ids:
        response = list(response_ids)
    else:
        response = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if finished:
        response = response + [tokenizer.eos_token_id]
    response = response[: max_length - 1]
    prompt = encode_prompts(tokenizer, [prompt_text])[0]
    if not prompt:
        raise ValueError(f"prompt {prompt_text!r} has no tokens: the first response token would have no context")
    return keep_last(tokenizer, prompt, max_length - len(response)), response


def frozen_copy(
    model: torch.nn.Module, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None
) -> torch.nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off, optionally moved/cast (costs one model's
    parameters in memory, no optimizer state)."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    if device is not None or dtype is not None:
        clone.to(device=device, dtype=dtype)
    return clone.eval()
