"""The OPR paper's claims (ii) and (iii) at budget 0.2 over every paired seed of the committed runs: the claim
table (from the report's paired.csv: mean paired ΔBWT, 95% paired-t interval, sign-flip permutation p, the
difference detectable with 80% power), the per-seed BWT table and how often each difference has the claimed sign.

    python docs/results/compare20/claims.py docs/results/opr_n20_report/paired.csv \
        docs/results/compare_rescored docs/results/compare20/runs \
        --cost docs/results/compare20/runs docs/results/compare20/checks \
        --plot docs/results/compare20/paired_seeds.png > docs/results/compare20/claims.md

``--cost`` folders: the sweep's own runs, whose wall time (``seconds_total``, every attempt of a resumed run
included), CPUs and commits are summed up at the end; ``--plot``: each seed's paired difference beside the
mean and its interval, one panel per claim.

Verdicts: *reproduced* when the interval lies above 0 in the claimed direction, *contradicted* when it lies on
the other side of 0, else *inconclusive*; for (ii) the row also says whether an effect of the paper's size
(a 42-46% cut of vanilla replay's |BWT|, taken at 44% of this study's mean vanilla |BWT|) lies inside the
interval or above it.
"""

import argparse
import csv
import json
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


def plot(path: Path, panels: list[dict], paper: float) -> None:
    """One panel per claim: each seed's paired ΔBWT (a dot at its seed), the mean with its 95% paired-t
    interval (right), 0, and for (ii) the paper's effect size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(panels), 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        seeds, diffs = panel["seeds"], panel["diffs"]
        at = len(seeds) + 1  # the mean's place, right of the seeds
        ax.scatter(range(len(seeds)), diffs, s=20, color="0.5", zorder=2, label="one seed")
        ax.errorbar([at], [panel["mean"]], yerr=[[panel["mean"] - panel["low"]], [panel["high"] - panel["mean"]]],
                    fmt="o", color="C0", capsize=6, markersize=7, zorder=3, label="mean, 95% paired-t CI")
        ax.axhline(0.0, color="k", linewidth=0.8)
        if panel["sign"] > 0:
            ax.axhline(paper, color="C3", linestyle="--", linewidth=1, label=f"the paper's size (+{paper:.1f})")
        ax.set_xticks([*range(len(seeds)), at], [*map(str, seeds), "mean"], fontsize=7)
        ax.set_xlabel("seed")
        ax.set_ylabel("ΔBWT to vanilla replay (points)")
        ax.set_title(f"{panel['method']} − vanilla_replay, n = {len(diffs)}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Paired BWT differences at budget {BUDGET}", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paired_csv", type=Path, help="the report's paired.csv")
    ap.add_argument("folders", type=Path, nargs="+", help="the run folders of every seed")
    ap.add_argument("--cost", type=Path, nargs="+", default=[], help="the sweep's own run folders")
    ap.add_argument("--plot", type=Path, help="also draw the per-seed differences here (PNG)")
    args = ap.parse_args()
    bwt = bwt_by_seed(args.folders)
    vanilla = bwt["vanilla_replay"]
    paper = 0.44 * abs(mean(vanilla.values()))
    print(f"Budget {BUDGET}; vanilla replay's mean BWT over its {len(vanilla)} seeds: {mean(vanilla.values()):+.2f}, "
          f"so the paper's 42-46% cut of |BWT| would be about {paper:.1f} points.\n")
    print("| claim | n pairs | mean paired ΔBWT [95% CI] | perm p | detectable (80%) | claimed sign in | verdict |")
    print("|---|---|---|---|---|---|---|")
    panels = []
    for label, method, sign in CLAIMS:
        row = paired_row(args.paired_csv, method)
        lo, hi, m = (float(row[k]) for k in ("BWT_diff_low", "BWT_diff_high", "BWT_diff_mean"))
        seeds = sorted(set(bwt.get(method, {})) & set(vanilla))
        diffs = [bwt[method][s] - vanilla[s] for s in seeds]
        if len(seeds) != int(row["n_pairs"]):
            raise SystemExit(f"{method}: {len(seeds)} paired seeds here, {row['n_pairs']} in {args.paired_csv}")
        agree = sum(1 for d in diffs if d * sign > 0)
        if sign * lo > 0 and sign * hi > 0:
            verdict = "**reproduced**"
        elif sign * lo < 0 and sign * hi < 0:
            verdict = "**contradicted**"
        else:
            verdict = "**inconclusive**"
        if sign > 0:
            where = ("above the interval: an effect that large is ruled out" if hi < paper
                     else "below the interval" if lo > paper else "inside the interval")
            verdict += f"; the paper's size (+{paper:.1f}) lies {where}"
        print(f"| {label} | {len(seeds)} | {m:+.2f} [{lo:+.2f}, {hi:+.2f}] | {float(row['BWT_perm_p']):.2g} | "
              f"{float(row['BWT_detectable80']):.1f} | {agree} of {len(seeds)} seeds (ties {diffs.count(0.0)}) | "
              f"{verdict} |")
        panels.append(dict(method=method, sign=sign, seeds=seeds, diffs=diffs, mean=m, low=lo, high=hi))
    methods = ["vanilla_replay", "opr", "lowscore_replay"]
    print("\nBWT per seed (budget 0.2) and the paired differences:\n")
    print("| seed | vanilla | opr | lowscore | opr − vanilla | lowscore − vanilla |")
    print("|---|---|---|---|---|---|")
    for s in sorted(set().union(*(bwt.get(m, {}) for m in methods))):
        vals = [bwt.get(m, {}).get(s) for m in methods]
        cells = ["-" if v is None else f"{v:+.1f}" for v in vals]
        diffs = ["-" if v is None or vals[0] is None else f"{v - vals[0]:+.1f}" for v in vals[1:]]
        print(f"| {s} | " + " | ".join(cells + diffs) + " |")
    if args.cost:
        print("\n" + cost(args.cost))
    if args.plot:
        plot(args.plot, panels, paper)


if __name__ == "__main__":
    main()
