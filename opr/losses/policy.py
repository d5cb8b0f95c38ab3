"""GRPO pieces as pure functions: group-normalised advantages, PPO clipped surrogate, KL penalty.

GRPO (Shao et al. 2024, DeepSeekMath): for each prompt, G responses are sampled and scored; each
response's advantage is its reward normalised within its group and is shared by all its tokens; the
policy maximises the PPO clipped surrogate with an optional KL penalty to a frozen reference policy.

Conventions:

* ``logp``, ``logp_old``, ``logp_ref``: [B, L], log-probabilities of the SAMPLED response tokens under the
  current policy (with graph), the behaviour policy that sampled them, and the reference policy. Row b is
  one response; B = N prompts × G responses, grouped contiguously (rows g·G … g·G+G-1 share a prompt).
* ``mask``: [B, L], bool or 0/1, 1 on response tokens. Masked-out positions are excluded (per-token value 0)
  but should hold finite log-probs, or the backward pass gets NaN gradients there.
* ``logp_old``, ``logp_ref`` and ``advantages`` are detached inside: gradients reach ``logp`` only.
* Loss normalisation is token-level (DAPO, Yu et al. 2025): Σ over all masked tokens of the batch /
  number of masked tokens, so long responses are not down-weighted per token as with a per-sequence mean.
  ``per_token`` values are returned for callers that normalise across micro-batches themselves.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

KLEstimator = Literal["k1", "k2", "k3"]


class SurrogateOutput(NamedTuple):
    """loss: scalar to minimise; clip_frac: scalar fraction of masked tokens whose gradient the clip zeroes;
    per_token: [B, L] loss values, 0 off the mask."""

    loss: torch.Tensor
    clip_frac: torch.Tensor
    per_token: torch.Tensor


class KLOutput(NamedTuple):
    """loss: scalar, mean over masked tokens; per_token: [B, L], 0 off the mask."""

    loss: torch.Tensor
    per_token: torch.Tensor


class GRPOOutput(NamedTuple):
    """loss = policy_loss + kl_coef · kl (all scalars); clip_frac as in ``SurrogateOutput``."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_frac: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# helpers


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_mask(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Validate a [B, L] 0/1 mask and return it as bool."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)} (= [B, L]); got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 and 1 (or be bool); got other values")
    return mask != 0


def _check_same_shape(**tensors: torch.Tensor) -> torch.Size:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(tensors.values())).shape
    if len(first) != 2 or any(s != tuple(first) for s in shapes.values()):
        raise ValueError(f"expected tensors of one shape [B, L]; got {shapes}")
    return first


