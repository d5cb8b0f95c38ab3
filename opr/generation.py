"""Batched generation shared by evaluation, OPR rollouts and the on-policy baselines.

Prompts are sorted by length and cut into batches (left padding, KV cache), so that a batch wastes little
compute on padding; results come back in the caller's order. The decode loop is our own (not
``model.generate``): a row ends at the first of the model's EOS ids (``generation_config.eos_token_id``, one
id or a list, and the tokenizer's EOS: :attr:`opr.backbones.Backbone.eos_ids`), finished rows leave the
batch, a prompt's samples share one prefill, and each
(prompt, sample) row samples from its own seeded generator; greedy outputs equal ``model.generate``'s. Each generation carries the mean log-probability
of its tokens (under the sampling distribution), which OPR's ``score=confidence`` variant ranks by.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from opr.backbones import Backbone, eos_ids, keep_last
from opr.backbones import encode_prompts as encode_prompt_ids
from opr.distributed import Ranks, share_batches


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
    """One completion: its text (special tokens stripped), its token count (EOS excluded), the mean
    log-probability of its tokens under the processed sampling distribution, and the sampled token ids
    (EOS excluded). ``token_ids`` is what on-policy training replays: decoding and re-encoding the text can
    give other ids (SmolLM2's sampled "j" + "oy" re-encodes as one token "joy")."""

    text: str
    num_tokens: int
    mean_logprob: float
    token_ids: tuple[int, ...] = ()


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


def length_sorted_batches(lengths: Sequence[int], batch_size: int,
                          token_limits: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first; with ``token_limits`` (one per index),
    grouped by token limit first (largest first), so that a batch's rows mostly share one limit and a batch
    of short-limit rows does not run as long as a long-limit row in it.

    >>> length_sorted_batches([3, 9, 1, 7], 2)
    [[1, 3], [0, 2]]
    >>> length_sorted_batches([3, 9, 1, 7], 2, token_limits=[32, 12, 32, 12])
    [[0, 2], [1, 3]]
    """
    limit = token_limits if token_limits is not None else [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-limit[i], -lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]



def process_logits(logits: torch.Tensor, temperature: float, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """The sampling distribution's logits: divided by ``temperature``, then top-p (nucleus) filtered.

    logits [B, V] -> [B, V] float32; filtered tokens get ``-inf``. ``temperature == 0`` (greedy) returns the
    logits unchanged. Reproduces transformers' ``TemperatureLogitsWarper`` + ``TopPLogitsWarper`` (which sort
    the whole vocabulary ascending and drop the tokens whose cumulative probability is <= 1 - top_p, always
    keeping the most likely one): a token is kept iff the tokens more likely than it hold < top_p of the
    mass. When the ``candidates`` most likely tokens of every row already hold >= top_p, the nucleus lies
    among them and only they are sorted (``topk``); otherwise the whole vocabulary is.
    """
    logits = logits.float()
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    k = min(candidates, logits.shape[-1])
    top_probs, top_idx = probs.topk(k, dim=-1)  # descending
    keep.scatter_(-1, top_idx, _nucleus(top_probs, top_p))
    if k < logits.shape[-1]:
        # Rows whose k most likely tokens hold < top_p (flat rows, common at temperature 1 with a small
        # model): their nucleus may be wider, so only these rows are sorted over the whole vocabulary.
        flat = (top_probs.sum(-1) < top_p + 1e-6).nonzero().squeeze(1)
        if flat.numel():
            sorted_probs, sorted_idx = probs[flat].sort(dim=-1, descending=True)
            keep[flat] = torch.zeros_like(sorted_probs, dtype=torch.bool).scatter_(
                -1, sorted_idx, _nucleus(sorted_probs, top_p))
    return logits.masked_fill(~keep, float("-inf"))


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, K] probabilities in descending order -> [B, K] bool: the token is in the nucleus, i.e. the tokens
    more likely than it hold < ``top_p`` of the mass (the most likely token always is)."""
    above = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = above < top_p
    keep[..., 0] = True
    return keep


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one (prompt, sample) row's private generator: a function of these three numbers only, so
    a row samples the same tokens whatever batch, batch order or batch size it lands in."""
    return ((seed * 1_000_003 + prompt_index) * 1_000_033 + sample_index) % (2**63 - 1)


def sample_tokens(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row drawn from ``probs`` [B, V] with row r's own generator -> [B] long.

    Uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from ``probs`` and lets
    each row consume its own random stream.
    """
    noise = torch.empty_like(probs)
    for r, g in enumerate(generators):
        noise[r].exponential_(generator=g)
    # A draw of exactly 0 would make 0/0 = NaN for a filtered token, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def check_token_limits(max_new_tokens: Sequence[int], num_prompts: int, sampling: SamplingConfig) -> None:
    """Per-prompt token limits must be one per prompt, each in [1, ``sampling.max_new_tokens``]."""
    if len(max_new_tokens) != num_prompts:
        raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {num_prompts} prompts")
    bad = [m for m in max_new_tokens if not 1 <= m <= sampling.max_new_tokens]
    if bad:
        raise ValueError(f"a prompt's max_new_tokens must be in [1, {sampling.max_new_tokens}] (the sampling "
                         f"config's), got {bad[0]}")


def _left_padded(encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, W], attention mask [B, W]) with padding on the left."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):  # left padding: the answer starts at the same column for all
        ids[row, width - len(e) :] = torch.tensor(list(e), dtype=torch.long)
        mask[row, width - len(e) :] = 1
    return ids, mask


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache: ``cache`` where transformers has it
    (5.25 renamed ``past_key_values`` and warns on the old name, which 5.40 removes), ``past_key_values`` in
    the releases before the rename."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def builds_own_decode_mask(model: torch.nn.Module) -> bool:
    """Whether :func:`decode_batch` may hand the model its one-token steps' attention mask ready-made ([B, 1, 1, K]
    bool, what transformers' ``sdpa_mask`` builds for a one-token query): the model runs ``sdpa`` or ``opr_sdpa``
    with full attention in every layer (no sliding window, whose mask a ready-made one would skip). Given the
    [B, K] padding mask instead, transformers reads it back to the host at every step (``padding_mask.all()``,
    to skip an all-ones mask)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "opr_sdpa"):
        return False
    if getattr(config, "sliding_window", None) is not None:
        return False
    return all(t == "full_attention" for t in (getattr(config, "layer_types", None) or []))


# On a GPU, finished rows are looked for every this many steps (one host sync each time); on the CPU at every
# step, where a sync costs nothing and dropping rows at once saves compute.
DONE_CHECK_EVERY = 8


def decode_batch(
    model: torch.nn.Module,
    encoded: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    eos_id: int | Sequence[int],
    pad_id: int,
    generators: Optional[Sequence[torch.Generator]] = None,
    max_new_tokens: Optional[Sequence[int]] = None,
    check_every: Optional[int] = None,
) -> list[tuple[list[int], float]]:
    """Decode ``sampling.num_samples`` completions of each prompt of one batch; returns per row (prompt i's
    samples at rows i*S .. i*S+S-1) the new tokens up to, not including, the first EOS, and their mean
    log-probability. ``eos_id``: one id or several (:attr:`opr.backbones.Backbone.eos_ids`); a row stops at the
    first token that is any of them, as ``model.generate`` does with a list in ``generation_config``.

    The prompts go through the model once (prefill, logits of the last position only); the KV cache is then
    repeated for the S samples of each prompt (``model.generate`` instead repeats the prompts, paying S
    prefills).
    Rows that finish (EOS, or ``max_new_tokens`` reached) leave the batch: their KV cache rows, mask rows and
    generators are dropped, so later steps compute only the rows still running. Finished rows are looked
    for every ``check_every`` steps (default: every step on the CPU, every :data:`DONE_CHECK_EVERY` steps on
    a GPU, where each look is a host sync; a finished row decodes on until then and what it wrote after
    its end is discarded). The chosen tokens and their log-probabilities stay on the device until the end,
    so a greedy step or a sampled one without top-p has no other host sync (top-p < 1 asks once per step
    whether some row's nucleus is wider than its 1024 candidates: :func:`process_logits`).
    The one-token steps pass no attention mask while no running row has padding, and else the mask ready-made
    (:func:`builds_own_decode_mask`; the mask transformers would build), so transformers reads nothing back
    per step either. Decoding goes
    one token per step with the KV cache; position ids count non-pad tokens, as in transformers' ``generate`` (which makes
    greedy outputs the same as ``model.generate``'s). ``generators`` (one per row) are required when
    ``sampling.temperature > 0``. The mean log-probability covers the tokens before EOS (the EOS token's
    own when the completion is empty), under the processed distribution (temperature, top-p).
    ``max_new_tokens`` (one per prompt, each <= ``sampling.max_new_tokens``) gives each prompt its own token
    limit (one batch can then hold several tasks' prompts); a row at its limit leaves the batch like a row
    that wrote EOS.
    """
    device = next(model.parameters()).device
    sample = sampling.temperature > 0
    S = sampling.num_samples
    if sample and (generators is None or len(generators) != len(encoded) * S):
        raise ValueError(f"sampling needs one generator per row: {len(encoded) * S} rows, got "
                         f"{None if generators is None else len(generators)}")
    if max_new_tokens is not None:
        check_token_limits(max_new_tokens, len(encoded), sampling)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else DONE_CHECK_EVERY
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    stops = [eos_id] if isinstance(eos_id, int) else [int(e) for e in eos_id]
    if not stops:
        raise ValueError("decode_batch needs at least one EOS id")
    eos = torch.tensor(stops, dtype=torch.long, device=device)
    ids, mask = _left_padded(encoded, pad_id)
    own_mask = builds_own_decode_mask(model)
    prompt_lengths = [len(e) for e in encoded for _ in range(S)]  # per output row
    padded = min(prompt_lengths) < ids.shape[1]  # some running row has padding on its left
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_kw = {cache_keyword(model): cache}
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1, **cache_kw,
    ).logits[:, -1, :]
    if S > 1:  # one prefill per prompt, shared by its samples
        cache.batch_repeat_interleave(S)
        logits, mask, position = (x.repeat_interleave(S, dim=0) for x in (logits, mask, position))
    n = len(encoded) * S
    steps = sampling.max_new_tokens if max_new_tokens is None else max(max_new_tokens)
    row_limits = [steps] * n if max_new_tokens is None else [m for m in max_new_tokens for _ in range(S)]
    # What each output row chose at each step, kept on the device (-1: the row had left the batch).
    chosen_ids = torch.full((n, steps), -1, dtype=torch.long, device=device)
    chosen_lps = torch.zeros((n, steps), dtype=torch.float32, device=device)
    active = torch.arange(n, device=device)  # batch row -> output row
    rows = list(range(n))  # the same, on the host
    gens = list(generators) if sample else []
    next_pos = position[:, -1] + 1
    limit = None  # per batch row: its prompt's token limit (None: all rows share sampling.max_new_tokens)
    if max_new_tokens is not None and len(set(max_new_tokens)) > 1:
        limit = torch.tensor(list(max_new_tokens), device=device).repeat_interleave(S)
    ended = torch.zeros(n, dtype=torch.bool, device=device)  # per batch row: wrote EOS at an earlier step
    for step in range(steps):
        processed = process_logits(logits, sampling.temperature, sampling.top_p)
        logp = processed.log_softmax(dim=-1)
        if sample:
            chosen = sample_tokens(logp.exp(), gens)
        else:
            chosen = processed.argmax(dim=-1)
        chosen_ids[active, step] = chosen
        chosen_lps[active, step] = logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).float()
        if step == steps - 1:
            break
        ended = ended | torch.isin(chosen, eos)
        if (step + 1) % check_every == 0:
            done = ended if limit is None else ended | (limit <= step + 1)
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                kept = keep.tolist()
                if not kept:
                    break
                rows = [rows[i] for i in kept]
                padded = min(prompt_lengths[r] for r in rows) < ids.shape[1]
                cache.batch_select_indices(keep)
                mask, active, chosen, next_pos, ended = (x[keep] for x in (mask, active, chosen, next_pos, ended))
                if limit is not None:
                    limit = limit[keep]
                if sample:
                    gens = [gens[i] for i in kept]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        step_mask = mask
        if own_mask:  # what transformers builds from ``mask``, without reading ``mask`` back to the host
            step_mask = mask.bool()[:, None, None, :] if padded else None
        logits = model(
            input_ids=chosen.unsqueeze(1), attention_mask=step_mask, position_ids=next_pos.unsqueeze(1),
            use_cache=True, **cache_kw,
        ).logits[:, -1, :]
        next_pos = next_pos + 1
    out = []
    stop_set = set(stops)
    for row, (row_ids, row_lps) in enumerate(zip(chosen_ids.tolist(), chosen_lps.tolist())):
        tokens: list[int] = []
        lp_sum, lp_eos = 0.0, 0.0
        for t, lp in zip(row_ids[: row_limits[row]], row_lps):
            if t < 0:
                break
            if t in stop_set:
                lp_eos = lp
                break
            tokens.append(t)
            lp_sum += lp
        k = len(tokens)
        out.append((tokens, lp_sum / k if k else lp_eos))
    return out


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    seed: int = 0,
    compute_dtype: str = "float32",
    desc: Optional[str] = None,
    max_prompt_tokens: Optional[int] = None,
    prompt_indices: Optional[Sequence[int]] = None,
    ranks: Optional[Ranks] = None,
    share_counts: Optional[list[int]] = None,
) -> list[list[Generation]]:
    """Generate ``sampling.num_samples`` completions for each already-formatted prompt.

    Returns one list per prompt, in the order of ``prompts``. ``max_prompt_tokens`` cuts longer prompts on
    the left. Special tokens are stripped from the text and surrounding whitespace is kept as the model
    wrote it (metrics decide how to normalise).

    Prompts are length-sorted into batches of ``sampling.batch_size`` prompts (each decoded into
    ``num_samples`` rows after one shared prefill) by :func:`decode_batch`, which drops finished rows. Greedy outputs
    equal ``model.generate``'s. Sampling: row (prompt i, sample s) draws from its own generator seeded by
    ``row_seed(seed, i, s)``, so its tokens depend on the seed, the prompt's position in ``prompts`` and the
    sample index, not on the batch size or on which prompts share its batch (up to float rounding in the
    batched logits, which can flip a near-tie rarely). The global torch RNG is not touched.
    ``prompt_indices`` (one per prompt) replaces the position ``i`` in those seeds: a caller that generates a
    part of a longer prompt list (one rank's share of a rollout batch) passes the prompts' positions in that
    list, and they sample as they would in it. ``ranks`` and ``share_counts``: the prompts are shared across
    the ranks (:func:`generate_encoded`).
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
    if not prompts:
        return []
    encoded = encode_prompts(backbone, prompts, max_prompt_tokens)
    return generate_encoded(backbone, encoded, sampling, seed=seed, compute_dtype=compute_dtype, desc=desc,
                            prompt_indices=prompt_indices, ranks=ranks, share_counts=share_counts)


def encode_prompts(backbone: Backbone, prompts: Sequence[str], max_prompt_tokens: Optional[int] = None
                   ) -> list[list[int]]:
    """Already-formatted prompts -> their token ids as :func:`generate` feeds them to the model
    (:func:`opr.backbones.encode_prompts`: the family's BOS where it expects one, no other special token
    added; longer than ``max_prompt_tokens``: cut on the left, where the instruction is and not the
    answer cue, keeping a leading BOS, as in training). A prompt that encodes to no token is an error."""
    encoded = encode_prompt_ids(backbone.tokenizer, prompts)
    if max_prompt_tokens:
        encoded = [keep_last(backbone.tokenizer, e, max_prompt_tokens) for e in encoded]
    empty = [i for i, e in enumerate(encoded) if not e]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no tokens: {prompts[empty[0]]!r}")
    return encoded


@torch.no_grad()
def generate_encoded(
    backbone: Backbone,
    encoded: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    seed: int = 0,
    compute_dtype: str = "float32",
    desc: Optional[str] = None,
    prompt_indices: Optional[Sequence[int]] = None,
    max_new_tokens: Optional[Sequence[int]] = None,
    ranks: Optional[Ranks] = None,
    share_counts: Optional[list[int]] = None,
) -> list[list[Generation]]:
    """:func:`generate` on prompts already encoded (:func:`encode_prompts`): a caller that generates for the
    same prompts many times (evaluation, at every row) encodes them once. ``max_new_tokens`` (one per prompt,
    each at most ``sampling.max_new_tokens``) gives each prompt its own token limit, so that prompts of tasks
    with different limits share one length-sorted pass.

    ``ranks`` (the trainer, on every rank together): the length-sorted batches are formed as on one process
    and dealt out whole across the ranks (:func:`opr.distributed.share_batches`, by rows x tokens); each rank
    decodes its batches and every rank gets all generations in prompt order. A batch is decoded exactly as
    one process decodes it (same rows, same padding, same per-row generators), so the answers are the
    single-process answers. ``share_counts`` (a list) receives the number of prompts each rank decoded.
    With ``backbone.generation_backend`` (``rollout.backend=vllm``) each rank sends the prompts of its batches
    to its own engine in one call, seeded by their positions in ``encoded`` (or ``prompt_indices``), and the
    results are gathered the same way."""
    if prompt_indices is not None and len(prompt_indices) != len(encoded):
        raise ValueError(f"prompt_indices has {len(prompt_indices)} entries for {len(encoded)} prompts")
    if max_new_tokens is not None:
        check_token_limits(max_new_tokens, len(encoded), sampling)
    if not encoded:
        return []
    model, tok = backbone.model, backbone.tokenizer
    world = 1 if ranks is None else ranks.world_size
    batches = length_sorted_batches([len(e) for e in encoded], sampling.batch_size, max_new_tokens)
    shares = [list(range(len(batches)))]
    if world > 1:
        limit_of = (lambda i: sampling.max_new_tokens) if max_new_tokens is None else (lambda i: max_new_tokens[i])
        costs = [len(b) * (max(len(encoded[i]) for i in b) + max(limit_of(i) for i in b)) for b in batches]
        shares = share_batches(costs, world)
    if share_counts is not None:
        share_counts[:] = [sum(len(batches[b]) for b in share) for share in shares]
    mine = [batches[b] for b in shares[0 if world == 1 else ranks.rank]]
    index = range(len(encoded)) if prompt_indices is None else [int(k) for k in prompt_indices]  # the seeds' i
    if backbone.generation_backend is not None:  # rollout.backend=vllm: this rank's share in one engine call
        return _gathered(_backend_share(backbone, encoded, sampling, seed, index, max_new_tokens, mine), mine, ranks)
    results: list[list[Generation]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sample = sampling.temperature > 0
    S = sampling.num_samples
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = eos_ids(model, tok)  # every id the model's authors stop at (generation_config's and the tokenizer's)
    try:
        for batch in tqdm(mine, desc=desc or "generate", leave=False, disable=desc is False):
            rows = [(i, s) for i in batch for s in range(S)]
            gens = None
            if sample:
                gens = [torch.Generator(device=device).manual_seed(row_seed(seed, index[i], s)) for i, s in rows]
            with autocast(compute_dtype):
                limits = None if max_new_tokens is None else [max_new_tokens[i] for i in batch]
                decoded = decode_batch(model, [encoded[i] for i in batch], sampling, stops, pad_id, gens,
                                       max_new_tokens=limits)
            for (i, _), (new, mean_lp) in zip(rows, decoded):
                text = tok.decode(new, skip_special_tokens=True)
                results[i].append(Generation(text=text, num_tokens=len(new), mean_logprob=float(mean_lp),
                                              token_ids=tuple(int(t) for t in new)))
    finally:
        model.train(was_training)
    return _gathered(results, mine, ranks)


def _gathered(results: list[list[Generation]], mine: Sequence[Sequence[int]],
              ranks: Optional[Ranks]) -> list[list[Generation]]:
    """``results`` (one list per prompt, filled for the prompts of this rank's batches ``mine``) completed with
    every other rank's, in prompt order (``results`` itself on one process)."""
    if ranks is not None and ranks.world_size > 1:
        for part in ranks.all_gather({i: results[i] for batch in mine for i in batch}):
            for i, gens in part.items():
                results[i] = gens
    return results


def _backend_share(backbone: Backbone, encoded: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int,
                   index: Sequence[int], max_new_tokens: Optional[Sequence[int]],
                   mine: Sequence[Sequence[int]]) -> list[list[Generation]]:
    """This rank's prompts (those of its batches ``mine``, in prompt order) generated in one call of
    ``backbone.generation_backend`` (:class:`opr.generation_vllm.VLLMBackend`), each seeded by its position
    ``index[i]`` in the whole list; -> one list per prompt of ``encoded``, empty for the other ranks' prompts.
    The backend is called also with an empty share: its first call builds the engine, which every rank of a
    process group does together."""
    own = sorted(i for batch in mine for i in batch)
    kwargs = {"prompt_indices": [index[i] for i in own]}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = [max_new_tokens[i] for i in own]
    out = backbone.generation_backend.generate(backbone, [encoded[i] for i in own], sampling, seed, **kwargs)
    results: list[list[Generation]] = [[] for _ in encoded]
    for i, gens in zip(own, out):
        results[i] = gens
    return results
