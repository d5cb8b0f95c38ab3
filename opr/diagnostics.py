"""How far the policy moved: per-stage diagnostics, and the response-scoring pieces they share with the
on-policy methods (``grpo``, ``self_distill``).

Diagnostics (the loop calls them after each stage; every function is side-effect free for the models it is
given: train/eval mode is restored, nothing is updated):

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

Building blocks (used by the methods too):

* :class:`Rollout` and :func:`sample_rollouts`: sampled (or greedy) responses with their task reward and
  whether they ended with EOS (a response cut at ``max_new_tokens`` did not choose to stop, so no EOS is
  trained or scored for it).
* :func:`encode_response`: (prompt ids, response ids) as the trainer packs them.
* :func:`frozen_copy`: a detached, eval-mode copy of a model (stage-start teacher, reference policy,
  π_{t-1} snapshot).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from opr.backbones import Backbone
from opr.evaluation import context_length
from opr.generation import SamplingConfig, autocast, generate
from opr.losses.distill import distill_loss
from opr.losses.sft import pack, target_logits, token_nll
from opr.types import Example, Task

# ----------------------------------------------------------------------------------------------------------
# building blocks


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
) -> list[list[Rollout]]:
    """``num_samples`` responses per example (greedy when ``temperature == 0``), scored by each task's reward.

    Generation goes through the shared :func:`opr.generation.generate`, one call per task (each task has its
    own chat setting and answer length ``task.max_new_tokens``, unless ``max_new_tokens`` overrides it).
    ``model`` generates instead of ``backbone.model`` when given (same tokenizer and prompt format).
    ``max_prompt_tokens`` cuts longer prompts on the left (``eval.max_prompt_length``; when None, at the
    model's context minus the answer's token limit, as evaluation does).
    Returns one list of ``num_samples`` rollouts per example, in the order of ``examples``.
    """
    if model is not None:
        backbone = dataclasses.replace(backbone, model=model)
    out: list[list[Rollout]] = [[] for _ in examples]
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if ex.task not in tasks:
            raise KeyError(f"example {ex.id!r} belongs to task {ex.task!r}, which is not among {sorted(tasks)}")
        by_task.setdefault(ex.task, []).append(i)
    for name, idx in by_task.items():
        task = tasks[name]
        limit = max_new_tokens or task.max_new_tokens
        sampling = SamplingConfig(limit, temperature, top_p, num_samples, batch_size)
        prompts = [backbone.format_prompt(examples[i].prompt, task.chat) for i in idx]
        cut = max_prompt_tokens
        if cut is None:  # as evaluation does: a prompt must leave room for its answer in the model's context
            context = context_length(backbone)
            cut = context - limit if context is not None and context > limit else None
        gens = generate(backbone, prompts, sampling, seed=seed, compute_dtype=compute_dtype, desc=False,
                        max_prompt_tokens=cut)
        for i, samples in zip(idx, gens):
            ex = examples[i]
            # generate() cuts at the first EOS; a response shorter than the limit therefore ended with one.
            out[i] = [Rollout(ex, g.text, float(task.reward(g.text, ex)), g.num_tokens < limit, g.mean_logprob,
                              g.token_ids, None if task.accept is None else bool(task.accept(g.text, ex)))
                      for g in samples]
    return out


def encode_response(
    tokenizer, prompt_text: str, response_text: str, finished: bool, max_length: int,
    response_ids: Optional[Sequence[int]] = None,
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) for a packed batch, at most ``max_length`` tokens together.

    ``response_ids`` (a rollout's sampled tokens, EOS excluded) are used as they are when given: re-encoding
    the decoded text can give other ids than the model sampled, and then the log-probabilities (GRPO's
    ``logp_old``, the distillation targets) would be of a sequence the model never produced.

    The response gets EOS appended when ``finished``; it is cut on the right to ``max_length - 1`` tokens and
    the prompt keeps its last tokens (the trainer's rule, see ``TorchTrainer.tokenize``). The response may
    come back empty (an unfinished response of no text): callers skip those.
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
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if not prompt:
        raise ValueError(f"prompt {prompt_text!r} has no tokens: the first response token would have no context")
    return prompt[-(max_length - len(response)):], response


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
) -> list[Rollout]:
    """The greedy response of ``model`` (default ``backbone.model``) to each prompt: one Rollout per prompt."""
    groups = sample_rollouts(
        backbone, prompts, tasks, 1, 0.0, 1.0, batch_size, seed=0, compute_dtype=compute_dtype, model=model
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
) -> dict:
    """Runs every model of ``models`` over packed (prompt, response) batches; ``score_fn(logits_list,
    targets) -> [M]`` gives one value per response token; sums per sequence and summarises."""
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
    with eval_mode(*models):
        for start in range(0, len(scorable), batch_size):
            idx = scorable[start : start + batch_size]
            batch = pack([seqs[i] for i in idx])
            with autocast(compute_dtype):
                logits = [target_logits(m, batch.to(_device(m))) for m in models]
            first = logits[0].device
            values = score_fn([lg.to(first) for lg in logits], batch.targets.to(first))  # [M]
            where = torch.tensor(idx)[batch.seq_of_target]  # [M] sequence index of each token
            sums.index_add_(0, where, values.double().cpu())
            counts.index_add_(0, where, torch.ones(len(where), dtype=torch.float64))
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
) -> dict:
    """Mean token KL(π_a ‖ π_b) on π_a's greedy responses to ``prompts``.

    ``responses``: π_a's responses (one per prompt, e.g. from :func:`greedy_responses` with ``model=model_a``);
    computed here when None. The per-position KL is exact over the vocabulary:
    KL_k = Σ_v p_a(v) (log p_a(v) - log p_b(v)) with both distributions conditioned on (x, y<k); values are
    averaged over all response tokens (token-weighted), overall and per task.
    The models may live on different devices (each batch goes to each model's device).

    Shapes inside: per batch of S sequences with M response tokens, logits [M, V] per model -> KL [M].
    Returns ``{"mean", "tokens", "sequences", "per_task"}``; ``mean`` is nan when no response has a token.
    """
    if responses is None:
        responses = greedy_responses(backbone, prompts, tasks, model=model_a, compute_dtype=compute_dtype)

    def kl(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        la, lb = logits
        ones = torch.ones(1, la.shape[0], dtype=torch.bool, device=la.device)
        # distill_loss's reverse_kl is KL(student ‖ teacher); student = π_a, teacher = π_b.
        return distill_loss(la[None], lb[None], ones, kind="reverse_kl").per_token[0]

    return _per_token_scores(kl, [model_a, model_b], backbone, prompts, tasks, responses, batch_size, max_length,
                             compute_dtype)


def base_logprob(
    base_model: torch.nn.Module,
    backbone: Backbone,
    prompts: Sequence[Example],
    tasks: Mapping[str, Task],
    responses: Sequence[Rollout],
    batch_size: int = 8,
    max_length: int = 512,
    compute_dtype: str = "float32",
) -> dict:
    """Mean token log-probability of ``responses`` (the current model's, one per prompt) under ``base_model``.

    Shapes inside: logits [M, V], targets [M] -> log-probs [M]. Returns ``{"mean", "tokens", "sequences",
    "per_task"}`` (nats per token; closer to 0 = closer to what the base model would write).
    """

    def logprob(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        return -token_nll(logits[0], targets)

    return _per_token_scores(logprob, [base_model], backbone, prompts, tasks, responses, batch_size, max_length,
                             compute_dtype)
