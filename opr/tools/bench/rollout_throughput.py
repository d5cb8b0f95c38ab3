"""Rollout throughput: this project's ``generate`` against two ways of calling ``model.generate``.

Run (SmolLM2-135M on CPU; ~minutes at the defaults)::

    python -m opr.tools.bench.rollout_throughput --prompts 64 --max-new-tokens 32 --batch-size 32 --out rollout.json
    python -m opr.tools.bench.rollout_throughput --temperature 0 --dtype bfloat16   # greedy, bf16 autocast everywhere

Every variant gets the same prompts (a fixed round-robin mix of the seven mini_trace tasks' eval prompts,
chat-formatted), the same sampling settings (temperature, top-p, samples per prompt) and the same
``max_new_tokens`` and the same compute dtype (``--dtype``; bfloat16 = autocast, as ``engine.compute_dtype``):

- ``opr``: :func:`opr.generation.generate` (length-sorted batches, left padding, KV cache, finished rows
  leave the batch);
- ``hf_per_prompt``: one ``model.generate`` call per prompt (no padding, no batching across prompts);
- ``hf_unsorted``: ``model.generate`` on fixed-size batches in input order (left padding);
- ``hf_sorted``: ``model.generate`` on the same length-sorted batches as ``opr`` (this project's previous
  implementation: isolates what dropping finished rows gains).

Generated tokens are the tokens before EOS (what a caller gets); tokens/s = generated tokens / wall time.
Greedy runs also report how many of ``opr``'s completions are identical to the per-prompt loop's
(``same_text_as_hf_per_prompt``): batching changes float rounding, which can flip a near-tie.

Where the time goes: when ``opr`` runs, the same prompts are also generated with ``max_new_tokens=1`` (the
prefill plus one step) and the table's footer gives that time's share of ``opr``'s. Every variant pays the
same prefill, so ``hf_per_prompt`` seconds / prefill seconds bounds the speed-up any decode loop can reach
over the per-prompt loop on this machine (reported as ``x_bound_if_decoding_were_free``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

import torch

from opr.backbones import Backbone
from opr.generation import SamplingConfig, autocast, generate, length_sorted_batches
from opr.tools.bench.common import (
    DTYPES,
    formatted_prompts,
    load_mini_trace_all,
    machine_info,
    mixed_examples,
    peak_rss_mb,
    table,
    write_json,
)


def _new_tokens(sequences: torch.Tensor, width: int, eos_id: int) -> list[list[int]]:
    """The tokens before the first EOS in each row of ``sequences[:, width:]`` [B, T] -> B token lists."""
    out = []
    for row in sequences[:, width:].tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def hf_batches(
    backbone: Backbone, prompts: Sequence[str], batches: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int,
    dtype: str = "float32",
) -> list[tuple[str, int]]:
    """``model.generate`` on the given batches of prompt indices (left padding): (text, token count) of each
    completion in batch order (``num_samples`` per prompt), special tokens stripped from the text."""
    model, tok = backbone.model, backbone.tokenizer
    torch.manual_seed(seed)
    kwargs = dict(do_sample=sampling.temperature > 0)
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    outs: list[tuple[str, int]] = []
    with torch.no_grad(), autocast(dtype):
        for batch in batches:
            enc = tok([prompts[i] for i in batch], add_special_tokens=False, return_tensors="pt",
                      padding=True).to(model.device)
            assert tok.padding_side == "left"
            out = model.generate(
                **enc, max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.num_samples,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs,
            )
            new = _new_tokens(out, enc["input_ids"].shape[1], tok.eos_token_id)
            outs += [(text, len(ids)) for text, ids in zip(tok.batch_decode(new, skip_special_tokens=True), new)]
    return outs


def run(args: argparse.Namespace) -> dict:
    from opr.backbones import load_smollm2_135m, load_smollm2_135m_random, load_tiny

    torch.set_num_threads(args.threads) if args.threads else None
    t0 = time.perf_counter()
    loaders = {"smollm2_135m": load_smollm2_135m, "smollm2_135m_random": load_smollm2_135m_random,
               "tiny": load_tiny}
    bb = loaders[args.backbone]()
    bb.model.to("cuda" if torch.cuda.is_available() else "cpu")  # as the trainer places it (engine.device=auto)
    load_s = time.perf_counter() - t0
    bb.model.eval()
    bench = load_mini_trace_all(max(1, -(-args.prompts // 7)))
    prompts = formatted_prompts(bb, mixed_examples(bench.tasks, args.prompts))
    lengths = [len(bb.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              num_samples=args.num_samples, batch_size=args.batch_size)
    n = len(prompts)
    variants = {
        "opr": lambda: [(g.text, g.num_tokens) for gens in generate(
            bb, prompts, sampling, seed=args.seed, compute_dtype=args.dtype, desc=False) for g in gens],
        "hf_per_prompt": lambda: hf_batches(bb, prompts, [[i] for i in range(n)], sampling, args.seed, args.dtype),
        "hf_unsorted": lambda: hf_batches(
            bb, prompts, [list(range(i, min(n, i + args.batch_size))) for i in range(0, n, args.batch_size)],
            sampling, args.seed, args.dtype),
        "hf_sorted": lambda: hf_batches(bb, prompts, length_sorted_batches(lengths, args.batch_size), sampling,
                                        args.seed, args.dtype),
    }
    chosen = args.variants or list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; allowed: {', '.join(variants)}")
    rows = []
    texts: dict[str, list[str]] = {}
    for name in chosen:
        t = time.perf_counter()
        outs = variants[name]()
        sec = time.perf_counter() - t
        texts[name] = [text for text, _ in outs]
        counts = [c for _, c in outs]
        rows.append({"variant": name, "seconds": sec, "generated_tokens": sum(counts),
                     "tokens_per_s": sum(counts) / sec, "sequences": len(counts),
                     "mean_len": sum(counts) / len(counts), "hit_limit": sum(c == args.max_new_tokens for c in counts)})
    if args.temperature == 0 and "opr" in texts and "hf_per_prompt" in texts:  # both in prompt order
        same = sum(a == b for a, b in zip(texts["opr"], texts["hf_per_prompt"]))
        next(r for r in rows if r["variant"] == "opr")["same_text_as_hf_per_prompt"] = f"{same}/{n}"
    split = {}
    if "opr" in chosen:
        t = time.perf_counter()
        generate(bb, prompts, dataclasses.replace(sampling, max_new_tokens=1), seed=args.seed,
                 compute_dtype=args.dtype, desc=False)
        prefill = time.perf_counter() - t
        opr_s = next(r["seconds"] for r in rows if r["variant"] == "opr")
        split = {"prefill_plus_one_step_s": prefill, "prefill_share_of_opr": prefill / opr_s}
        per_prompt = [r["seconds"] for r in rows if r["variant"] == "hf_per_prompt"]
        if per_prompt:
            split["x_bound_if_decoding_were_free"] = per_prompt[0] / prefill
    ref = {r["variant"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        for base in ("hf_per_prompt", "hf_unsorted"):
            if base in ref:
                r[f"x_{base}"] = r["tokens_per_s"] / ref[base]
    payload = {
        "benchmark": "rollout_throughput", "backbone": args.backbone, "model_load_s": load_s,
        "settings": {"prompts": n, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "temperature": args.temperature, "top_p": args.top_p, "num_samples": args.num_samples,
                     "seed": args.seed, "prompt_tokens_mean": sum(lengths) / n, "prompt_tokens_min": min(lengths),
                     "prompt_tokens_max": max(lengths)},
        "machine": machine_info(), "peak_rss_mb": peak_rss_mb(), "results": rows, "time_split": split,
    }
    print(table(rows))
    if split:
        bound = split.get("x_bound_if_decoding_were_free")
        print(f"opr: prefill (+1 step) {split['prefill_plus_one_step_s']:.1f} s = {split['prefill_share_of_opr']:.0%} of "
              f"its time" + (f"; bound over hf_per_prompt if decoding cost nothing: {bound:.2f}x" if bound else ""))
    print(f"load average {payload['machine']['load_average']}  prompt tokens {min(lengths)}..{max(lengths)}")
    write_json(args.out, payload)
    return payload


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (the OPR default is 1.0)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", choices=["smollm2_135m", "smollm2_135m_random", "tiny"], default="smollm2_135m")
    p.add_argument("--variants", nargs="*", help="subset of: opr hf_per_prompt hf_unsorted hf_sorted")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype of every variant (bfloat16: autocast, as engine.compute_dtype=bfloat16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", help="write the results as JSON here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
