"""Batched generation shared by evaluation, OPR rollouts and the on-policy baselines.

Prompts are sorted by length and cut into batches (left padding, KV cache), so that a batch wastes little
compute on padding; results come back in the caller's order. Each generation carries the mean log-probability
of its tokens (under the sampling distribution), which OPR's ``score=confidence`` variant ranks by.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from opr.backbones import Backbone


@dataclass(frozen=True)
class SamplingConfig:
    """How to generate. ``temperature == 0`` means greedy decoding (then ``num_samples`` must be 1)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_samples, batch_size and max_new_tokens must be >= 1: {self}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("greedy decoding (temperature=0) gives identical samples; set num_samples=1")


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    mean_logprob: float


@contextlib.contextmanager
def autocast(dtype: str) -> Iterator[None]:
    """Mixed precision for matmuls on CPU/GPU: ``float32`` (off), ``bfloat16`` or ``float16``.

    Master weights stay in the model's own dtype; only the compute is lowered.
    """
    if dtype in ("float32", "fp32", None):
        yield
        return
    torch_dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in torch_dtype:
        raise ValueError(f"unknown compute dtype {dtype!r}; allowed: float32, bfloat16, float16")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device_type=device_type, dtype=torch_dtype[dtype]):
        yield


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first.

    >>> length_sorted_batches([3, 9, 1, 7], 2)
    [[1, 3], [0, 2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    seed: int = 0,
    compute_dtype: str = "float32",
    desc: Optional[str] = None,
    max_prompt_tokens: Optional[int] = None,
) -> list[list[Generation]]:
    """Generate ``sampling.num_samples`` completions for each already-formatted prompt.

    Returns one list per prompt, in the order of ``prompts``. ``max_prompt_tokens`` cuts longer prompts on
    the left. Special tokens are stripped from the text and
    surrounding whitespace is kept as the model wrote it (metrics decide how to normalise).
    """
    model, tok = backbone.model, backbone.tokenizer
    if not prompts:
        return []
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_tokens:  # over-long prompts lose their start, as in training (the answer cue is at the end)
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    batches = length_sorted_batches([len(e) for e in encoded], sampling.batch_size)
    results: list[list[Generation]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    sample = sampling.temperature > 0
    try:
        for batch in tqdm(batches, desc=desc or "generate", leave=False, disable=desc is False):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: the answer starts at the same column for all
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            # HF generate draws from the global RNG; seed it from our generator so results do not depend on
            # what ran before (evaluation order, other methods).
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            sample_kwargs = dict(temperature=sampling.temperature, top_p=sampling.top_p) if sample else {}
            with autocast(compute_dtype):
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=sampling.max_new_tokens,
                    num_return_sequences=sampling.num_samples,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    do_sample=sample,
                    output_scores=True,
                    return_dict_in_generate=True,
                    **sample_kwargs,
                )
            new = out.sequences[:, width:]
            # Log-probabilities of the chosen tokens under the (temperature / top-p processed) distribution.
            steps = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [B*S, new, V]
            chosen = steps.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [B*S, new]
            for r in range(new.shape[0]):
                tokens = new[r].tolist()
                n = len(tokens)
                if tok.eos_token_id in tokens:
                    n = tokens.index(tok.eos_token_id)
                lp = chosen[r, : max(n, 1)]
                lp = lp[torch.isfinite(lp)]
                text = tok.decode(tokens[:n], skip_special_tokens=True)
                results[batch[r // sampling.num_samples]].append(
                    Generation(text=text, num_tokens=n, mean_logprob=float(lp.mean()) if lp.numel() else 0.0)
                )
    finally:
        model.train(was_training)
    return results
