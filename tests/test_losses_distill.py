"""Hand-computed checks of opr.losses.distill (V = 3 or 4, L = 2, float64 unless stated)."""

from __future__ import annotations

import math

import pytest
import torch

from opr.losses.distill import (
    KINDS,
    clipped_importance_weights,
    distill_loss,
    generalized_jsd,
    token_kl,
    topk_tail_logprobs,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
D = torch.float64


def logits(*rows: list[float]) -> torch.Tensor:
    """[1, L, V] float64 logits from L rows."""
    return torch.tensor([list(rows)], dtype=D)


# Running example (V = 3):
#   student z_s = [0, ln 2, 0]     -> p_s = [1, 2, 1] / 4 = [1/4, 1/2, 1/4]
#   teacher z_t = [ln 2, ln 2, 0]  -> p_t = [2, 2, 1] / 5 = [2/5, 2/5, 1/5]
Z_S = [0.0, LN2, 0.0]
Z_T = [LN2, LN2, 0.0]
P_S = [1 / 4, 1 / 2, 1 / 4]
P_T = [2 / 5, 2 / 5, 1 / 5]
# reverse KL(s||t) = 1/4 ln((1/4)/(2/5)) + 1/2 ln((1/2)/(2/5)) + 1/4 ln((1/4)/(1/5))
#                  = 1/4 ln(5/8) + 1/2 ln(5/4) + 1/4 ln(5/4) = 1/4 ln(5/8) + 3/4 ln(5/4)  ≈ 0.049857
REV = 0.25 * math.log(5 / 8) + 0.75 * math.log(5 / 4)
# forward KL(t||s) = 2/5 ln((2/5)/(1/4)) + 2/5 ln((2/5)/(1/2)) + 1/5 ln((1/5)/(1/4))
#                  = 2/5 ln(8/5) + 2/5 ln(4/5) + 1/5 ln(4/5) = 2/5 ln(8/5) + 3/5 ln(4/5)  ≈ 0.054115
FWD = 0.4 * math.log(8 / 5) + 0.6 * math.log(4 / 5)


def test_hand_constants() -> None:
    assert pytest.approx(0.0498568, abs=1e-6) == REV
    assert pytest.approx(0.0541153, abs=1e-6) == FWD


def test_reverse_and_forward_kl_hand_values_differ() -> None:
    # Position 0: the running example; position 1: student == teacher (KL 0). Both masked in -> mean of 2.
    s = logits(Z_S, [1.0, 2.0, 3.0])
    t = logits(Z_T, [1.0, 2.0, 3.0])
    mask = torch.ones(1, 2)
    rev = token_kl(s, t, mask, direction="reverse")
    fwd = token_kl(s, t, mask, direction="forward")
    assert rev.per_token[0, 0].item() == pytest.approx(REV, abs=1e-12)
    assert fwd.per_token[0, 0].item() == pytest.approx(FWD, abs=1e-12)
    assert rev.per_token[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert rev.loss.item() == pytest.approx(REV / 2, abs=1e-12)
    assert fwd.loss.item() == pytest.approx(FWD / 2, abs=1e-12)
    assert abs(rev.loss.item() - fwd.loss.item()) > 1e-3
    # The forward KL from the student's point of view is the reverse KL with the roles swapped.
    swapped = token_kl(t, s, mask, direction="reverse")
    assert swapped.loss.item() == pytest.approx(FWD / 2, abs=1e-12)
    # distill_loss is the same thing under its kind names.
    assert distill_loss(s, t, mask, kind="reverse_kl").loss.item() == pytest.approx(REV / 2, abs=1e-12)
    assert distill_loss(s, t, mask, kind="forward_kl").loss.item() == pytest.approx(FWD / 2, abs=1e-12)


def test_kl_gradients_match_closed_form() -> None:
    # d KL(s||t) / d z_s = p_s * (log p_s - log p_t - KL(s||t));  d KL(t||s) / d z_s = p_s - p_t.
    # One masked token, so the mean divides by 1.
    mask = torch.tensor([[1, 0]])
    for direction, expected in (
        ("reverse", [p * (math.log(p) - math.log(q) - REV) for p, q in zip(P_S, P_T, strict=True)]),
        ("forward", [p - q for p, q in zip(P_S, P_T, strict=True)]),
    ):
        s = logits(Z_S, [5.0, -5.0, 0.0]).requires_grad_(True)
        t = logits(Z_T, [0.0, 0.0, 0.0])
        token_kl(s, t, mask, direction=direction).loss.backward()
        assert s.grad is not None
        torch.testing.assert_close(s.grad[0, 0], torch.tensor(expected, dtype=D), atol=1e-12, rtol=0)
        torch.testing.assert_close(s.grad[0, 1], torch.zeros(3, dtype=D))  # padding gets no gradient


def test_jsd_symmetric_case_hand_value() -> None:
    # p_t = softmax([ln 2, 0, 0]) = [1/2, 1/4, 1/4], p_s = softmax([0, ln 2, 0]) = [1/4, 1/2, 1/4]
    # m = (p_t + p_s)/2 = [3/8, 3/8, 1/4]
    # KL(p_t||m) = 1/2 ln((1/2)/(3/8)) + 1/4 ln((1/4)/(3/8)) + 1/4 ln 1 = 1/2 ln(4/3) + 1/4 ln(2/3)
    # KL(p_s||m) = the same by symmetry, so JSD(0.5) = 1/2 ln(4/3) + 1/4 ln(2/3) ≈ 0.042475
    expected = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    s = logits([0.0, LN2, 0.0], [0.0, LN2, 0.0])
    t = logits([LN2, 0.0, 0.0], [LN2, 0.0, 0.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = generalized_jsd(s, t, mask, alpha=0.5)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() < LN2
    # alpha = 0.5 is symmetric in student and teacher.
    assert generalized_jsd(t, s, mask, alpha=0.5).loss.item() == pytest.approx(expected, abs=1e-12)


def test_jsd_asymmetric_alpha_hand_value() -> None:
    # Running example, alpha = 1/4:  m = 1/4 p_t + 3/4 p_s
    #   = [1/10 + 3/16, 1/10 + 3/8, 1/20 + 3/16] = [23/80, 38/80, 19/80]
    # KL(p_t||m) = 2/5 ln(32/23) + 2/5 ln(32/38) + 1/5 ln(16/19) = 2/5 ln(32/23) + 3/5 ln(16/19)
    # KL(p_s||m) = 1/4 ln(20/23) + 1/2 ln(40/38) + 1/4 ln(20/19) = 1/4 ln(20/23) + 3/4 ln(20/19)
    # JSD(1/4) = 1/4 KL(p_t||m) + 3/4 KL(p_s||m) ≈ 0.0098937
    kl_t = 0.4 * math.log(32 / 23) + 0.6 * math.log(16 / 19)
    kl_s = 0.25 * math.log(20 / 23) + 0.75 * math.log(20 / 19)
    expected = 0.25 * kl_t + 0.75 * kl_s
    s, t = logits(Z_S, Z_S), logits(Z_T, Z_T)
    mask = torch.tensor([[1.0, 0.0]])
    out = distill_loss(s, t, mask, kind="jsd", jsd_alpha=0.25)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    # Swapping the mixture weight (a known implementation slip) gives a different number (≈ 0.0095005).
    assert abs(distill_loss(s, t, mask, kind="jsd", jsd_alpha=0.75).loss.item() - expected) > 3e-4


def test_jsd_limits_approach_the_kls() -> None:
    s, t = logits(Z_S, Z_S), logits(Z_T, Z_T)
    mask = torch.ones(1, 2)
    a = 1e-5
    # alpha -> 0: JSD/alpha -> KL(teacher||student) (forward);
    # alpha -> 1: JSD/(1-alpha) -> KL(student||teacher) (reverse).
    assert generalized_jsd(s, t, mask, alpha=a).loss.item() / a == pytest.approx(FWD, rel=1e-3)
    assert generalized_jsd(s, t, mask, alpha=1 - a).loss.item() / a == pytest.approx(REV, rel=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_jsd_rejects_alpha_outside_open_interval(alpha: float) -> None:
    s, t = logits(Z_S, Z_S), logits(Z_T, Z_T)
    with pytest.raises(ValueError, match="alpha"):
        generalized_jsd(s, t, torch.ones(1, 2), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(s, t, torch.ones(1, 2), kind="jsd", jsd_alpha=alpha)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("topk", [None, 1, 2, 4])
def test_zero_loss_and_zero_gradient_when_student_equals_teacher(kind: str, topk: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 2, 4, generator=g, dtype=D)
    s = z.clone().requires_grad_(True)
    out = distill_loss(s, z.clone(), torch.ones(2, 2), kind=kind, topk=topk)  # type: ignore[arg-type]
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    out.loss.backward()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, torch.zeros_like(s), atol=1e-12, rtol=0)


def test_mask_ignores_padding_and_normalises_over_batch_tokens() -> None:
    # Batch of 2, mask [[1, 1], [1, 0]] -> 3 tokens: (REV + 0 + REV) / 3. Padding holds wild logits.
    s = torch.tensor([[Z_S, [1.0, 1.0, 1.0]], [Z_S, [1e4, -1e4, 0.0]]], dtype=D)
    t = torch.tensor([[Z_T, [1.0, 1.0, 1.0]], [Z_T, [-1e4, 1e4, 0.0]]], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = distill_loss(s, t, mask, kind="reverse_kl")
    assert out.loss.item() == pytest.approx(2 * REV / 3, abs=1e-12)  # token mean, not mean of row means
    assert out.per_token[1, 1].item() == 0.0
    # NaN in a padded position does not reach the forward value.
    s_nan = s.clone()
    s_nan[1, 1] = float("nan")
    assert distill_loss(s_nan, t, mask).loss.item() == pytest.approx(2 * REV / 3, abs=1e-12)


def test_empty_mask_gives_zero_not_nan() -> None:
    out = distill_loss(logits(Z_S, Z_S), logits(Z_T, Z_T), torch.zeros(1, 2), kind="forward_kl")
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_v_matches_full_vocabulary(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 2, 4, generator=g, dtype=D) * 2
    t = torch.randn(2, 2, 4, generator=g, dtype=D) * 2
    mask = torch.tensor([[1, 1], [0, 1]])
    full = distill_loss(s, t, mask, kind=kind, jsd_alpha=0.3)  # type: ignore[arg-type]
    binned = distill_loss(s, t, mask, kind=kind, jsd_alpha=0.3, topk=4)  # type: ignore[arg-type]
    torch.testing.assert_close(binned.per_token, full.per_token, atol=1e-12, rtol=0)
    tail = topk_tail_logprobs(t, s, 4)
    assert torch.isneginf(tail.teacher[..., -1]).all() and torch.isneginf(tail.student[..., -1]).all()


def test_topk_tail_bucket_is_exact_and_uses_teacher_ids() -> None:
    # V = 4. teacher z_t = [ln 3, ln 2, 0, 0] -> p_t = [3, 2, 1, 1]/7; its top-2 ids are {0, 1}.
    #        student z_s = [0, ln 2, ln 3, ln 2] -> p_s = [1, 2, 3, 2]/8 (the student's own top id is 2).
    # Bins (teacher's top-2 ids, then tail):
    #   teacher [3/7, 2/7, 1 - 5/7 = 2/7];  student [1/8, 2/8, 1 - 3/8 = 5/8]
    t = logits([LN3, LN2, 0.0, 0.0], [LN3, LN2, 0.0, 0.0])
    s = logits([0.0, LN2, LN3, LN2], [0.0, LN2, LN3, LN2])
    bins = topk_tail_logprobs(t, s, 2)
    assert bins.teacher.shape == (1, 2, 3) and bins.student.shape == (1, 2, 3)
    torch.testing.assert_close(bins.teacher[0, 0].exp(), torch.tensor([3 / 7, 2 / 7, 2 / 7], dtype=D))
    torch.testing.assert_close(bins.student[0, 0].exp(), torch.tensor([1 / 8, 2 / 8, 5 / 8], dtype=D))
    # reverse KL on the bins = 1/8 ln((1/8)/(3/7)) + 1/4 ln((1/4)/(2/7)) + 5/8 ln((5/8)/(2/7))
    #                        = 1/8 ln(7/24) + 1/4 ln(7/8) + 5/8 ln(35/16)
    rev = 0.125 * math.log(7 / 24) + 0.25 * math.log(7 / 8) + 0.625 * math.log(35 / 16)
    out = distill_loss(s, t, torch.tensor([[1, 0]]), kind="reverse_kl", topk=2)
    assert out.loss.item() == pytest.approx(rev, abs=1e-12)
    # forward KL on the bins = 3/7 ln((3/7)/(1/8)) + 2/7 ln((2/7)/(1/4)) + 2/7 ln((2/7)/(5/8))
    fwd = 3 / 7 * math.log(24 / 7) + 2 / 7 * math.log(8 / 7) + 2 / 7 * math.log(16 / 35)
    out = distill_loss(s, t, torch.tensor([[1, 0]]), kind="forward_kl", topk=2)
    assert out.loss.item() == pytest.approx(fwd, abs=1e-12)


def test_topk_tail_is_finite_for_a_confident_teacher_in_float32() -> None:
    # teacher z = [100, 0, 0, 0], k = 1: tail = 3 e^-100 / (1 + 3 e^-100),
    # log tail = ln 3 - 100 - log1p(3 e^-100).
    # log(1 - p_top) would round to log(0) = -inf in float32; the complement logsumexp stays exact.
    t = torch.tensor([[[100.0, 0.0, 0.0, 0.0]]])
    s = torch.zeros(1, 1, 4, requires_grad=True)
    bins = topk_tail_logprobs(t, s, 1)
    assert bins.teacher[0, 0, 1].item() == pytest.approx(LN3 - 100.0, abs=1e-4)
    assert bins.student[0, 0, 1].item() == pytest.approx(math.log(3 / 4), abs=1e-6)
    out = distill_loss(s, t, torch.ones(1, 1), kind="reverse_kl", topk=1)
    # reverse KL on bins: 1/4 ln((1/4)/1) + 3/4 ln((3/4)/(3 e^-100)) = 1/4 ln(1/4) + 3/4 (100 + ln(1/4))
    #                   = 75 - ln 4
    assert out.loss.item() == pytest.approx(75.0 - math.log(4.0), abs=1e-3)
    out.loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("topk", [None, 2])
def test_gradients_reach_the_student_only(kind: str, topk: int | None) -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 2, 4, generator=g).requires_grad_(True)
    t = torch.randn(1, 2, 4, generator=g).requires_grad_(True)
    out = distill_loss(s, t, torch.ones(1, 2), kind=kind, topk=topk)  # type: ignore[arg-type]
    out.loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_clipped_importance_weights() -> None:
    # exp(logp_cur - logp_beh) = [1/2, 3, 1, e^1000]; clip 2 -> [1/2, 2, 1, 2] (no overflow).
    cur = torch.tensor([[math.log(0.5), LN3], [0.0, 1000.0]], dtype=D, requires_grad=True)
    beh = torch.zeros(2, 2, dtype=D)
    w = clipped_importance_weights(cur, beh, clip=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 2.0], [1.0, 2.0]], dtype=D))
    assert not w.requires_grad  # detached
    assert torch.isinf(clipped_importance_weights(cur, beh, clip=float("inf"))[1, 1])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clip"):
            clipped_importance_weights(cur, beh, clip=bad)
    with pytest.raises(ValueError, match="same shape"):
        clipped_importance_weights(cur, beh[:, :1], clip=2.0)


def test_token_weights_multiply_per_token_loss() -> None:
    # Two tokens with reverse KL REV each; weights [1/2, 2] -> (REV/2 + 2 REV) / 2 tokens = 5/4 REV.
    s, t = logits(Z_S, Z_S), logits(Z_T, Z_T)
    w = torch.tensor([[0.5, 2.0]], dtype=D)
    out = distill_loss(s, t, torch.ones(1, 2), kind="reverse_kl", token_weights=w)
    assert out.loss.item() == pytest.approx(1.25 * REV, abs=1e-12)
    with pytest.raises(ValueError, match="token_weights"):
        distill_loss(s, t, torch.ones(1, 2), token_weights=w[:, :1])


def test_half_precision_is_upcast() -> None:
    s = logits(Z_S, Z_S).to(torch.bfloat16)
    t = logits(Z_T, Z_T).to(torch.bfloat16)
    out = distill_loss(s, t, torch.ones(1, 2))
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(REV, abs=5e-3)  # bf16 rounding of ln 2 in the inputs


def test_bad_inputs_raise_clear_errors() -> None:
    s, t, m = logits(Z_S, Z_S), logits(Z_T, Z_T), torch.ones(1, 2)
    with pytest.raises(ValueError, match="kind"):
        distill_loss(s, t, m, kind="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        token_kl(s, t, m, direction="backward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        distill_loss(s, t[:, :1], m)
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        distill_loss(s[0], t[0], m)
    with pytest.raises(ValueError, match="mask"):
        distill_loss(s, t, torch.ones(1, 3))
    with pytest.raises(ValueError, match="0 and 1"):
        distill_loss(s, t, torch.tensor([[0.5, 1.0]]))
    for k in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match="topk"):
            distill_loss(s, t, m, topk=k)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        distill_loss(s.long(), t.long(), m)


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_logits_shared_by_both_give_finite_loss_and_gradient(kind: str) -> None:
    # A vocabulary entry masked to -inf in both models (p = 0 in both) contributes 0 (0 log 0 = 0): the loss
    # equals the one on the remaining two entries, and no gradient is NaN.
    s = torch.tensor([[[0.0, LN2, float("-inf")]]], dtype=D, requires_grad=True)
    t = torch.tensor([[[LN2, 0.0, float("-inf")]]], dtype=D)
    out = distill_loss(s, t, torch.ones(1, 1), kind=kind)  # type: ignore[arg-type]
    ref = distill_loss(s.detach()[..., :2], t[..., :2], torch.ones(1, 1), kind=kind)  # type: ignore[arg-type]
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-12)
    out.loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad[0, 0, 2] == 0