def _masked_sum_count(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero ``per_token`` off the mask (robust to NaN there); return it and max(#masked, 1)."""
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    per_token = torch.where(mask, per_token, zero)
    return per_token, mask.sum().clamp_min(1).to(per_token.dtype)


# ----------------------------------------------------------------------------------------------------------
# public API


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    eps: float = 1e-6,
    scale: bool = True,
) -> torch.Tensor:
    """GRPO advantages: A = (r - mean_group(r)) / (std_group(r) + eps), or r - mean_group(r) if not ``scale``.

    ``std`` is the SAMPLE standard deviation (Bessel's correction, divisor G - 1), ``torch.std``'s default
    and what the common GRPO implementations use (TRL, verl). ``scale=False`` gives Dr. GRPO's
    mean-centring only (Liu et al. 2025), which avoids up-weighting groups with a small reward spread.
    A group whose rewards are all equal carries no learning signal and gets advantages of exactly 0
    (not rounding noise divided by eps).

    Shapes: rewards [N*G] (groups contiguous) or [N, G] -> [N, G], float (float32 unless rewards are float64).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size must be an integer >= 2 (a group of 1 has no baseline); got {group_size!r}"
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    if rewards.dim() == 1:
        if rewards.numel() % group_size != 0:
            raise ValueError(
                f"{rewards.numel()} rewards cannot be split into groups of group_size={group_size}"
            )
        r = rewards.reshape(-1, group_size)
    elif rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards [N, G] has G={rewards.shape[1]} but group_size={group_size}")
        r = rewards
    else:
        raise ValueError(f"rewards must be [N*G] or [N, G]; got shape {tuple(rewards.shape)}")
    r = r.detach()
    r = r.to(torch.float64) if r.dtype == torch.float64 else r.to(torch.float32)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite; got NaN or inf")
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centred), centred)


def clipped_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> SurrogateOutput:
    """PPO clipped surrogate as a LOSS to minimise, with token-level normalisation.

    Per token: ratio = exp(logp - logp_old), ℓ = -min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A),
    with ε_low = ``clip_eps`` and ε_high = ``clip_eps_high`` (DAPO's "clip-higher"; defaults to ε_low).
    loss = Σ_masked ℓ / #masked tokens over the whole batch.

    ``clip_frac`` is the fraction of masked tokens where the clipped branch is the active one and has zero
    gradient: (ratio > 1 + ε_high and A > 0) or (ratio < 1 - ε_low and A < 0). For a single update on fresh
    samples pass ``logp_old = logp.detach()``: then ratio = 1 and the gradient is -A ∇logp / #tokens.

    Shapes: logp [B, L], logp_old [B, L], advantages [B] (one per response, broadcast over its tokens) or
    [B, L], mask [B, L] -> SurrogateOutput(loss [], clip_frac [], per_token [B, L]).
    """
    shape = _check_same_shape(logp=logp, logp_old=logp_old)
    bool_mask = _check_mask(mask, shape)
    eps_low = float(clip_eps)
    eps_high = eps_low if clip_eps_high is None else float(clip_eps_high)
    if not 0 <= eps_low < 1:
        raise ValueError(f"clip_eps must be in [0, 1); got {clip_eps}")
    if not eps_high >= 0:
        raise ValueError(f"clip_eps_high must be >= 0 (or None for clip_eps); got {clip_eps_high}")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        adv = advantages.detach()[:, None]
    elif tuple(advantages.shape) == tuple(shape):
        adv = advantages.detach()
    else:
        raise ValueError(
            f"advantages must be [B]={shape[0]} or [B, L]={tuple(shape)}; got {tuple(advantages.shape)}"
        )
    logp = _upcast(logp)
    adv = _upcast(adv).to(logp.dtype)
    ratio = torch.exp(logp - _upcast(logp_old.detach()))
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    per_token, count = _masked_sum_count(per_token, bool_mask)
    with torch.no_grad():
        is_clipped = ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps_low) & (adv < 0))
        clip_frac = (is_clipped & bool_mask).sum().to(per_token.dtype) / count
    return SurrogateOutput(per_token.sum() / count, clip_frac, per_token)


def kl_penalty(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    estimator: KLEstimator = "k3",
) -> KLOutput:
    """Sample-based estimate of KL(π_θ ‖ π_ref) on the sampled tokens, averaged over masked tokens.

    With d = logp_ref - logp = log(π_ref(y_k)/π_θ(y_k)) at each sampled token (Schulman, "Approximating KL
    divergence", 2020):

    * ``"k1"``: -d (unbiased, can be negative, high variance);
    * ``"k2"``: d² / 2 (biased, low variance, ≥ 0);
    * ``"k3"``: exp(d) - d - 1 (unbiased when y ~ π_θ, always ≥ 0, low variance); GRPO's choice.

    ``logp_ref`` is detached. Note: as a loss, k3's gradient is (1 - π_ref/π_θ) ∇logp, whose expectation
    under π_θ is the gradient of KL(π_ref ‖ π_θ), not of KL(π_θ ‖ π_ref); this is how GRPO uses it.

    Shapes: logp [B, L], logp_ref [B, L], mask [B, L] -> KLOutput(loss [], per_token [B, L]).
    """
    shape = _check_same_shape(logp=logp, logp_ref=logp_ref)
    bool_mask = _check_mask(mask, shape)
    d = _upcast(logp_ref.detach()) - _upcast(logp)
    if estimator == "k1":
        per_token = -d
    elif estimator == "k2":
        per_token = 0.5 * d.square()
    elif estimator == "k3":
        per_token = torch.expm1(d) - d  # exp(d) - 1 - d, accurate for small d
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: 'k1', 'k2', 'k3'")
    per_token, count = _masked_sum_count(per_token, bool_mask)
    return KLOutput(per_token.sum() / count, per_token)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    logp_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_estimator: KLEstimator = "k3",
) -> GRPOOutput:
    """GRPO loss = clipped surrogate + kl_coef · KL penalty, both token-level means over the same tokens.

    Since both terms share the denominator (#masked tokens), this equals Σ_masked (ℓ_pg + β ℓ_kl) / #masked.
    ``logp_ref`` is required when ``kl_coef > 0`` and ignored (kl reported as 0) when ``kl_coef == 0``.

    Shapes: logp, logp_old, mask, logp_ref [B, L]; advantages [B] or [B, L] (e.g. from
    ``group_advantages(rewards, G).reshape(-1)``) -> GRPOOutput of scalars.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; allowed: 'k1', 'k2', 'k3'")
    kl_coef = float(kl_coef)
    if not kl_coef >= 0 or math.isinf(kl_coef):
        raise ValueError(f"kl_coef must be a finite number >= 0; got {kl_coef}")
    surrogate = clipped_surrogate(
        logp, logp_old, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high
    )
    if kl_coef > 0:
        if logp_ref is None:
            raise ValueError(
                f"kl_coef={kl_coef} > 0 needs logp_ref (reference-policy log-probs [B, L]); got None"
            )
        kl = kl_penalty(logp, logp_ref, mask, estimator=kl_estimator).loss
        loss = surrogate.loss + kl_coef * kl
    else:
        kl = torch.zeros((), dtype=surrogate.loss.dtype, device=surrogate.loss.device)
        loss = surrogate.loss
    return GRPOOutput(loss=loss, policy_loss=surrogate.loss, kl=kl, clip_frac=surrogate.clip_frac)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Entropy (nats) of the distribution at each position: H_k = -Σ_v p_kv log p_kv, p_k = softmax(logits_k).

    A policy diagnostic (collapse shows as entropy falling towards 0), never part of a loss: no gradient.
    Computed in float32, ``chunk`` positions at a time (one [chunk, V] float copy in memory, not [M, V]).

    Shapes: logits [M, V] -> [M] float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [M, V]; got {tuple(logits.shape)}")
    out = []
    for i in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[i : i + chunk].float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)
