"""The OPR paper's claims (ii) and (iii) at budget 0.2 over every paired seed of the committed runs: the claim
table (from the report's paired.csv: mean paired ΔBWT, 95% paired-t interval, sign-flip permutation p, the
difference detectable with 80% power), the per-seed BWT table and how often each difference has the claimed sign.

    python docs/results/compare20/claims.py docs/results/opr_n20_report/paired.csv \
        docs/results/compare_rescored docs/results/compare20/runs \
        --cost docs/results/compare20/runs docs/results/compare20/checks > docs/results/compare20/claims.md

``--cost`` folders: the sweep's own runs, whose wall time (``seconds_total``, every attempt of a resumed run
included), CPUs and commits are summed up at the end.

Verdicts: *reproduced* when the interval lies above 0 in the claimed direction, *contradicted* when it lies on
the other side of 0, else *inconclusive*; for (ii) the row also says whether an effect of the paper's size
(a 42-46% cut of vanilla replay's |BWT|, taken at 44% of this study's mean vanilla |BWT|) lies inside the
interval or above it.
"""

import csv
import json
import sys
from pathlib import Path
from statistics import mean

BUDGET = 0.2
CLAIMS = [  # (label, method, sign of the claimed difference method − vanilla_replay in BWT)
    ("(ii) OPR forgets less than vanilla replay", "opr", +1),
    ("(iii) low-score replay forgets more than vanilla replay", "lowscore_replay", -1),
]


def bwt_by_seed(folders: list[Path]) -> dict[str, dict[int, float]]:
    """method -> seed -> BWT of the complete budget-0.2 runs (OPR: its default, budgeted-prompts selection)."""
    out: dict[str, dict[int, float]] = {}
    for folder in folders:
        for res in sorted(folder.glob("*/results.json")):
            r = json.loads(res.read_text())
            cfg = r["config"]
            if r.get("status") != "complete" or cfg.get("budget") != BUDGET:
                continue
            method = cfg["method"]["name"]
            if method == "opr" and cfg["method"].get("selection") != "budgeted_prompts":
                continue
            if method in out and cfg["seed"] in out[method]:
                raise SystemExit(f"two runs of {method} seed {cfg['seed']}: {res}")
            out.setdefault(method, {})[cfg["seed"]] = r["metrics"]["BWT"]
    return out


def paired_row(paired_csv: Path, method: str) -> dict:
    for row in csv.DictReader(paired_csv.open()):
        if (row["reference"] == "vanilla_replay" and row["method"] == method and float(row["budget"]) == BUDGET
                and "ranked_pool" not in row["cell"]):
            return row
    raise SystemExit(f"no paired row for {method} at budget {BUDGET} in {paired_csv}")


def cost(folders: list[Path]) -> str:
    """One paragraph: how many complete runs, their summed wall time, the spread per run, the CPUs and commits."""
    runs = [json.loads(res.read_text()) for folder in folders for res in sorted(folder.glob("*/results.json"))]
    runs = [r for r in runs if r.get("status") == "complete"]
    if not runs:
        raise SystemExit(f"no complete run under {', '.join(map(str, folders))}")
    minutes = [r["seconds_total"] / 60 for r in runs]
    cpus = sorted({" ".join(filter(None, (r["run"].get("cpu"), r["run"].get("cpu_features")))) for r in runs})
    commits = sorted({(r["run"].get("git_commit") or "?")[:7] for r in runs})
    return (f"Cost of the sweep: {len(runs)} complete runs, {sum(minutes) / 60:.1f} hours of wall time in all "
            f"({min(minutes):.0f}-{max(minutes):.0f} min per run, mean {mean(minutes):.0f}; two runs at a time "
            f"with 1 torch thread each); CPU: {', '.join(cpus)}; commit {', '.join(commits)}.")


def main() -> None:
    args = sys.argv[1:]
    cost_folders = []
    if "--cost" in args:
        at = args.index("--cost")
        args, cost_folders = args[:at], [Path(p) for p in args[at + 1:]]
    paired_csv, folders = Path(args[0]), [Path(p) for p in args[1:]]
    bwt = bwt_by_seed(folders)
    vanilla = bwt["vanilla_replay"]
    paper = 0.44 * abs(mean(vanilla.values()))
    print(f"Budget {BUDGET}; vanilla replay's mean BWT over its {len(vanilla)} seeds: {mean(vanilla.values()):+.2f}, "
          f"so the paper's 42-46% cut of |BWT| would be about {paper:.1f} points.\n")
    print("| claim | n pairs | mean paired ΔBWT [95% CI] | perm p | detectable (80%) | claimed sign in | verdict |")
    print("|---|---|---|---|---|---|---|")
    for label, method, sign in CLAIMS:
        row = paired_row(paired_csv, method)
        lo, hi, m = (float(row[k]) for k in ("BWT_diff_low", "BWT_diff_high", "BWT_diff_mean"))
        seeds = sorted(set(bwt.get(method, {})) & set(vanilla))
        diffs = [bwt[method][s] - vanilla[s] for s in seeds]
        if len(seeds) != int(row["n_pairs"]):
            raise SystemExit(f"{method}: {len(seeds)} paired seeds here, {row['n_pairs']} in {paired_csv}")
        agree = sum(1 for d in diffs if d * sign > 0)
        if sign * lo > 0 and sign * hi > 0:
            verdict = "**reproduced**"
        elif sign * lo < 0 and sign * hi < 0:
            verdict = "**contradicted**"
        else:
            verdict = "**inconclusive**"
            if sign > 0:
                verdict += (f"; the paper's size (+{paper:.1f}) lies "
                            + ("above the interval: an effect that large is ruled out" if hi < paper
                               else "inside the interval"))
        print(f"| {label} | {len(seeds)} | {m:+.2f} [{lo:+.2f}, {hi:+.2f}] | {float(row['BWT_perm_p']):.2g} | "
              f"{float(row['BWT_detectable80']):.1f} | {agree} of {len(seeds)} seeds (ties {diffs.count(0.0)}) | "
              f"{verdict} |")
    methods = ["vanilla_replay", "opr", "lowscore_replay"]
    print("\nBWT per seed (budget 0.2) and the paired differences:\n")
    print("| seed | vanilla | opr | lowscore | opr − vanilla | lowscore − vanilla |")
    print("|---|---|---|---|---|---|")
    for s in sorted(set().union(*(bwt.get(m, {}) for m in methods))):
        vals = [bwt.get(m, {}).get(s) for m in methods]
        cells = ["-" if v is None else f"{v:+.1f}" for v in vals]
        diffs = ["-" if v is None or vals[0] is None else f"{v - vals[0]:+.1f}" for v in vals[1:]]
        print(f"| {s} | " + " | ".join(cells + diffs) + " |")
    if cost_folders:
        print("\n" + cost(cost_folders))


if __name__ == "__main__":
    main()
