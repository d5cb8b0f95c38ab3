"""Hand-computed checks of opr.losses.policy (GRPO pieces)."""

from __future__ import annotations

import math

import pytest
import torch

from opr.losses.policy import clipped_surrogate, group_advantages, grpo_loss, kl_penalty

D = torch.float64
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- advantages

# Three groups of G = 4:
#   [1, 0, 0, 1]: mean 1/2, deviations ±1/2, sample var = 4·(1/4)/3 = 1/3 -> A = ±(1/2)/√(1/3) = ±√3/2
#   [0.1]*4:      zero variance -> A = 0 exactly
#   [0, 0, 0, 1]: mean 1/4, deviations [-1/4]*3 + [3/4], sample var = (3/16 + 9/16)/3 = 1/4, std 1/2
#                 -> A = [-1/2, -1/2, -1/2, 3/2]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 1.0]
H = math.sqrt(3) / 2
EXPECTED = [[H, -H, -H, H], [0.0, 0.0, 0.0, 0.0], [-0.5, -0.5, -0.5, 1.5]]


def test_group_advantages_hand_values_flat_and_2d() -> None:
    flat = torch.tensor(REWARDS)
    for rewards in (flat, flat.reshape(3, 4)):
        adv = group_advantages(rewards, group_size=4)
        assert adv.shape == (3, 4) and adv.dtype == torch.float32
        torch.testing.assert_close(
            adv, torch.tensor(EXPECTED), atol=1e-5, rtol=0
        )  # eps = 1e-6 in the divisor
        assert (adv[1] == 0).all()  # exactly zero, not rounding noise / eps


def test_group_advantages_without_scaling_only_centres() -> None:
    adv = group_advantages(torch.tensor(REWARDS, dtype=D), group_size=4, scale=False)
    expected = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=D), atol=1e-15, rtol=0)


def test_group_advantages_integer_rewards_and_errors() -> None:
    adv = group_advantages(torch.tensor([1, 0, 0, 1]), group_size=4)
    torch.testing.assert_close(adv, torch.tensor([[H, -H, -H, H]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="G=4"):
        group_advantages(torch.zeros(2, 4), group_size=2)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.0, float("nan")]), group_size=2)
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(1, 2, 2), group_size=2)


# ------------------------------------------------------------------------------------------------ surrogate

# logp_old = 0, so ratio = exp(logp). clip_eps = 0.2 -> clip range [0.8, 1.2].
#   row 0, A = +1: ratio 1.5 -> -min(1.5, 1.2) = -1.2 (clipped, no gradient); ratio 1.1 -> -1.1 (inside)
#   row 1, A = -1: ratio 1.5 -> -min(-1.5, -1.2) = 1.5 (pessimistic branch, unclipped); ratio 0.5 ->
#                  -min(-0.5, -0.8) = 0.8 (clipped, no gradient)
#   row 2, A = +1: ratio 0.5 -> -min(0.5, 0.8) = -0.5 (unclipped); position 1 is padding (ratio 100)
#   row 3, A = -1: ratio 0.9 -> -min(-0.9, -0.9) = 0.9 (inside); position 1 is padding
# 6 masked tokens: loss = (-1.2 - 1.1 + 1.5 + 0.8 - 0.5 + 0.9) / 6 = 0.4 / 6; clip fraction 2/6.
RATIOS = [[1.5, 1.1], [1.5, 0.5], [0.5, 100.0], [0.9, 100.0]]
ADV = [1.0, -1.0, 1.0, -1.0]
MASK = [[1, 1], [1, 1], [1, 0], [1, 0]]


def _surrogate_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = torch.tensor(RATIOS, dtype=D).log().requires_grad_(True)
    return logp, torch.zeros(4, 2, dtype=D), torch.tensor(ADV, dtype=D), torch.tensor(MASK)


