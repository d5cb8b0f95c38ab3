"""Attention over padding-free (packed) batches at the cost of its sequences, not of the whole row.

A packed row holds S sequences back to back (:mod:`opr.losses.sft`). transformers' ``sdpa`` path turns the
restarting ``position_ids`` into a block-diagonal [N, N] mask, so every layer computes (and differentiates)
attention over all N² query-key pairs and then masks most of them away; with 8 sequences of ~64 tokens that
is ~8× the work that counts. ``opr_sdpa`` is ``sdpa`` plus one case: when the caller passes the sequence
boundaries (``cu_seq_lens_q``, the keyword transformers' flash-attention path uses for the same purpose),
each sequence's attention is computed alone. Every other call (generation with a KV cache, padded
evaluation batches) goes to transformers' ``sdpa`` unchanged.

How a packed call is computed depends on the device (:func:`select_packed_path`):

- ``per_sequence_loop`` (CPU): one ``scaled_dot_product_attention(is_causal=True)`` per sequence, the
  boundaries read on the host (``cu_seq_lens_q.tolist()`` in every layer: free on the CPU, where torch has
  no variable-length attention kernel and transformers offers none for ``sdpa``).
- On CUDA no path reads a tensor back to the host, so a layer does not wait for the GPU:
  ``flash_attn_varlen`` (the ``flash_attn`` package's ``flash_attn_varlen_func``, the kernel of transformers'
  ``flash_attention_2`` for packed rows) when ``flash_attn`` imports and q/k/v are fp16/bf16 on an sm80+
  GPU; else ``torch_varlen`` (torch's own ``torch.nn.attention.varlen.varlen_attn``, same conditions, no
  dropout); else ``padded_batch`` (:func:`padded_attention`: the sequences gathered into an [S, L] batch
  with a causal, length mask, L the longest sequence; any dtype, any device).
  These paths need ``max_length_q`` (the longest sequence as a Python int, which
  :func:`opr.losses.sft.target_logits` passes) and trust the boundaries (checking them would read them).

The CUDA paths have never run on a GPU: ``padded_batch`` is tested on the CPU against the loop and against
unpacked forward passes; the two kernels' value tests are marked to run only where CUDA is available.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

NAME = "opr_sdpa"
LOOP, FLASH_ATTN, TORCH_VARLEN, PADDED = "per_sequence_loop", "flash_attn_varlen", "torch_varlen", "padded_batch"
PATHS = (LOOP, FLASH_ATTN, TORCH_VARLEN, PADDED)
_registered = False


def select_packed_path(device_type: str, dtype: torch.dtype, dropout: float, flash_attn: bool,
                       torch_varlen: bool) -> str:
    """Which computation a packed call gets (one of :data:`PATHS`). ``flash_attn`` / ``torch_varlen``: whether
    that kernel can run on this device (:func:`kernels_available`). Off CUDA: the per-sequence loop. On CUDA:
    a varlen kernel for fp16/bf16 (``flash_attn`` first; torch's has no dropout), else the padded batch.

    >>> select_packed_path("cpu", torch.bfloat16, 0.0, True, True)
    'per_sequence_loop'
    >>> select_packed_path("cuda", torch.float32, 0.0, True, True)
    'padded_batch'
    """
    if device_type != "cuda":
        return LOOP
    half = dtype in (torch.float16, torch.bfloat16)
    if half and flash_attn:
        return FLASH_ATTN
    if half and torch_varlen and dropout == 0:
        return TORCH_VARLEN
    return PADDED


@functools.cache
def kernels_available(device: torch.device) -> tuple[bool, bool]:
    """(``flash_attn`` imports, ``torch.nn.attention.varlen`` exists), each only for a CUDA device of compute
    capability >= 8.0 (both are FlashAttention-2 kernels). Asked once per device (no tensor is read)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False, False
    try:
        import flash_attn  # noqa: F401

        has_flash = True
    except ImportError:
        has_flash = False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        has_varlen = True
    except ImportError:
        has_varlen = False
    return has_flash, has_varlen


def path_for(device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str:
    """:func:`select_packed_path` for q/k/v of this device and dtype."""
    return select_packed_path(device.type, dtype, dropout, *kernels_available(device))


def loop_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                   dropout: float = 0.0, scaling: Optional[float] = None) -> torch.Tensor:
    """One causal ``scaled_dot_product_attention`` per sequence. query [1, H, N, D], key/value [1, H_kv, N, D]
    (H a multiple of H_kv), ``cu_seq_lens`` [S+1] (0, l_1, l_1+l_2, ..., N), read on the host -> [1, H, N, D]."""
    bounds = cu_seq_lens.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q must run from 0 to the row length {query.shape[2]}, got {bounds}")
    gqa = query.shape[1] != key.shape[1]
    return torch.cat([
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for a, b in zip(bounds[:-1], bounds[1:])
    ], dim=2)


def padded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                     max_length: int, dropout: float = 0.0, scaling: Optional[float] = None) -> torch.Tensor:
    """The packed row's sequences gathered into a batch, with no host sync. query [1, H, N, D], key/value
    [1, H_kv, N, D], ``cu_seq_lens`` [S+1] on the same device, ``max_length`` L >= the longest sequence
    (a Python int) -> [1, H, N, D].

    Token j of sequence s sits at [s, :, j] of an [S, H, L, D] batch (slots past a sequence's end hold a
    copy of the row's last token); one ``scaled_dot_product_attention`` with the mask "key j' <= query j and
    key j' inside the sequence" computes every sequence, at S·L² pairs instead of N², and each token's row
    is gathered back. Padded query slots always see their sequence's first key, so no row of the mask is
    empty (no NaN, in values or gradients)."""
    n, device = query.shape[2], query.device
    cu = cu_seq_lens.to(device=device, dtype=torch.long)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]  # [S]
    j = torch.arange(max_length, device=device)  # [L]
    inside = j < lengths[:, None]  # [S, L]
    slot = (starts[:, None] + j).clamp(max=n - 1).flatten()  # [S*L] row position of each batch slot
    s, length = cu.shape[0] - 1, max_length

    def gather(x: torch.Tensor) -> torch.Tensor:  # [1, h, N, D] -> [S, h, L, D]
        return x[0].index_select(1, slot).unflatten(1, (s, length)).transpose(0, 1)

    mask = (j[:, None] >= j)[None, None] & inside[:, None, None, :]  # [S, 1, L, L]
    out = F.scaled_dot_product_attention(gather(query), gather(key), gather(value), attn_mask=mask,
                                         dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    t = torch.arange(n, device=device)
    seq = torch.bucketize(t, cu[1:], right=True)  # [N] the sequence of each token
    return out[seq, :, t - starts[seq]].transpose(0, 1).unsqueeze(0)  # [N, H, D] -> [1, H, N, D]


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                     max_length: int, dropout: float, scaling: Optional[float], kernel: str) -> torch.Tensor:
    """A FlashAttention-2 variable-length kernel on CUDA (``kernel``: :data:`FLASH_ATTN` or
    :data:`TORCH_VARLEN`), causal within each sequence. query [1, H, N, D], key/value [1, H_kv, N, D] fp16/bf16,
    ``cu_seq_lens`` [S+1], ``max_length`` the longest sequence (an int) -> [1, H, N, D]."""
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [N, h, D]
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    if kernel == FLASH_ATTN:
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, cu, cu, max_length, max_length, dropout_p=dropout,
                                     softmax_scale=scaling, causal=True)
    elif kernel == TORCH_VARLEN:
        if dropout:
            raise ValueError("torch's varlen_attn has no dropout")
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, cu, cu, max_length, max_length, scale=scaling, window_size=(-1, 0),
                          enable_gqa=q.shape[1] != k.shape[1])
    else:
        raise ValueError(f"unknown varlen kernel {kernel!r}; allowed: {FLASH_ATTN}, {TORCH_VARLEN}")
    return out.transpose(0, 1).unsqueeze(0)


