#!/usr/bin/env bash
# Run a list of train.py jobs on this machine, N at a time, from a frozen copy of one commit, so that the
# code under a long sweep never changes and the same command picks a half-finished sweep up again.
#
#   bash launch/queue.sh freeze <commit> <dir>     # git archive <commit> into <dir> (+ SOURCE_COMMIT)
#   bash launch/queue.sh run <dir> <jobs.txt> <runs_root> [workers=2]
#
# jobs.txt: one job per line, "<name> <train.py overrides...>"; job <name> runs in <runs_root>/<name>
# (hydra.run.dir), with OMP_NUM_THREADS=1 per worker. A job whose results.json says "complete" is skipped,
# a started one resumes from its training state (resume=auto), so running the same command again finishes
# what is left. Each job's log is <runs_root>/<name>.log (appended to, one "== ... start" line per attempt).
# Workers take jobs in file order. Several queues may share a runs root: a job another queue is running is
# refused by the run-directory lock and reported as "busy", its log and results untouched.
# Refused up front (exit 2, nothing started, no runs root made): a missing, unreadable or empty jobs file
# (blank and # lines do not count), a line with a name and no overrides, a name used twice, no Python.
# Exit status: 0 when every job is done, skipped or busy; 1 when any job FAILED (they are listed at the end).
set -euo pipefail
cmd=${1:?freeze or run}
if [ "$cmd" = freeze ]; then
  commit=${2:?commit}; dir=${3:?dir}
  mkdir -p "$dir"
  git archive "$commit" | tar -x -C "$dir"
  git rev-parse "$commit" > "$dir/SOURCE_COMMIT"
  echo "frozen $(cat "$dir/SOURCE_COMMIT") in $dir"
  exit 0
fi
[ "$cmd" = run ] || { echo "unknown command $cmd; allowed: freeze, run" >&2; exit 2; }
src=$(cd "${2:?frozen dir}" && pwd); jobs=${3:?jobs file}; root=${4:?runs root}; workers=${5:-2}
[ -f "$src/train.py" ] || { echo "$src has no train.py: freeze a commit there first" >&2; exit 2; }
[ -f "$jobs" ] && [ -r "$jobs" ] || { echo "jobs file $jobs does not exist or is not a readable file" >&2; exit 2; }
jobs=$(realpath "$jobs")
# the job lines (not blank, not #), their names, and the problems of the file, all before anything starts
job_lines=$(grep -nEv '^[[:space:]]*(#|$)' "$jobs" || true)
[ -n "$job_lines" ] || { echo "jobs file $jobs holds no job (one per line: <name> <train.py overrides...>)" >&2; exit 2; }
bare=$(printf '%s\n' "$job_lines" | awk -F: '{l=$0; sub(/^[0-9]+:/, "", l); if (l !~ / /) print "line " $1 ": " l}')
[ -z "$bare" ] || { printf 'jobs file %s: a job needs a name and at least one train.py override (<name> <overrides...>):\n%s\n' "$jobs" "$bare" >&2; exit 2; }
dups=$(printf '%s\n' "$job_lines" | sed -E 's/^[0-9]+://; s/ .*//' | sort | uniq -d)
[ -z "$dups" ] || { echo "jobs file $jobs uses these job names more than once (each names its run folder): $(echo $dups)" >&2; exit 2; }
[ "$workers" -ge 1 ] 2>/dev/null || { echo "workers must be a whole number >= 1, got $workers" >&2; exit 2; }
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
[ -x "$PY" ] || { echo "no Python at $PY: make the project's .venv (launch/install.sh) or set PYTHON=..." >&2; exit 2; }
mkdir -p "$root"; root=$(cd "$root" && pwd)
lock="$root/.queue.lock"; taken="$root/.taken.$$"; failed="$root/.failed.$$"; : > "$taken"; : > "$failed"
trap 'rm -f "$taken" "$failed"' EXIT
worker() {
  while true; do
    line=$(flock "$lock" bash -c '
      while IFS= read -r l; do
        [[ "$l" =~ ^[[:space:]]*(#|$) ]] && continue  # blank and comment lines, as counted up front
        n=${l%% *}; grep -qxF "$n" "$1" && continue
        echo "$n" >> "$1"; echo "$l"; break
      done < "$2"' _ "$taken" "$jobs")
    [ -n "$line" ] || break
    name=${line%% *}; args=${line#* }
    if [ -f "$root/$name/results.json" ] && grep -q '"status": "complete"' "$root/$name/results.json"; then
      echo "skip $name (complete)"; continue
    fi
    echo "$(date -u +%FT%TZ) start $name"
    # the marker starts a line of its own: a job running in the same log may have left a progress bar without one
    marker="== $(date -u +%FT%TZ) start (queue $$, $BASHPID)"; printf '\n%s\n' "$marker" >> "$root/$name.log"
    # shellcheck disable=SC2086
    if (cd "$src" && OMP_NUM_THREADS=1 "$PY" train.py $args hydra.run.dir="$root/$name" >> "$root/$name.log" 2>&1); then
      echo "$(date -u +%FT%TZ) done $name"
    elif sed -n "\|^$marker\$|,\$p" "$root/$name.log" | grep -q "is in use by another run"; then
      echo "$(date -u +%FT%TZ) busy $name (another run holds $root/$name; left alone)"
    else
      echo "$(date -u +%FT%TZ) FAILED $name (see $root/$name.log)"
      echo "$name" >> "$failed"
    fi
  done
}
for _ in $(seq "$workers"); do worker & done
wait
if [ -s "$failed" ]; then
  echo "$(wc -l < "$failed") job(s) FAILED: $(tr '\n' ' ' < "$failed")(logs: $root/<name>.log)" >&2
  exit 1
fi
