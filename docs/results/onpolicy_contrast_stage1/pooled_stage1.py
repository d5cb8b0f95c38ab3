"""Stage 1 of the contrast, pooled over two experiments that share it.

Stage 1 of the 3-task stream (``docs/results/onpolicy_contrast/runs``, seeds 0-2) and the 1-task stream
(``benchmark.num_tasks=1``, ``docs/results/onpolicy_contrast_stage1/runs``, seeds 3-5) are the same experiment:
the same task, data, prompt schedule and per-(seed, stage, step) rollout seeds (seq_sft seed 0 gives the same
in-stage curve, 64 / 94 / 100, in both). This prints, per step inside stage 1, the paired difference
self_distill − grpo of the emotion score over all seeds, with its 95% paired-t interval, and the per-seed
values. Run from the repository root:

    python docs/results/onpolicy_contrast_stage1/pooled_stage1.py
"""

import json
import sys
from pathlib import Path

from opr.tools.report import RunResults, own_task_curve, paired_difference

ROOTS = [Path("docs/results/onpolicy_contrast/runs"), Path("docs/results/onpolicy_contrast_stage1/runs")]


def stage1_curves(method: str) -> dict[int, dict[int, float]]:
    """seed -> {step inside stage 1: own-task score} over every run of ``method`` under ROOTS."""
    curves = {}
    for root in ROOTS:
        for folder in sorted(root.glob(f"{method}_s*")):
            res = json.loads((folder / "results.json").read_text())
            if res.get("status") != "complete":
                continue
            seed = res["config"]["seed"]
            if seed in curves:
                sys.exit(f"seed {seed} of {method} appears twice ({folder})")
            curves[seed] = dict(own_task_curve(RunResults.from_json(res), 1))
    return curves


def main() -> None:
    sd, grpo = stage1_curves("self_distill"), stage1_curves("grpo")
    seeds = sorted(set(sd) & set(grpo))
    steps = sorted(set.intersection(*(set(sd[s]) & set(grpo[s]) for s in seeds)))
    print(f"stage 1 (emotion), self_distill - grpo, paired over seeds {seeds} (n = {len(seeds)})")
    for x in steps:
        d = paired_difference([sd[s][x] for s in seeds], [grpo[s][x] for s in seeds])
        per_seed = ", ".join(f"{sd[s][x]:.0f}-{grpo[s][x]:.0f}" for s in seeds)
        print(f"  step {x:>2}: {d.text():>24}   (self_distill-grpo per seed: {per_seed})")
    means = {m: [sum(c[s][x] for x in steps if x > 0) / len([x for x in steps if x > 0]) for s in seeds]
             for m, c in (("self_distill", sd), ("grpo", grpo))}
    d = paired_difference(means["self_distill"], means["grpo"])
    print(f"  mean over steps > 0: {d.text()}")


if __name__ == "__main__":
    main()