def packed_attention(path: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seq_lens: torch.Tensor, max_length: Optional[int], dropout: float = 0.0,
                     scaling: Optional[float] = None) -> torch.Tensor:
    """One packed row's causal attention by ``path`` (one of :data:`PATHS`). query [1, H, N, D], key/value
    [1, H_kv, N, D], ``cu_seq_lens`` [S+1] -> [1, H, N, D]. Every path but the loop needs ``max_length``."""
    if path == LOOP:
        return loop_attention(query, key, value, cu_seq_lens, dropout, scaling)
    if path not in PATHS:
        raise ValueError(f"unknown packed attention path {path!r}; allowed: {', '.join(PATHS)}")
    if cu_seq_lens.dim() != 1 or cu_seq_lens.shape[0] < 2 or cu_seq_lens.is_floating_point():
        raise ValueError(f"cu_seq_lens_q must be an integer tensor [S+1] with S >= 1, got {cu_seq_lens.dtype} "
                         f"{tuple(cu_seq_lens.shape)}")
    if max_length is None or int(max_length) < 1:
        raise ValueError(f"the {path} path needs max_length_q, the longest sequence as a Python int >= 1 (read "
                         f"once per forward, not in every layer), got {max_length!r}")
    if path == PADDED:
        return padded_attention(query, key, value, cu_seq_lens, int(max_length), dropout, scaling)
    return varlen_attention(query, key, value, cu_seq_lens, int(max_length), dropout, scaling, path)


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    max_length_q: Optional[int] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query [1, H, N, D], key/value [1, H_kv, N, D];
    ``cu_seq_lens_q`` [S+1] the cumulative sequence lengths of the packed row (0, l_1, l_1+l_2, ..., N),
    ``max_length_q`` the longest sequence (an int; needed on CUDA). Returns [1, N, H, D] (the layout
    transformers' attention functions return). The path: :func:`path_for` the query's device and dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    path = path_for(query.device, query.dtype, dropout)
    out = packed_attention(path, query, key, value, cu_seq_lens_q, max_length_q, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``opr_sdpa`` known to transformers (attention function, and ``sdpa``'s mask builder)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a model that runs ``sdpa`` to ``opr_sdpa`` (same results; packed batches cost less). Models on
    another implementation (eager, flash-attention) are left as they are."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        register()
        model.set_attn_implementation(NAME)


def describe(model: torch.nn.Module, compute_dtype: str = "float32") -> str:
    """What a run's packed training batches go through: the :data:`PATHS` entry for the model's device and the
    dtype q/k/v have there (``compute_dtype``, the autocast dtype, when it is fp16/bf16; else the parameters'),
    or ``"<implementation> (not opr_sdpa)"``."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != NAME:
        return f"{impl} (not {NAME})"
    param = next(model.parameters())
    half = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    return path_for(param.device, half.get(compute_dtype, param.dtype))