def test_clipped_surrogate_hand_values() -> None:
    logp, logp_old, adv, mask = _surrogate_inputs()
    out = clipped_surrogate(logp, logp_old, adv, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(0.4 / 6, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(2 / 6, abs=1e-12)
    expected_tokens = [[-1.2, -1.1], [1.5, 0.8], [-0.5, 0.0], [0.9, 0.0]]
    torch.testing.assert_close(out.per_token, torch.tensor(expected_tokens, dtype=D), atol=1e-12, rtol=0)
    # d loss / d logp = -A · ratio / 6 on the unclipped branch, 0 when clipped or padded.
    out.loss.backward()
    expected_grad = [[0.0, -1.1 / 6], [1.5 / 6, 0.0], [-0.5 / 6, 0.0], [0.9 / 6, 0.0]]
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor(expected_grad, dtype=D), atol=1e-12, rtol=0)


def test_clip_higher_widens_only_the_upper_bound() -> None:
    # clip_eps_high = 0.6 -> range [0.8, 1.6]: row 0 token 0 (ratio 1.5, A = +1) is now inside: -1.5.
    # Sum = -1.5 - 1.1 + 1.5 + 0.8 - 0.5 + 0.9 = 0.1; only row 1 token 1 stays clipped.
    logp, logp_old, adv, mask = _surrogate_inputs()
    out = clipped_surrogate(logp, logp_old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert out.loss.item() == pytest.approx(0.1 / 6, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(1 / 6, abs=1e-12)


def test_on_policy_surrogate_is_minus_mean_advantage() -> None:
    # logp_old = logp.detach(): ratio 1, loss = -Σ_masked A / #tokens = -(2·1 + 1·(-3)) / 3 = 1/3,
    # gradient -A / 3 per masked token.
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -7.0]], dtype=D, requires_grad=True)
    adv = torch.tensor([1.0, -3.0], dtype=D)
    mask = torch.tensor([[True, True], [True, False]])
    out = clipped_surrogate(logp, logp.detach(), adv, mask)
    assert out.loss.item() == pytest.approx(1 / 3, abs=1e-12)
    assert out.clip_frac.item() == 0.0
    out.loss.backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [1.0, 0.0]], dtype=D))


def test_surrogate_accepts_token_level_advantages_and_rejects_bad_shapes() -> None:
    logp, logp_old, adv, mask = _surrogate_inputs()
    per_row = clipped_surrogate(logp, logp_old, adv, mask)
    per_token = clipped_surrogate(logp, logp_old, adv[:, None].expand(4, 2), mask)
    assert per_token.loss.item() == pytest.approx(per_row.loss.item(), abs=1e-12)
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(logp, logp_old, adv[:3], mask)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        clipped_surrogate(logp, logp_old[:, :1], adv, mask)
    with pytest.raises(ValueError, match="mask"):
        clipped_surrogate(logp, logp_old, adv, mask[:, :1])
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_surrogate(logp, logp_old, adv, mask, clip_eps=1.0)
    with pytest.raises(ValueError, match="clip_eps_high"):
        clipped_surrogate(logp, logp_old, adv, mask, clip_eps_high=-0.1)


def test_surrogate_empty_mask_gives_zero() -> None:
    logp, logp_old, adv, _ = _surrogate_inputs()
    out = clipped_surrogate(logp, logp_old, adv, torch.zeros(4, 2))
    assert out.loss.item() == 0.0 and out.clip_frac.item() == 0.0


# ------------------------------------------------------------------------------------------------------- KL


