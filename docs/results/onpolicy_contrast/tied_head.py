"""The parameter drift of the on-policy contrast runs with SmolLM2's tied embedding counted once.

Until the drift analysis was shared by the ranks (2026-12-06), the run's drift observer kept its base copy of the tied
``lm_head.weight`` as a tensor of its own: each stage's ``drift`` reported a ``param/rel_fro/lm_head`` group (equal
to ``embed``) and counted the embedding twice in ``param/rel_fro/all``. The per-type figures were right, so the
pooled figure can be recomputed exactly from them and the base weights' squared norms per module type:

    all = sqrt( Σ_t rel_t² · B_t / Σ_t B_t ),   t over the module types without ``lm_head``,
    B_t = Σ ||W_0||_F² over the parameters of type t (SmolLM2-135M-Instruct, the runs' base).

The script first recomputes the stored (double-counting) figure the same way, with ``lm_head`` weighted as
``embed``, and refuses to go on unless it matches to 1e-9 relative, so the correction rests on the very numbers
the runs stored. It prints a Markdown table (run, stored, corrected) and the paired difference
``self_distill − grpo`` of the corrected last-stage figure (points of relative Frobenius distance, seeds 0-2):

    python docs/results/onpolicy_contrast/tied_head.py > docs/results/onpolicy_contrast/tied_head.md
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from opr.analysis import drift as D
from opr.backbones import load_smollm2_135m
from opr.tools.report.stats import paired_difference

HERE = Path(__file__).resolve().parent
RUN_FOLDERS = [HERE / "runs", HERE.parent / "onpolicy_contrast_stage1" / "runs",
               HERE.parent / "onpolicy_contrast_base_teacher"]


def base_norms() -> dict[str, float]:
    """Σ ||W_0||_F² per module type of the base model (a tied weight once)."""
    state = load_smollm2_135m().model.state_dict()
    out: dict[str, float] = {}
    for name, w, _ in D.paired_parameters(state, state):
        kind = D.module_type(name)
        out[kind] = out.get(kind, 0.0) + float(torch.linalg.vector_norm(w.float())) ** 2
    return out


def corrected(drift: dict, norms: dict[str, float]) -> tuple[float, float]:
    """(the stored figure recomputed with the head counted again, the figure with it counted once)."""
    num = sum(drift[f"param/rel_fro/{t}"] ** 2 * b for t, b in norms.items())
    den = sum(norms.values())
    again = math.sqrt((num + drift["param/rel_fro/lm_head"] ** 2 * norms["embed"]) / (den + norms["embed"]))
    return again, math.sqrt(num / den)


def main() -> None:
    norms = base_norms()
    rows, last = [], {}
    for folder in RUN_FOLDERS:
        for res in sorted(folder.glob("*/results.json")):
            run = json.loads(res.read_text())
            drift = run["stages"][-1].get("drift") or {}
            if "param/rel_fro/lm_head" not in drift:
                continue
            stored = drift["param/rel_fro/all"]
            again, fixed = corrected(drift, norms)
            if abs(again - stored) > 1e-9 * stored:
                raise SystemExit(f"{res}: the stored figure {stored!r} is not the double-counted {again!r}")
            rows.append((str(res.parent.relative_to(HERE.parent)), stored, fixed))
            last[res.parent.name] = fixed
    print("Last-stage parameter drift, `param/rel_fro/all` in %: as stored (tied embedding counted twice) and "
          "with the embedding counted once.\n")
    print("| run | stored | corrected |\n|---|---|---|")
    for name, stored, fixed in rows:
        print(f"| {name} | {100 * stored:.3f} | {100 * fixed:.3f} |")
    seeds = range(3)
    diff = paired_difference([100 * last[f"self_distill_s{s}"] for s in seeds],
                             [100 * last[f"grpo_s{s}"] for s in seeds])
    print(f"\n`self_distill − grpo` (seeds 0-2, corrected, points): {diff.mean:+.2f} "
          f"[{diff.low:.2f}, {diff.high:.2f}] (95% paired t, n = {diff.n})")


if __name__ == "__main__":
    main()
