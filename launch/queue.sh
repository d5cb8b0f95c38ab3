#!/usr/bin/env bash
# Run a list of train.py jobs on this machine, N at a time, from a frozen copy of one commit, so that the
# code under a long sweep never changes and a later session can pick a half-finished sweep up again.
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
src=$(cd "${2:?frozen dir}" && pwd); jobs=$(realpath "${3:?jobs file}"); root=${4:?runs root}; workers=${5:-2}
[ -f "$src/train.py" ] || { echo "$src has no train.py: freeze a commit there first" >&2; exit 2; }
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
mkdir -p "$root"; root=$(cd "$root" && pwd)
lock="$root/.queue.lock"; taken="$root/.taken.$$"; : > "$taken"; trap 'rm -f "$taken"' EXIT
worker() {
  while true; do
    line=$(flock "$lock" bash -c '
      while IFS= read -r l; do
        [ -z "$l" ] || [ "${l#\#}" != "$l" ] && continue
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
    fi
  done
}
for _ in $(seq "$workers"); do worker & done
wait
