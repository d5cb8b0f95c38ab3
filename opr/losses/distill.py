"""Per-token divergences between a student and a teacher distribution, for on-policy self-distillation.

Setting (``self_distill``, SDPO/SDFT-style): responses ``y`` are SAMPLED FROM THE STUDENT ``π_θ(·|x)``; the
TEACHER is the same network conditioned on a demonstration in context, ``π(·|x, demo, y<k)``, and is the
TARGET. At every response position k both distributions over the vocabulary are available in full
(``student_logits[b, k]`` and ``teacher_logits[b, k]``), so each divergence below is computed exactly
over the vocabulary at the visited state instead of being estimated from the sampled token.

Names and directions (spelled out because public code has shipped with the two swapped):

* ``reverse`` KL  = KL(student ‖ teacher) = Σ_v p_s(v) [log p_s(v) - log p_t(v)].
  Expectation under the student, the distribution the responses were sampled from: mode-seeking.
* ``forward`` KL  = KL(teacher ‖ student) = Σ_v p_t(v) [log p_t(v) - log p_s(v)].
  Expectation under the teacher: mode-covering.
* generalized JSD (GKD, Agarwal et al. 2024) with β = ``alpha``:
  JSD(β) = β KL(p_t ‖ m) + (1 - β) KL(p_s ‖ m),  m = β p_t + (1 - β) p_s.

Conventions shared by every function here:

* ``student_logits``, ``teacher_logits``: [B, L, V]; position k holds the logits that predict token k of
  the response (the caller shifts). Half-precision inputs are upcast to float32; float64 stays float64.
* ``mask``: [B, L], bool or 0/1 numbers, 1 on the response tokens to train. Masked-out positions are
  excluded with ``torch.where`` and their per-token value is 0; their logits must still be finite for the
  backward pass to be (NaN there would turn into NaN gradients).
* The teacher is detached inside: gradients reach the student logits only.
* Reduction is token-level: Σ over masked tokens of the whole batch / number of masked tokens (a batch
  with no masked token gives a loss of 0, not NaN). ``per_token`` is returned too, for callers that
  normalise over several micro-batches themselves.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

Direction = Literal["reverse", "forward"]
Kind = Literal["reverse_kl", "forward_kl", "jsd"]
KINDS: tuple[str, ...] = ("reverse_kl", "forward_kl", "jsd")


class TokenLoss(NamedTuple):
    """loss: scalar, mean over masked tokens; per_token: [B, L], 0 where the mask is 0."""

    loss: torch.Tensor
    per_token: torch.Tensor


class TopKTail(NamedTuple):
    """Log-probs on k+1 bins: the teacher's top-k token ids, then one tail bucket. Both [B, L, k+1]."""

    teacher: torch.Tensor
    student: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# helpers


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 -> float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [B, L, V]; got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape [B, L, V]"
        )


