"""Copy the complete runs of a sweep's run folder into the committed results (results.json, the Hydra config,
the predictions of stage 0 and of the last stage, the replay dumps; .jsonl files gzipped with mtime 0, so a
re-copy of the same run is byte-identical). Incomplete runs are left where they are.

    python docs/results/compare20/collect.py /work/sweeps/compare20 docs/results/compare20 \
        --jobs /work/sweeps/jobs_n20.txt --source /work/sweeps/src_1b603e9

Runs named ``check_*`` go to ``checks/``, the others to ``runs/``.
"""

import argparse
import gzip
import json
import shutil
from pathlib import Path


def copy_run(run: Path, out: Path) -> None:
    res = run / "results.json"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(res, out / "results.json")
    if (run / ".opr_hydra").is_dir():
        shutil.copytree(run / ".opr_hydra", out / ".hydra")
    last = len(json.loads(res.read_text())["tasks"])
    files = [p for t in (0, last) for p in (run / "predictions" / f"stage{t}").glob("*.jsonl")]
    files += list((run / "replay").glob("*.jsonl"))
    for f in files:
        target = (out / f.relative_to(run)).with_name(f.name + ".gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as g:
            g.write(f.read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, help="the queue's run folder")
    ap.add_argument("dest", type=Path, help="the committed results folder")
    ap.add_argument("--jobs", type=Path, help="the jobs file, copied beside the runs")
    ap.add_argument("--source", type=Path, help="the frozen source folder (its SOURCE_COMMIT is copied)")
    args = ap.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    if args.jobs:
        shutil.copy(args.jobs, args.dest / args.jobs.name)
    if args.source:
        (args.dest / "SOURCE_COMMIT").write_text((args.source / "SOURCE_COMMIT").read_text())
    done = []
    for run in sorted(p for p in args.sweep.iterdir() if p.is_dir()):
        res = run / "results.json"
        if not res.is_file() or json.loads(res.read_text()).get("status") != "complete":
            continue
        copy_run(run, args.dest / ("checks" if run.name.startswith("check_") else "runs") / run.name)
        done.append(run.name)
    print(len(done), "complete runs:", " ".join(done))


if __name__ == "__main__":
    main()
