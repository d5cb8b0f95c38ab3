"""Completion-only SFT loss on padding-free (packed) batches.

A packed batch is one row holding several sequences back to back; ``position_ids`` restart at 0 for each
sequence, which makes the attention block-diagonal (transformers derives the boundaries from the position
ids when no attention mask is given, with the KV cache off). Nothing is spent on pad tokens, and the output
layer is applied only at the positions whose next token is supervised, which saves ~20% of a step on a 49k
vocabulary compared with computing logits everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class PackedBatch:
    """Sequences concatenated in one row.

    input_ids:     [1, N]  token ids of all sequences back to back
    position_ids:  [1, N]  0..len-1 within each sequence
    target_index:  [M]     positions i whose next token ``input_ids[i+1]`` is supervised
    targets:       [M]     the supervised token ids ``input_ids[target_index + 1]``
    seq_of_target: [M]     which sequence (0..S-1) each target belongs to
    num_sequences: S
    cu_seqlens:    [S+1]   int32 sequence boundaries in the row: 0, l_1, l_1+l_2, ..., N
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    target_index: torch.Tensor
    targets: torch.Tensor
    seq_of_target: torch.Tensor
    num_sequences: int
    cu_seqlens: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_targets(self) -> int:
        return int(self.targets.shape[0])

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device), self.position_ids.to(device), self.target_index.to(device),
            self.targets.to(device), self.seq_of_target.to(device), self.num_sequences, self.cu_seqlens.to(device),
        )


def pack(sequences: Sequence[tuple[list[int], list[int]]]) -> PackedBatch:
    """Pack (prompt_ids, response_ids) pairs; only response tokens are supervised (completion-only loss).

    The response should already end with the EOS token so the model learns to stop.
    """
    ids: list[int] = []
    pos: list[int] = []
    bounds = [0]
    tgt_index: list[int] = []
    seq_of: list[int] = []
    for s, (prompt, response) in enumerate(sequences):
        if not response:
            raise ValueError(f"sequence {s} has an empty response: nothing to supervise")
        if not prompt:
            raise ValueError(f"sequence {s} has an empty prompt: the first response token has no context")
        start = len(ids)
        ids.extend(prompt)
        ids.extend(response)
        pos.extend(range(len(prompt) + len(response)))
        # Position start+len(prompt)-1+j predicts response token j.
        first = start + len(prompt) - 1
        tgt_index.extend(range(first, first + len(response)))
        seq_of.extend([s] * len(response))
        bounds.append(len(ids))
    input_ids = torch.tensor([ids], dtype=torch.long)
    index = torch.tensor(tgt_index, dtype=torch.long)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.tensor([pos], dtype=torch.long),
        target_index=index,
        targets=input_ids[0, index + 1],
        seq_of_target=torch.tensor(seq_of, dtype=torch.long),
        num_sequences=len(sequences),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
    )


def target_logits(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Logits at the supervised positions only: [M, V].

    Runs the decoder over the packed row (no cache, no attention mask: transformers derives the boundaries
    from position_ids) and applies the output layer to the M supervised positions. The boundaries also go in
    as ``cu_seq_lens_*``, transformers' variable-length keywords: with ``opr_sdpa`` (:mod:`opr.attention`) or
    flash-attention each sequence's attention is computed alone; other implementations ignore them.
    """
    decoder = model.get_decoder()
    longest = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
    hidden = decoder(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, cu_seq_lens_q=batch.cu_seqlens,
        cu_seq_lens_k=batch.cu_seqlens, max_length_q=longest, max_length_k=longest,
    ).last_hidden_state
    picked = hidden[0, batch.target_index]  # [M, H]
    return model.get_output_embeddings()(picked)  # [M, V]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood. logits [M, V] (any float dtype), targets [M] -> [M] float32."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def sequence_logprobs(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Sum of log-probabilities of each sequence's response tokens: [S]."""
    nll = token_nll(target_logits(model, batch), batch.targets)
    return -torch.zeros(batch.num_sequences, device=nll.device).index_add(0, batch.seq_of_target, nll)