def _check_mask(mask: torch.Tensor, shape: torch.Size | tuple[int, ...], name: str = "mask") -> torch.Tensor:
    """Validate a [B, L] 0/1 mask and return it as bool."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (= [B, L]); got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool); got other values")
    return mask != 0


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> TokenLoss:
    """per_token [B, L], mask bool [B, L] -> TokenLoss(Σ_masked / max(#masked, 1), per_token 0 off-mask)."""
    per_token = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    count = mask.sum().clamp_min(1).to(per_token.dtype)
    return TokenLoss(per_token.sum() / count, per_token)


def _kl_bins(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_i a_i (log a_i - log b_i) over the last dim: [..., N] -> [...].

    Bins with a_i = 0 (log a_i = -inf) contribute exactly 0 (0·log 0 = 0), also in the gradient; this
    matters for the empty tail bucket when k = V.
    """
    p_a = logp_a.exp()
    diff = torch.where(p_a > 0, logp_a - logp_b, torch.zeros((), dtype=logp_a.dtype, device=logp_a.device))
    return (p_a * diff).sum(-1)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(
            f"jsd alpha must lie strictly between 0 and 1; got {alpha}. At alpha=0 and alpha=1 the "
            "generalized JSD is identically 0 (m equals one of the two distributions and its KL term has "
            "weight 0); for the "
            "limits use kind='forward_kl' (alpha->0, JSD/alpha -> KL(teacher||student)) or kind='reverse_kl' "
            "(alpha->1, JSD/(1-alpha) -> KL(student||teacher))."
        )
    return alpha


def _jsd_bins(logp_s: torch.Tensor, logp_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalized JSD on log-probabilities over the last dim: [..., N] -> [...]; alpha in (0, 1)."""
    # log m = log(alpha p_t + (1 - alpha) p_s), computed with logsumexp so that small p stay accurate.
    # Bins empty in both (log p = -inf, e.g. the tail bucket when k = V) would give a NaN gradient through
    # logsumexp(-inf, -inf); they are routed around it and get log m = -inf directly.
    empty = torch.isneginf(logp_t) & torch.isneginf(logp_s)
    zero = torch.zeros((), dtype=logp_t.dtype, device=logp_t.device)
    safe_t = torch.where(empty, zero, logp_t) + math.log(alpha)
    safe_s = torch.where(empty, zero, logp_s) + math.log1p(-alpha)
    log_m = torch.where(empty, float("-inf"), torch.logsumexp(torch.stack([safe_t, safe_s]), dim=0))
    return alpha * _kl_bins(logp_t, log_m) + (1.0 - alpha) * _kl_bins(logp_s, log_m)


def _divergence_bins(logp_s: torch.Tensor, logp_t: torch.Tensor, kind: str, jsd_alpha: float) -> torch.Tensor:
    """Divergence ``kind`` between student and teacher log-probs over the last dim: [B, L, N] -> [B, L]."""
    if kind == "reverse_kl":
        return _kl_bins(logp_s, logp_t)
    if kind == "forward_kl":
        return _kl_bins(logp_t, logp_s)
    if kind == "jsd":
        return _jsd_bins(logp_s, logp_t, _check_alpha(jsd_alpha))
    raise ValueError(f"unknown distillation loss kind {kind!r}; allowed: {', '.join(KINDS)}")


def _apply_weights(per_token: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    if token_weights is None:
        return per_token
    if token_weights.shape != per_token.shape:
        raise ValueError(
            f"token_weights must have shape {tuple(per_token.shape)} (= [B, L]); "
            f"got {tuple(token_weights.shape)}"
        )
    return per_token * token_weights.detach().to(per_token.dtype)


# ----------------------------------------------------------------------------------------------------------
# public API


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    direction: Direction,
) -> TokenLoss:
    """Per-token KL between the student ``π_θ(·|x, y<k)`` and the teacher ``π(·|x, demo, y<k)``, exact over V.

    The responses y were sampled from the STUDENT; the TEACHER is the target (detached here).

    * ``direction="reverse"``: KL(student ‖ teacher) = Σ_v p_s (log p_s - log p_t), the expectation under
      the student's own distribution (the one y was drawn from); mode-seeking. This is the on-policy
      distillation objective.
    * ``direction="forward"``: KL(teacher ‖ student) = Σ_v p_t (log p_t - log p_s), the expectation under
      the teacher; mode-covering (equals token-level cross-entropy to the teacher's soft labels minus the
      teacher's entropy).

    Shapes: student_logits [B, L, V], teacher_logits [B, L, V], mask [B, L] -> loss [], per_token [B, L].
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(
            f"direction must be 'reverse' (KL(student||teacher)) or 'forward' "
            f"(KL(teacher||student)); got {direction!r}"
        )
    kind = "reverse_kl" if direction == "reverse" else "forward_kl"
    return distill_loss(student_logits, teacher_logits, mask, kind=kind)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    alpha: float,
) -> TokenLoss:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), per token, exact over V.

    With p_t the teacher (target, detached) and p_s the student (the sampling distribution of y):

        JSD(α) = α KL(p_t ‖ m) + (1 - α) KL(p_s ‖ m),    m = α p_t + (1 - α) p_s.

    α = 0.5 is the ordinary (symmetric) Jensen-Shannon divergence, bounded by ln 2. Limits: as α → 0,
    JSD(α)/α → KL(teacher ‖ student) (forward); as α → 1, JSD(α)/(1 - α) → KL(student ‖ teacher) (reverse).
    The endpoints themselves give an identically zero loss, so ``alpha`` must lie in the open interval
    (0, 1) and anything else raises ``ValueError``; use ``token_kl`` for the two KLs. (TRL and ms-swift map
    beta=0/1 to the forward/reverse KL instead, which makes the loss scale jump at the endpoints.)

    Shapes: student_logits [B, L, V], teacher_logits [B, L, V], mask [B, L] -> loss [], per_token [B, L].
    """
    _check_alpha(alpha)
    return distill_loss(student_logits, teacher_logits, mask, kind="jsd", jsd_alpha=alpha)


def topk_tail_logprobs(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int) -> TopKTail:
    """Both distributions restricted to the TEACHER's top-k token ids plus one tail bucket.

    For each position, bins 0..k-1 hold log p(v) for the teacher's k most likely ids v (in the teacher's
    descending order), and bin k holds log of the remaining mass, log(1 - Σ_topk p). The tail is computed
    as logsumexp(logits outside the top-k) - logsumexp(all logits), which equals log(1 - Σ_topk p) but has
    no cancellation: a teacher whose top-k mass rounds to 1 still gets a finite, accurate tail (the naive
    form would give log 0 = -inf and an infinite reverse KL). With k = V the tail bucket is empty
    (log-prob -inf) and contributes 0 to every divergence, so the k+1-bin loss equals the full one.

    The teacher output is detached; the student output keeps its graph.

    Shapes: teacher_logits [B, L, V], student_logits [B, L, V] -> TopKTail(teacher [B, L, k+1],
    student [B, L, k+1]); each row is a normalised distribution in log space.
    """
    _check_logits(student_logits, teacher_logits)
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"topk must be an integer in [1, V={vocab}]; got {k!r}")
    teacher = _upcast(teacher_logits.detach())
    student = _upcast(student_logits)
    top_ids = teacher.topk(k, dim=-1).indices  # [B, L, k]
    in_top = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, top_ids, True)  # [B, L, V]

    def binned(logits: torch.Tensor) -> torch.Tensor:
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, L, 1]
        top = logits.gather(-1, top_ids) - log_z  # [B, L, k]
        rest = logits.masked_fill(in_top, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1, keepdim=True) - log_z  # [B, L, 1]; -inf when k = V
        return torch.cat([top, tail], dim=-1)

    return TopKTail(teacher=binned(teacher), student=binned(student))


