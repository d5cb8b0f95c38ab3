"""opr_sdpa: packed rows' attention on each path (CPU loop, CUDA paths) must equal transformers' masked sdpa and
unpacked forward passes, values and gradients; the CUDA paths must not read tensors back to the host."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opr.attention import (
    FLASH_ATTN,
    LOOP,
    NAME,
    PADDED,
    TORCH_VARLEN,
    describe,
    kernels_available,
    packed_attention,
    packed_sdpa,
    select_packed_path,
    use_packed_attention,
)
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


# --- the paths of a packed call: CPU loop, and the CUDA paths that read nothing back to the host ----------

HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@pytest.mark.parametrize("device_type, dtype, dropout, flash, varlen, expected", [
    ("cpu", torch.bfloat16, 0.0, True, True, LOOP),
    ("cpu", torch.float32, 0.0, False, False, LOOP),
    ("cuda", torch.bfloat16, 0.0, True, True, FLASH_ATTN),
    ("cuda", torch.float16, 0.1, True, False, FLASH_ATTN),
    ("cuda", torch.bfloat16, 0.0, False, True, TORCH_VARLEN),
    ("cuda", torch.bfloat16, 0.1, False, True, PADDED),  # torch's varlen kernel has no dropout
    ("cuda", torch.float32, 0.0, True, True, PADDED),  # both kernels want fp16/bf16
    ("cuda", torch.bfloat16, 0.0, False, False, PADDED),
])
def test_select_packed_path(device_type, dtype, dropout, flash, varlen, expected):
    assert select_packed_path(device_type, dtype, dropout, flash, varlen) == expected


def test_kernels_are_never_available_off_cuda():
    assert kernels_available(torch.device("cpu")) == (False, False)


def _qkv(lengths, kv_heads, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(1, h, n, 8, generator=g).to(device, dtype).requires_grad_()
               for h in (4, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("slack", [0, 3])  # max_length the longest sequence, or above it
def test_padded_batch_equals_the_loop_values_and_gradients(kv_heads, slack):
    lengths = [3, 5, 1, 4, 5]
    results = []
    for path in (LOOP, PADDED):
        q, k, v, cu = _qkv(lengths, kv_heads)
        out = packed_attention(path, q, k, v, cu, max(lengths) + slack, scaling=0.5)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_padded_batch_reads_nothing_back(monkeypatch):
    """No tensor is read on the host, forward or backward: each host read is made to fail."""
    q, k, v, cu = _qkv([3, 5, 1, 4], 2)

    def refuse(*args, **kwargs):
        raise AssertionError("host read")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = packed_attention(PADDED, q, k, v, cu, 5, scaling=0.5)
    out.sum().backward()
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="host read"):  # the loop reads the boundaries
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, refuse)
        packed_attention(LOOP, q, k, v, cu, 5, scaling=0.5)


def test_sync_free_paths_need_max_length_and_integer_boundaries():
    q, k, v, cu = _qkv([2, 3], 4)
    with pytest.raises(ValueError, match="needs max_length_q"):
        packed_attention(PADDED, q, k, v, cu, None)
    with pytest.raises(ValueError, match="integer tensor"):
        packed_attention(PADDED, q, k, v, cu.float(), 3)
    with pytest.raises(ValueError, match="unknown packed attention path"):
        packed_attention("ring", q, k, v, cu, 3)


SEQS = [([5, 6, 7, 8], [9, 10]), ([11], [12, 13, 14]), ([15, 16, 17, 18, 19, 20], [21]), ([22, 23], [24])]


def _unpacked_logits(model):
    """Each sequence alone through the model (transformers' sdpa, no packing): logits at the supervised
    positions, in the order of a packed batch's targets."""
    out = []
    for prompt, response in SEQS:
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        out.append(logits[len(prompt) - 1: len(prompt) - 1 + len(response)])
    return torch.cat(out)


def test_model_on_each_path_equals_unpacked_forward_passes(monkeypatch):
    """target_logits with the loop and with the padded batch (forced: on the CPU opr_sdpa picks the loop) equal
    one forward pass per sequence, logits and gradients (float32)."""
    import opr.attention

    batch = pack(SEQS)
    weights = torch.linspace(-1, 1, 97)

    def run(logits_of):
        model = _gqa_model(NAME)
        logits = logits_of(model)
        (logits * weights).sum().backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ref = run(_unpacked_logits)
    for path in (LOOP, PADDED):
        monkeypatch.setattr(opr.attention, "path_for", lambda *a, path=path: path)
        got = run(lambda m: target_logits(m, batch))
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)


def _count_host_reads(monkeypatch, fn):
    counts = {"n": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(*args, original=original, **kwargs):
            counts["n"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return counts["n"]


@pytest.mark.parametrize("path, grows_with_layers", [(LOOP, True), (PADDED, False)])
def test_host_reads_per_forward_do_not_grow_with_layers_on_the_cuda_path(monkeypatch, path, grows_with_layers):
    """The loop reads the boundaries in every layer; the padded path (what CUDA gets without a varlen kernel)
    reads nothing per layer: a forward reads the same number of times with 2 layers as with 6."""
    import opr.attention

    batch = pack(SEQS)
    reads = {}
    for layers in (2, 6):
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
        model.set_attn_implementation("sdpa")
        use_packed_attention(model)
        monkeypatch.setattr(opr.attention, "path_for", lambda *a: path)
        with torch.no_grad():
            reads[layers] = _count_host_reads(monkeypatch, lambda m=model: target_logits(m, batch))
    assert (reads[6] > reads[2]) == grows_with_layers, reads
    if not grows_with_layers:
        assert reads[6] <= 2, reads  # the longest sequence (target_logits) and transformers' packed-mask check


def test_describe_names_the_path_a_run_takes():
    assert describe(load_tiny().model) == LOOP
    model = _gqa_model("sdpa")
    assert describe(model) == "sdpa (not opr_sdpa)"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the CUDA paths (flash_attn / torch varlen kernels) need a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("path", [FLASH_ATTN, TORCH_VARLEN, PADDED])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cuda_paths_equal_the_loop_and_do_not_sync(path, kv_heads):
    device = torch.device("cuda")
    flash, varlen = kernels_available(device)
    if (path == FLASH_ATTN and not flash) or (path == TORCH_VARLEN and not varlen):
        pytest.skip(f"{path} is not available on this GPU / install")
    lengths = [37, 5, 1, 64, 20]
    results = []
    for p in (LOOP, path):
        q, k, v, cu = _qkv(lengths, kv_heads, dtype=torch.bfloat16, device=device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if p != LOOP else "default")
        try:
            out = packed_attention(p, q, k, v, cu, max(lengths), scaling=0.3)
            out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append((out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)
