#!/usr/bin/env bash
# Regenerate every committed report of the studies (docs/studies/) from the run records kept here, with the
# current code: each output folder is emptied first, so a plot that no table names any more does not linger.
#   bash docs/results/regenerate.sh            # from the repository root, with .venv installed
# The run records themselves (results.json, configs, predictions and replay dumps as .jsonl.gz) are what the
# runs wrote; nothing here re-trains. The drift/OOD figures of the RL-heals study come from
# `python -m opr.tools.analyze` over checkpoints that are not kept (their JSON is).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
report() {  # report <out dir> <args...>
  local out=$1; shift
  rm -rf "$out"
  "$PY" -m opr.tools.report "$@" --out "$out" > /dev/null
  echo "wrote $out"
}
# The OPR comparison (docs/studies/opr_comparison.md): 5 seeds x methods x budgets 0.2 and 0.05
report docs/results/compare_report docs/results/compare --power
# ... and its 20-seed budget-0.2 comparison (seeds 0-4 re-scored, 5-19 in compare20): the claim table and per-seed BWT
report docs/results/opr_n20_report docs/results/compare_rescored docs/results/compare20/runs --reference vanilla_replay --power
"$PY" docs/results/compare20/claims.py docs/results/opr_n20_report/paired.csv docs/results/compare_rescored \
  docs/results/compare20/runs --cost docs/results/compare20/runs docs/results/compare20/checks \
  --plot docs/results/compare20/paired_seeds.png > docs/results/compare20/claims.md
echo "wrote docs/results/compare20/claims.md"
# Denser != Better (docs/studies/onpolicy_contrast.md): grpo / self_distill / seq_sft, 3 seeds, and stage 1 at 6 seeds
report docs/results/onpolicy_contrast/report docs/results/onpolicy_contrast/runs --reference grpo --reference seq_sft --power
report docs/results/onpolicy_contrast_stage1/report docs/results/onpolicy_contrast_stage1/runs --reference grpo --power
"$PY" docs/results/onpolicy_contrast_stage1/pooled_stage1.py
# ... its parameter drift with the tied embedding counted once (the runs stored it counted twice)
"$PY" docs/results/onpolicy_contrast/tied_head.py > docs/results/onpolicy_contrast/tied_head.md
echo "wrote docs/results/onpolicy_contrast/tied_head.md"