def test_kl_penalty_hand_values() -> None:
    # token 0: π = 1/2, π_ref = 1/4 -> d = ln(π_ref/π) = -ln 2: k3 = 1/2 + ln 2 - 1 = ln 2 - 1/2 ≈ 0.193147
    # token 1: π = 1/4, π_ref = 1/2 -> d = +ln 2:            k3 = 2 - ln 2 - 1 = 1 - ln 2   ≈ 0.306853
    # token 2: padding.  mean over 2 tokens = (ln 2 - 1/2 + 1 - ln 2) / 2 = 1/4
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]], dtype=D)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -50.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0]])
    k3 = kl_penalty(logp, ref, mask, estimator="k3")
    assert k3.loss.item() == pytest.approx(0.25, abs=1e-12)
    torch.testing.assert_close(k3.per_token, torch.tensor([[LN2 - 0.5, 1 - LN2, 0.0]], dtype=D))
    # k1 = -d = [ln 2, -ln 2] -> mean 0;  k2 = d²/2 = (ln 2)²/2 for both.
    assert kl_penalty(logp, ref, mask, estimator="k1").loss.item() == pytest.approx(0.0, abs=1e-12)
    assert kl_penalty(logp, ref, mask, estimator="k2").loss.item() == pytest.approx(LN2**2 / 2, abs=1e-12)
    assert kl_penalty(logp, logp, mask).loss.item() == 0.0
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref, mask, estimator="k4")  # type: ignore[arg-type]


def test_k3_is_unbiased_for_kl_policy_to_reference() -> None:
    # E_{y~π}[k3(y)] = Σ_y π(y) (π_ref/π - 1 - ln(π_ref/π)) = 1 - 1 + KL(π || π_ref).
    # π = [1/2, 1/4, 1/4], π_ref = [1/4, 1/2, 1/4]: KL(π||π_ref) = 1/2 ln 2 + 1/4 ln(1/2) = 1/4 ln 2.
    pi = torch.tensor([0.5, 0.25, 0.25], dtype=D)
    ref = torch.tensor([0.25, 0.5, 0.25], dtype=D)
    per_token = kl_penalty(pi.log()[None], ref.log()[None], torch.ones(1, 3)).per_token[0]
    assert (pi * per_token).sum().item() == pytest.approx(LN2 / 4, abs=1e-12)


# ----------------------------------------------------------------------------------------------------- GRPO


def test_grpo_loss_combines_terms_and_sends_gradient_to_logp_only() -> None:
    logp, _, adv, mask = _surrogate_inputs()
    logp_old = torch.zeros(4, 2, dtype=D, requires_grad=True)
    ref = torch.full((4, 2), -0.1, dtype=D, requires_grad=True)
    out = grpo_loss(logp, logp_old, adv, mask, logp_ref=ref, kl_coef=0.5)
    policy = clipped_surrogate(logp, logp_old, adv, mask).loss
    kl = kl_penalty(logp, ref, mask).loss
    assert out.policy_loss.item() == pytest.approx(0.4 / 6, abs=1e-12)
    assert out.kl.item() == pytest.approx(kl.item(), abs=1e-12) and out.kl.item() > 0
    assert out.loss.item() == pytest.approx(policy.item() + 0.5 * kl.item(), abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(2 / 6, abs=1e-12)
    out.loss.backward()
    assert logp.grad is not None and logp_old.grad is None and ref.grad is None


def test_grpo_loss_without_kl_and_errors() -> None:
    logp, logp_old, adv, mask = _surrogate_inputs()
    out = grpo_loss(logp, logp_old, adv, mask)
    assert out.kl.item() == 0.0 and out.loss.item() == pytest.approx(0.4 / 6, abs=1e-12)
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(logp, logp_old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(logp, logp_old, adv, mask, logp_ref=logp_old, kl_coef=-1.0)
    with pytest.raises(ValueError, match="estimator"):
        grpo_loss(logp, logp_old, adv, mask, kl_estimator="k5")  # type: ignore[arg-type]


def test_grpo_end_to_end_with_group_advantages() -> None:
    # 1 prompt, G = 2 responses with rewards [1, 0]: sample std = √(1/2) -> A = ±(1/2)/√(1/2) = ±√2/2.
    # On-policy, one token each: loss = -(√2/2 - √2/2)/2 = 0, gradient on logp = -A/2 = [-√2/4, +√2/4].
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2).reshape(-1)
    logp = torch.tensor([[-1.0], [-2.0]], requires_grad=True)
    out = grpo_loss(logp, logp.detach(), adv, torch.ones(2, 1))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    out.loss.backward()
    assert logp.grad is not None
    r2 = math.sqrt(2) / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[-r2], [r2]]), atol=1e-5, rtol=0)