def clipped_importance_weights(
    logp_current: torch.Tensor,
    logp_behaviour: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """Truncated per-token importance weights for stale samples: w = min(π_cur(y_k)/π_beh(y_k), clip).

    When the responses were sampled by a behaviour policy that is no longer the current student (weights
    from a few steps ago, or a different inference engine), ``w = min(exp(logp_current - logp_behaviour),
    clip)`` re-weights each token's loss towards the current student's sampling distribution; truncating at
    ``clip`` bounds the variance (truncated importance sampling, as in IMPALA's ρ̄). The weight is a
    constant (detached): it rescales the per-token loss but is not itself optimised. Pass it as
    ``distill_loss(..., token_weights=w)``, which computes

        loss = Σ_{masked (b,k)} w[b,k] · ℓ[b,k] / #masked tokens

    (normalised by the token count, not by Σ w, so that w = 1 everywhere gives the unweighted loss). This
    is a per-token correction only; it does not correct the distribution of the prefix y<k.

    Shapes: logp_current [B, L], logp_behaviour [B, L] (log-probs of the sampled tokens) -> [B, L].
    """
    if logp_current.shape != logp_behaviour.shape:
        raise ValueError(
            f"logp_current {tuple(logp_current.shape)} and logp_behaviour {tuple(logp_behaviour.shape)} "
            "must have the same shape [B, L]"
        )
    clip = float(clip)
    if not clip > 0:  # also rejects NaN
        raise ValueError(f"clip must be a positive number (float('inf') for no truncation); got {clip}")
    log_ratio = _upcast(logp_current.detach()) - _upcast(logp_behaviour.detach())
    # min(exp(x), c) = exp(min(x, log c)): no overflow for large x.
    return torch.exp(log_ratio.clamp(max=math.log(clip)))


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: Kind = "reverse_kl",
    jsd_alpha: float = 0.5,
    topk: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> TokenLoss:
    """One entry point for the self-distillation loss.

    kind:
      * ``"reverse_kl"``: KL(student ‖ teacher), expectation under the student (which sampled y); default.
      * ``"forward_kl"``: KL(teacher ‖ student), expectation under the teacher (the target).
      * ``"jsd"``: GKD's generalized JSD with α = ``jsd_alpha`` in (0, 1) (see ``generalized_jsd``).
    topk: None for the exact full-vocabulary divergence; an integer k in [1, V] to compute the same
      divergence on k+1 bins, the teacher's top-k ids plus a tail bucket (see ``topk_tail_logprobs``).
    token_weights: optional [B, L] constants (e.g. ``clipped_importance_weights``) multiplying each token's
      divergence before the token-level mean; detached here.

    The teacher is detached: only ``student_logits`` receive gradients.

    Shapes: student_logits [B, L, V], teacher_logits [B, L, V], mask [B, L] -> TokenLoss(loss [],
    per_token [B, L]) where per_token already includes ``token_weights`` and is 0 off the mask.
    """
    _check_logits(student_logits, teacher_logits)
    if kind not in KINDS:
        raise ValueError(f"unknown distillation loss kind {kind!r}; allowed: {', '.join(KINDS)}")
    if kind == "jsd":
        _check_alpha(jsd_alpha)
    bool_mask = _check_mask(mask, student_logits.shape[:2])
    if topk is None:
        logp_t = torch.log_softmax(_upcast(teacher_logits.detach()), dim=-1)
        logp_s = torch.log_softmax(_upcast(student_logits), dim=-1)
    else:
        logp_t, logp_s = topk_tail_logprobs(teacher_logits, student_logits, topk)
    per_token = _divergence_bins(logp_s, logp_t, kind, jsd_alpha)
    return _masked_mean(_apply_weights(per_token, token_weights), bool_mask)
