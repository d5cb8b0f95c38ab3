"""Packed-row attention, forward + backward, on each path of :mod:`opr.attention` against plain sdpa.

One packed row of S sequences (q/k/v [1, H, N, D]) goes through: the path ``opr_sdpa`` selects on this device
(:func:`opr.attention.path_for`), the per-sequence loop (the CPU path), the padded batch (the sync-free path
CUDA gets without a varlen kernel) and ``sdpa_block_mask`` (one ``scaled_dot_product_attention`` with the
[N, N] block-diagonal causal mask: what transformers' ``sdpa`` computes for a packed row). Each is timed over
``--repeats`` forward + backward passes after ``--warmup`` (on CUDA between ``torch.cuda.synchronize()``
calls), its output and gradients are compared with the loop's, and the selected path's time is printed as a
ratio of the loop's and of sdpa's.

    python -m opr.tools.bench.attention                        # CUDA if torch sees one, else CPU
    python -m opr.tools.bench.attention --device cpu --dtype float32 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from opr.attention import LOOP, PADDED, packed_attention, path_for
from opr.tools.bench.common import machine_info, write_json

SDPA = "sdpa_block_mask"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def block_mask_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """One sdpa over the whole row with the [N, N] block-diagonal causal mask built on the device.
    query [1, H, N, D], key/value [1, H_kv, N, D], ``cu_seq_lens`` [S+1] -> [1, H, N, D]."""
    n = query.shape[2]
    t = torch.arange(n, device=query.device)
    seq = torch.bucketize(t, cu_seq_lens.to(device=query.device, dtype=torch.long)[1:], right=True)
    mask = (seq[:, None] == seq) & (t[:, None] >= t)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def sequence_lengths(num: int, shortest: int, longest: int, seed: int) -> list[int]:
    """``num`` lengths drawn uniformly from [shortest, longest] with a fixed generator."""
    if not 1 <= shortest <= longest or num < 1:
        raise ValueError(f"need num >= 1 and 1 <= shortest <= longest, got {num}, {shortest}, {longest}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(shortest, longest + 1, (num,), generator=g).tolist()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    lengths = sequence_lengths(args.sequences, args.shortest, args.longest, args.seed)
    n, longest, scale = sum(lengths), max(lengths), args.head_dim ** -0.5
    g = torch.Generator().manual_seed(args.seed)
    base = [torch.randn(1, h, n, args.head_dim, generator=g) for h in (args.heads, args.kv_heads, args.kv_heads)]
    weight = torch.randn(1, args.heads, n, args.head_dim, generator=g).to(device, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    selected = path_for(device, dtype)
    paths = list(dict.fromkeys([selected, LOOP, PADDED, SDPA]))

    def step(path: str):
        q, k, v = (x.to(device, dtype).requires_grad_() for x in base)
        if path == SDPA:
            out = block_mask_attention(q, k, v, cu, scale)
        else:
            out = packed_attention(path, q, k, v, cu, longest, scaling=scale)
        (out * weight).float().sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    reference = step(LOOP)
    rows = {}
    for path in paths:
        for _ in range(args.warmup):
            step(path)
        sync()
        clock = time.perf_counter()
        for _ in range(args.repeats):
            got = step(path)
        sync()
        seconds = (time.perf_counter() - clock) / args.repeats
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, reference))
        rows[path] = {"ms": 1000 * seconds, "max_abs_diff_vs_loop": diff}
    ratios = {f"{selected}/{p}": rows[selected]["ms"] / rows[p]["ms"] for p in (LOOP, SDPA) if p != selected}
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})  "
          f"dtype {args.dtype}  S={len(lengths)} sequences, N={n} tokens, longest {longest}  "
          f"H={args.heads} H_kv={args.kv_heads} D={args.head_dim}  selected path: {selected}")
    for path, row in rows.items():
        print(f"  {path:<20} {row['ms']:9.3f} ms fwd+bwd   max |diff| vs loop {row['max_abs_diff_vs_loop']:.2e}")
    for name, r in ratios.items():
        print(f"  time ratio {name}: {r:.3f}")
    payload = {"machine": machine_info(), "device": str(device), "dtype": args.dtype, "lengths": lengths,
               "selected": selected, "results": rows, "ratios": ratios}
    write_json(args.out, payload)
    return payload


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", help="cuda or cpu (default: cuda if torch sees one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--sequences", type=int, default=16, help="sequences in the packed row")
    p.add_argument("--shortest", type=int, default=64)
    p.add_argument("--longest", type=int, default=512)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
