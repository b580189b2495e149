#!/usr/bin/env bash
# GPU checks in one go: throughput (fp32 / bf16-mixed / 16-mixed, Lightning vs raw loop) and real Omniglot fit + test
# runs in mixed precision on one CUDA device. Results (text, JSON, CSV logs) go to $OUT.
#
#   OUT=runs/gpu_check LIGHTNING_MTL_DATA=../shared/data bash recipes/benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
quiet='^(GPU available|TPU available|LOCAL_RANK|💡|Using .* Automatic|HPU available|`Trainer.fit` stopped)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
${PYTHON:-python3} -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

${PYTHON:-python3} recipes/benchmarks/fewshot_throughput.py --accelerator cuda --precision 32 bf16-mixed 16-mixed \
  --steps 150 --warmup 30 --repeats 2 --json "$OUT/throughput.json" 2>&1 | grep -v -E "$quiet" | tee "$OUT/throughput.txt"

run() {  # run NAME CONFIG PRECISION [extra args...]
  local name=$1 cfg=$2 prec=$3; shift 3
  local args=(--config "$cfg" --trainer.precision="$prec" --trainer.logger=lightning.pytorch.loggers.CSVLogger
              --trainer.logger.save_dir="$OUT/logs/$name" --trainer.enable_progress_bar=false
              --checkpoint.dirpath="$OUT/ckpt/$name" "$@")
  local start=$SECONDS
  ${PYTHON:-python3} recipes/fewshot.py fit "${args[@]}" > "$OUT/$name.fit.log" 2>&1
  local fit_s=$((SECONDS - start))
  ${PYTHON:-python3} recipes/fewshot.py test "${args[@]}" --ckpt_path best > "$OUT/$name.test.log" 2>&1
  echo "$name precision=$prec fit_seconds=$fit_s $(grep -h 'test accuracy' "$OUT/$name.test.log")" | tee -a "$OUT/runs.txt"
}
run protonet_5w1s_quick_bf16 recipes/configs/omniglot/protonet_5w1s_quick.yaml bf16-mixed
run protonet_5w1s_quick_fp16 recipes/configs/omniglot/protonet_5w1s_quick.yaml 16-mixed
run maml_5w1s_quick_bf16 recipes/configs/omniglot/maml_5w1s_quick.yaml bf16-mixed
