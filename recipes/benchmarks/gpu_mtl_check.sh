#!/usr/bin/env bash
# Multi-task checks on one CUDA device, in one go:
#   * every full Omniglot-alphabets config (recipes/configs/omniglot_alphabets/<name>.yaml, unchanged but for the
#     logger and an optional time cap), run concurrently on the one GPU, each then tested on its best checkpoint;
#   * hps_pcgrad once more under 16-mixed: per-task gradients unscaled before PCGrad, GradScaler on CUDA;
#   * Δm% of every run against single_task, and a summary line per run (steps reached, fit seconds, test error).
#
#   OUT=runs/gpu_mtl MAX_TIME=00:00:05:00 LIGHTNING_MTL_DATA=../shared/data bash recipes/benchmarks/gpu_mtl_check.sh
#
# MAX_TIME (Lightning's dd:hh:mm:ss) caps each fit; empty runs the configs' full 20000 steps. The runs share the GPU
# and the CPU cores (one thread each), so their fit times are not single-run timings.
set -uo pipefail
OUT=${OUT:-runs/gpu_mtl}
RUNS=${RUNS:-/tmp/lightning_mtl_gpu_mtl}
PY=${PYTHON:-python3}
MAX_TIME=${MAX_TIME-00:00:05:00}
ACCELERATOR=${ACCELERATOR:-cuda}
EXTRA=${EXTRA:-}  # more overrides for every run, e.g. "--trainer.max_steps=40 --trainer.val_check_interval=20"
NAMES=${NAMES:-single_task hps_equal hps_uw hps_gradnorm hps_famo hps_pcgrad hps_mgda_ub hps_upgrad soft_sharing}
mkdir -p "$OUT" "$RUNS"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi)"; } | tee "$OUT/summary.txt"
$PY -c "import torch, lightning; from importlib.metadata import version as v
print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchjd', v('torchjd'))" | tee -a "$OUT/summary.txt"

run() {  # run LABEL CONFIG_NAME [extra args...]: fit (capped), then test on the best checkpoint
  local label=$1 name=$2; shift 2
  local dir="$RUNS/$label"
  local args=(--config "recipes/configs/omniglot_alphabets/$name.yaml" --trainer.accelerator="$ACCELERATOR"
              --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir="$dir/logs"
              --trainer.logger.name=csv --trainer.enable_progress_bar=false --checkpoint.dirpath="$dir/checkpoints" $EXTRA "$@")
  [ -n "$MAX_TIME" ] && args+=(--trainer.max_time="$MAX_TIME")
  local start=$SECONDS
  OMP_NUM_THREADS=1 $PY recipes/multitask.py fit "${args[@]}" > "$dir.fit.log" 2>&1
  local rc=$? fit_s=$((SECONDS - start))
  OMP_NUM_THREADS=1 $PY recipes/multitask.py test "${args[@]}" --ckpt_path best > "$dir.test.log" 2>&1
  echo "$label fit_rc=$rc test_rc=$? fit_seconds=$fit_s" > "$dir.status"
}

for name in $NAMES; do
  mkdir -p "$RUNS/$name"
  run "$name" "$name" &
done
mkdir -p "$RUNS/hps_pcgrad_fp16"
run hps_pcgrad_fp16 hps_pcgrad --trainer.precision=16-mixed &
wait

$PY - "$RUNS" "$OUT" <<'EOF' | tee -a "$OUT/summary.txt"
import csv, json, sys
from pathlib import Path
sys.path.insert(0, "recipes")
from delta_m import delta_m
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
results = {}
for status in sorted(runs.glob("*.status")):
    label = status.stem
    info = dict(kv.split("=") for kv in status.read_text().split()[1:])
    fit_csv = sorted((runs / label / "logs").rglob("metrics.csv"))[0]  # version_0: the fit (the test is next)
    rows = list(csv.DictReader(open(fit_csv)))
    steps = 1 + max(int(r["step"]) for r in rows if r.get("step"))  # last logged step (every log_every_n_steps)
    metrics_file = runs / label / "test_metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    scales = [float(r["train/loss_scale"]) for r in rows if r.get("train/loss_scale")]
    results[label] = {**info, "steps": steps, "test": metrics, "final_loss_scale": scales[-1] if scales else None}
base = {k.split("/")[1]: v for k, v in results.get("single_task", {}).get("test", {}).items() if k.endswith("/acc")}
print(f"{'run':>16s} {'steps~':>6s} {'fit_s':>6s} {'test error %':>12s} {'delta_m %':>9s}")
for label, r in results.items():
    acc = {k.split("/")[1]: v for k, v in r["test"].items() if k.endswith("/acc")}
    err = r["test"].get("test/error_mean")
    dm = delta_m(acc, base, dict.fromkeys(acc, True)) if base and acc and set(acc) == set(base) else None
    r["delta_m"] = dm
    print(f"{label:>16s} {r['steps']:6d} {r['fit_seconds']:>6s} {100 * err if err is not None else float('nan'):12.2f} "
          f"{dm if dm is not None else float('nan'):9.2f}  rc={r['fit_rc']}/{r['test_rc']}"
          + (f"  final loss scale {r['final_loss_scale']:g}" if r["final_loss_scale"] else ""))
json.dump(results, open(out / "results.json", "w"), indent=1)
EOF
tar -czf "$OUT/logs.tar.gz" -C "$RUNS" --exclude='*.ckpt' . 2>/dev/null
