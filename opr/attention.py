"""Attention over padding-free (packed) batches at the cost of its sequences, not of the whole row.

A packed row holds S sequences back to back (:mod:`opr.losses.sft`). transformers' ``sdpa`` path turns the
restarting ``position_ids`` into a block-diagonal [N, N] mask, so every layer computes (and differentiates)
attention over all N² query-key pairs and then masks most of them away; with 8 sequences of ~64 tokens that
is ~8× the work that counts. ``opr_sdpa`` is ``sdpa`` plus one case: when the caller passes the sequence
boundaries (``cu_seq_lens_q``, the keyword transformers' flash-attention path uses for the same purpose),
each sequence's attention is computed alone with ``is_causal=True``. Every other call (generation with a
KV cache, padded evaluation batches) goes to transformers' ``sdpa`` unchanged. Why by hand: on CPU torch has
no variable-length attention kernel, and transformers offers none for ``sdpa``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NAME = "opr_sdpa"
_registered = False


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query [1, H, N, D], key/value [1, H_kv, N, D];
    ``cu_seq_lens_q`` [S+1] the cumulative sequence lengths of the packed row (0, l_1, l_1+l_2, ..., N).
    Returns [1, N, H, D] (the layout transformers' attention functions return)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu_seq_lens_q.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q must run from 0 to the row length {query.shape[2]}, got {bounds}")
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat([
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for a, b in zip(bounds[:-1], bounds[1:])
    ], dim=2)
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
