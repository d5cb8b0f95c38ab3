#!/usr/bin/env bash
# The GPU check, ready for the day a device is lent: one call of at most ~8 minutes that runs
#   1. the SFT benchmark on CUDA in bf16 (ours, ours in fp32 as the precision reference, TRL where it travels),
#   2. the rollout benchmark on CUDA in bf16 (ours against model.generate on the same batches),
#   3. one stage of the loop with engine=deepspeed engine.zero_stage=3 on one rank (NCCL),
#   4. packed attention: the path opr.attention selects on this device timed against the CPU's per-sequence loop and
#      plain sdpa (opr.tools.bench.attention), then its CUDA value and no-host-sync tests (tests/test_attention.py
#      -k cuda_paths, skipped in --dry-run),
#   5. only where `import vllm` works: the same stage with rollout.backend=vllm (the engine beside the trainer:
#      built once, asleep while training, the trained weights copied in place before the stage's evaluation),
#      rollout.vllm.enforce_eager=true to fit the budget; it gets the time left of the 8 minutes (at most 100 s)
#      and is skipped, with the reason printed, when vllm is missing (always in --dry-run) or under 45 s are left,
# then prints one table (opr.tools.bench.gpu_check). Weights: backbone=smollm2_135m_random (SmolLM2-135M's shapes,
# random weights: the GGUF cannot travel), so the numbers are timings, not accuracies.
#
#   bash launch/gpu_check.sh [OUT_DIR]             # on the GPU machine (OUT_DIR defaults to $OUT, else gpu_check)
#   bash launch/gpu_check.sh --dry-run [OUT_DIR]   # the same steps on the CPU with backbone=tiny (CI, ~1 min)
#
# Packages the GPU image lacks (hydra-core, omegaconf, antlr4-python3-runtime, deepspeed, its needs) travel as
# wheels in .whl/ (bash launch/gpu_wheels.sh fetches them); they are installed into /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ $DRY = 1 ]; then
  BB=tiny DT=float32 STEPS=3 PROMPTS=8 NEW=8 TRAIN=16 SFT_VARIANTS="opr"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device visible to torch: run with --dry-run on a CPU machine" >&2; exit 2; }
  BB=smollm2_135m_random DT=bfloat16 STEPS=20 PROMPTS=256 NEW=64 TRAIN=256 SFT_VARIANTS="opr opr_fp32"
  "$PY" -c "import trl, datasets" 2>/dev/null && SFT_VARIANTS="$SFT_VARIANTS trl_aligned"
fi
echo "== gpu_check: backbone=$BB dtype=$DT out=$OUT_DIR"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

echo "== 1/5 SFT benchmark"
# shellcheck disable=SC2086
timeout 150 "$PY" -m opr.tools.bench.sft_throughput --backbone $BB --steps $STEPS --dtype $DT --variants $SFT_VARIANTS \
  --out "$OUT_DIR/sft.json" > "$OUT_DIR/sft.log" 2>&1 || echo "SFT benchmark failed (rc $?): $OUT_DIR/sft.log"

echo "== 2/5 rollout benchmark"
timeout 120 "$PY" -m opr.tools.bench.rollout_throughput --backbone $BB --prompts $PROMPTS --max-new-tokens $NEW \
  --batch-size 64 --dtype $DT --variants opr hf_sorted --out "$OUT_DIR/rollout.json" > "$OUT_DIR/rollout.log" 2>&1 \
  || echo "rollout benchmark failed (rc $?): $OUT_DIR/rollout.log"

echo "== 3/5 one loop stage under DeepSpeed ZeRO-3, one rank"
timeout 200 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train.py backbone=$BB engine=deepspeed \
  engine.zero_stage=3 engine.compute_dtype=$DT engine.batch_size=8 benchmark.num_tasks=1 benchmark.train_size=$TRAIN \
  benchmark.eval_size=16 benchmark.test_size=0 benchmark.general_size=8 eval.batch_size=16 checkpoint.save=false \
  analysis.drift=false analysis.diagnostics=false logger=none resume=false hydra.run.dir="$OUT_DIR/ds_stage" \
  > "$OUT_DIR/ds_stage.log" 2>&1 || echo "DeepSpeed stage failed (rc $?): $OUT_DIR/ds_stage.log"

echo "== 4/5 packed attention"
if [ $DRY = 1 ]; then ATT_ARGS="--device cpu --dtype float32 --sequences 4 --repeats 1 --warmup 0"; else ATT_ARGS="--dtype $DT"; fi
# shellcheck disable=SC2086
timeout 60 "$PY" -m opr.tools.bench.attention $ATT_ARGS --out "$OUT_DIR/attention.json" > "$OUT_DIR/attention.log" 2>&1 \
  || echo "attention benchmark failed (rc $?): $OUT_DIR/attention.log"
if [ $DRY = 0 ]; then
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py -k cuda_paths > "$OUT_DIR/attention_tests.log" 2>&1 \
    || echo "attention CUDA tests failed (rc $?): $OUT_DIR/attention_tests.log"
  tail -1 "$OUT_DIR/attention_tests.log"
fi

echo "== 5/5 the same stage with rollout.backend=vllm"
BUDGET_S=480  # the whole check's 8 minutes; this step gets what is left of them, at most 100 s
LEFT=$(( BUDGET_S - SECONDS )); [ $LEFT -gt 100 ] && LEFT=100
rm -f "$OUT_DIR/vllm_stage.skipped"
if [ $DRY = 1 ]; then
  SKIP="dry run: vLLM needs a CUDA GPU"
elif ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  SKIP="vllm is not importable here (pip install vllm)"
elif [ $LEFT -lt 45 ]; then
  SKIP="only ${LEFT} s left of the check's ${BUDGET_S} s"
else
  SKIP=""
fi
if [ -n "$SKIP" ]; then
  echo "skipped: $SKIP"
  echo "$SKIP" > "$OUT_DIR/vllm_stage.skipped"
else
  timeout "$LEFT" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train.py backbone=$BB \
    engine=deepspeed engine.zero_stage=3 engine.compute_dtype=$DT engine.batch_size=8 benchmark.num_tasks=1 \
    benchmark.train_size=$TRAIN benchmark.eval_size=16 benchmark.test_size=0 benchmark.general_size=8 \
    eval.batch_size=16 eval.max_prompt_length=256 rollout.backend=vllm rollout.vllm.enforce_eager=true \
    checkpoint.save=false analysis.drift=false analysis.diagnostics=false logger=none resume=false \
    hydra.run.dir="$OUT_DIR/vllm_stage" > "$OUT_DIR/vllm_stage.log" 2>&1 \
    || echo "vLLM stage failed (rc $?): $OUT_DIR/vllm_stage.log"
fi

if [ $DRY = 0 ]; then  # the memory plan of step 3's run, to read beside its measured peak (stages[-1].peak_gpu_mb)
  GPU_GB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 1e9)")
  "$PY" -m opr.tools.plan --gpus 1 --gpu-gb "$GPU_GB" backbone=$BB engine=deepspeed engine.zero_stage=3 \
    engine.compute_dtype=$DT engine.batch_size=8 eval.batch_size=16 analysis.drift=false analysis.diagnostics=false \
    > "$OUT_DIR/plan.txt" 2>&1 || true
fi

echo "== table"
"$PY" -m opr.tools.bench.gpu_check "$OUT_DIR" --out "$OUT_DIR/summary.json"
