"""opr_sdpa: per-sequence attention on packed rows must equal transformers' masked sdpa, values and gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opr.attention import NAME, packed_sdpa, use_packed_attention
from opr.backbones import load_tiny
from opr.losses.sft import pack, target_logits, token_nll


def _block_causal(lengths):
    n = sum(lengths)
    mask = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for L in lengths:
        mask[start:start + L, start:start + L] = torch.ones(L, L).tril().bool()
        start += L
    return mask


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_packed_sdpa_equals_block_diagonal_mask(kv_heads):
    torch.manual_seed(0)
    lengths = [3, 5, 1, 4]
    q = torch.randn(1, 4, sum(lengths), 8)
    k, v = torch.randn(1, kv_heads, sum(lengths), 8), torch.randn(1, kv_heads, sum(lengths), 8)
    cu = torch.tensor([0, 3, 8, 9, 13], dtype=torch.int32)
    module = torch.nn.Module()
    out, _ = packed_sdpa(module, q, k, v, None, scaling=0.5, cu_seq_lens_q=cu)  # [1, N, H, D]
    rep = 4 // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=_block_causal(lengths), scale=0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)
    # the first token of each sequence sees only itself: its output is its own value vector
    torch.testing.assert_close(out[0, 3], v[0, :, 3].repeat_interleave(rep, 0))


def test_packed_sdpa_rejects_boundaries_that_do_not_cover_the_row():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="from 0 to the row length 6"):
        packed_sdpa(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=torch.tensor([0, 2, 5], dtype=torch.int32))


def _gqa_model(impl):
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    if impl == NAME:
        use_packed_attention(model)
    return model


def test_training_loss_and_gradients_match_sdpa():
    seqs = [([5, 6, 7, 8], [9, 10]), ([11], [12, 13, 14]), ([15, 16, 17, 18, 19, 20], [21])]
    batch = pack(seqs)
    assert batch.cu_seqlens.tolist() == [0, 6, 10, 17]
    results = {}
    for impl in ("sdpa", NAME):
        model = _gqa_model(impl)
        assert model.config._attn_implementation == impl
        loss = token_nll(target_logits(model, batch), batch.targets).sum()
        loss.backward()
        results[impl] = (float(loss), torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert results["sdpa"][0] == pytest.approx(results[NAME][0], abs=1e-5)
    torch.testing.assert_close(results["sdpa"][1], results[NAME][1], atol=1e-6, rtol=1e-4)


def test_backbones_run_opr_sdpa():
    assert load_tiny().model.config._attn_implementation == NAME


def test_boundaries_reach_the_attention():
    """Proof that the packed path is the one computing: boundaries that merge all sequences into one change
    opr_sdpa's loss (the sequences now see each other), while sdpa, which ignores them, stays the same."""
    import dataclasses

    batch = pack([([5, 6, 7, 8], [9, 10]), ([11, 12], [13, 14])])
    merged = dataclasses.replace(batch, cu_seqlens=torch.tensor([0, batch.num_tokens], dtype=torch.int32))
    with torch.no_grad():
        for impl, changes in (("sdpa", False), (NAME, True)):
            model = _gqa_model(impl)
            a = float(token_nll(target_logits(model, batch), batch.targets).sum())
            b = float(token_nll(target_logits(model, merged), merged.targets).sum())
            assert (abs(a - b) > 1e-4) == changes, (impl, a, b)
