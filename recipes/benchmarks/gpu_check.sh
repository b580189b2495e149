#!/usr/bin/env bash
# Issue #18's GPU check in one run, sized for one session's 15 device-minutes: an estimated 5-7 minutes on an
# H100/H200 once the machine is up, at most about 8 (BUDGET stops each phase in time for the summary to be written):
#   * the card (nvidia-smi: name, memory, driver) and the versions                                    -> env.txt
#   * recipes/benchmarks/fewshot_throughput.py: MAML 2nd order (meta-batch 32 and 4) and ProtoNet step times of the
#     raw loop, ours and learn2learn at fp32 and bf16-mixed, peak memory, the targets   -> throughput.{txt,json}
#   * recipes/benchmarks/mtl_overhead.py: multi-task step ratios at K = 4 and K = 50 (hard sharing, MLP, vs equal
#     weighting, vs torchjd, vs a plain loop)                                           -> mtl.txt, mtl_k<K>.json
#   * summary.md: Markdown tables of all of it, the card's name in every row; printed at the end.
#
#   OUT=runs/gpu_check LIGHTNING_MTL_DATA=../shared/data bash recipes/benchmarks/gpu_check.sh
#   ACCELERATOR=cpu STEPS=3 WARMUP=1 REPEATS=1 bash recipes/benchmarks/gpu_check.sh   # smoke run without a GPU
#
# Environment (defaults in brackets):
#   OUT [runs/gpu_check; an existing $OUT is used]   PYTHON [python3]   ACCELERATOR [cuda; or cpu]
#   STEPS [60] WARMUP [15] REPEATS [2]   PRECISIONS ["32 bf16-mixed"]   METHODS ["maml protonet"]
#   MAML_META_BATCH ["32 4"]   L2L_LAYOUT [l2l]   (MAML meta-batch 32 first: if the budget runs out, the rows that
#   the targets need most are in; fewshot_throughput.py rewrites its JSON after every row)
#   MTL_TASKS ["4 50"; empty skips the multi-task phase]   MTL_METHODS ["equal uncertainty famo pcgrad mgda upgrad"]
#   MTL_TORCHJD ["upgrad mgda"]   MTL_STEPS [25] MTL_WARMUP [5] MTL_REPEATS [2]   MTL_EXTRA [extra mtl_overhead.py
#   options, e.g. "--hidden 16 --batch-size 8 --threads 1"]
#   BUDGET [480 seconds for all phases; 0: no limit]: the few-shot phase gets what is left less MTL_RESERVE [120]
#     seconds for the multi-task phase, which then shares what is left among its K; a phase stopped at its limit
#     shows rc=124 in summary.md and keeps what it had written
#   DEPS [unset]: a folder of wheels (installed with pip --no-index --no-deps) and sdists (built there; for
#     learn2learn-0.2.0.tar.gz its C files are regenerated with Cython first, as .ci/learn2learn.sh does) for the
#     packages the machine lacks, installed into a temporary folder put first on PYTHONPATH
#   FITS [0; 1: also the old quick Omniglot fits + tests in mixed precision, many minutes, outside BUDGET; their
#     logs -> fits.tar.gz]
#   The device machine (Python 3.12) lacks torchjd, quadprog, qpsolvers, jsonargparse, gym and learn2learn: fetch them
#   here first (no device time), then run there with DEPS=.whl and carry .whl:
#     python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       torchjd==0.18.0 quadprog==0.1.14 qpsolvers==4.13.0 jsonargparse==4.53.0 gym_notices==0.1.0
#     python3 -m pip download -q --no-deps --no-binary=:all: -d .whl gym==0.26.2 learn2learn==0.2.0
#     (device) OUT=$OUT DEPS=.whl bash recipes/benchmarks/gpu_check.sh
# Files in $OUT: at most 8 (env.txt, throughput.txt, throughput.json, mtl.txt, mtl_k<K>.json per K, summary.md,
# fits.tar.gz), flat.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-runs/gpu_check}  # relative paths (OUT, DEPS) are taken from where the script is called
case "$OUT" in /*) ;; *) OUT=$PWD/$OUT;; esac
case "${DEPS:-/}" in /*) ;; *) DEPS=$PWD/$DEPS;; esac
cd "$REPO"
PY=${PYTHON:-python3}
ACCELERATOR=${ACCELERATOR:-cuda}
STEPS=${STEPS:-60} WARMUP=${WARMUP:-15} REPEATS=${REPEATS:-2}
PRECISIONS=${PRECISIONS:-32 bf16-mixed}
METHODS=${METHODS:-maml protonet}
MAML_META_BATCH=${MAML_META_BATCH:-32 4}
L2L_LAYOUT=${L2L_LAYOUT:-l2l}
MTL_TASKS=${MTL_TASKS-4 50}
MTL_METHODS=${MTL_METHODS:-equal uncertainty famo pcgrad mgda upgrad}
MTL_TORCHJD=${MTL_TORCHJD-upgrad mgda}
MTL_STEPS=${MTL_STEPS:-25} MTL_WARMUP=${MTL_WARMUP:-5} MTL_REPEATS=${MTL_REPEATS:-2}
MTL_EXTRA=${MTL_EXTRA:-}
BUDGET=${BUDGET:-480} MTL_RESERVE=${MTL_RESERVE:-120}
FITS=${FITS:-0}
START=$SECONDS
case "$ACCELERATOR" in cuda|cpu) ;; *) echo "gpu_check.sh: ACCELERATOR must be cuda or cpu, got '$ACCELERATOR'" >&2; exit 2;; esac
if [ -z "$MTL_TASKS" ]; then MTL_RESERVE=0; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quiet='^(GPU available|TPU available|LOCAL_RANK|💡|Using .* Automatic|HPU available|`Trainer.fit` stopped|Gym has been|Please upgrade to Gymnasium|Users of this version of Gym|See the migration guide|.*(UserWarning|PossibleUserWarning|LeafSpec|no `val_dataloader`|does not have many workers|no logger configured).*|  warnings.warn|  rank_zero_warn)'

# ---------------------------------------------------------------- packages the machine lacks
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # packages, builds, fit runs; removed at exit
trap 'rm -rf "$TMP"' EXIT
SITE=$TMP/site
mkdir -p "$SITE"
if [ -n "${DEPS:-}" ]; then
  for f in "$DEPS"/*.whl; do
    [ -e "$f" ] || continue
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$f" || echo "warning: could not install $f"
  done
  for f in "$DEPS"/*.tar.gz; do
    [ -e "$f" ] || continue
    src=$(mktemp -d "$TMP/src.XXXXXX")
    tar -xzf "$f" -C "$src"
    src=$(find "$src" -mindepth 1 -maxdepth 1 -type d | head -n 1)
    if [ -d "$src/learn2learn/data" ]; then  # its shipped C files predate Python 3.11
      "$PY" -m cython -3 "$src"/learn2learn/data/*.pyx || echo "warning: cython failed on $f"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" "$src" \
      || echo "warning: could not build $f"
  done
fi
if ! (cd / && PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import lightning_mtl.datamodules") 2>/dev/null; then
  # not installed: the package as a wheel would hold it (datamodules/ installs as lightning_mtl.datamodules)
  cp -r lightning_mtl "$SITE/lightning_mtl"
  cp -r datamodules "$SITE/lightning_mtl/datamodules"
  echo "lightning_mtl is not installed for $PY: using a copy of this checkout's ($SITE)"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- the machine
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: $PY cannot import torch" >&2; exit 2
fi
if [ "$ACCELERATOR" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device visible to torch ($PY); run with ACCELERATOR=cpu for a CPU smoke run" >&2
  exit 2
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')"
  if [ "$ACCELERATOR" = cuda ]; then
    echo "nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true)"
  else
    echo "no GPU asked for (ACCELERATOR=cpu): $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs || uname -m)"
  fi
  (cd "$TMP" && "$PY" - <<'EOF'
import importlib.util
import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

names = ["lightning", "pytorch-lightning", "learn2learn", "torchjd", "numpy"]
found = []
for n in names:
    try:
        found.append(f"{n} {version(n)}")
    except PackageNotFoundError:
        found.append(f"{n} MISSING")
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}); {'; '.join(found)}; torch sees: {device}")
where = []
for module in ("lightning_mtl", "learn2learn", "torchjd"):
    spec = importlib.util.find_spec(module)
    where.append(f"{module} from {os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else 'nowhere'}")
print("; ".join(where))
EOF
  )
} 2>&1 | tee "$OUT/env.txt"

left() {  # seconds left of BUDGET less $1 reserved; 0 = no limit
  if [ "$BUDGET" -le 0 ]; then echo 0; return; fi
  local s=$((BUDGET - (SECONDS - START) - $1))
  if [ "$s" -lt 10 ]; then s=10; fi
  echo "$s"
}
limited() {  # limited SECONDS CMD...: CMD stopped at SECONDS (0: none); its exit status (124: stopped)
  local s=$1; shift
  if [ "$s" -gt 0 ]; then timeout -k 10 "$s" "$@"; else "$@"; fi
}

# ---------------------------------------------------------------- few-shot throughput
limit=$(left $((MTL_RESERVE + 15)))
echo "== few-shot throughput (time limit: ${limit}s; 0 = none)"
set +e
# shellcheck disable=SC2086  # word lists on purpose
limited "$limit" "$PY" recipes/benchmarks/fewshot_throughput.py --accelerator "$ACCELERATOR" --precision $PRECISIONS \
  --methods $METHODS --maml-meta-batch $MAML_META_BATCH --l2l-layout "$L2L_LAYOUT" --steps "$STEPS" \
  --warmup "$WARMUP" --repeats "$REPEATS" --json "$OUT/throughput.json" > "$OUT/throughput.txt" 2>&1
fewshot_rc=$?
set -e
rm -f "$OUT/throughput.json.tmp"  # left by a run stopped while writing
grep -v -E "$quiet" "$OUT/throughput.txt" || true
echo "fewshot_throughput.py exit status: $fewshot_rc"

# ---------------------------------------------------------------- multi-task step ratios
mtl_rcs=""
if [ -n "$MTL_TASKS" ]; then : > "$OUT/mtl.txt"; fi
n_k=$(echo $MTL_TASKS | wc -w)
for k in $MTL_TASKS; do
  limit=$(left 15)
  if [ "$limit" -gt 0 ]; then
    limit=$((limit / n_k))
    if [ "$limit" -lt 10 ]; then limit=10; fi
  fi
  n_k=$((n_k - 1))
  echo "== multi-task step ratios, K = $k (time limit: ${limit}s; 0 = none)" >> "$OUT/mtl.txt"
  set +e
  # shellcheck disable=SC2086
  limited "$limit" "$PY" recipes/benchmarks/mtl_overhead.py --accelerator "$ACCELERATOR" --tasks "$k" \
    --methods $MTL_METHODS --torchjd $MTL_TORCHJD --architectures --libmtl --steps "$MTL_STEPS" \
    --warmup "$MTL_WARMUP" --repeats "$MTL_REPEATS" --json "$OUT/mtl_k$k.json" $MTL_EXTRA >> "$OUT/mtl.txt" 2>&1
  rc=$?
  set -e
  mtl_rcs="$mtl_rcs K=$k:$rc"
done
if [ -n "$MTL_TASKS" ]; then
  grep -v -E "$quiet" "$OUT/mtl.txt" || true
  echo "mtl_overhead.py exit status:$mtl_rcs"
fi

# ---------------------------------------------------------------- optional: the quick fits (long)
fits=""
if [ "$FITS" = 1 ]; then
  runs=$TMP/fits
  mkdir -p "$runs"
  run() {  # run NAME CONFIG PRECISION [extra args...]
    local name=$1 cfg=$2 prec=$3; shift 3
    local args=(--config "$cfg" --trainer.accelerator="$ACCELERATOR" --trainer.precision="$prec"
                --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir="$runs/logs/$name"
                --trainer.enable_progress_bar=false --checkpoint.dirpath="$runs/ckpt/$name" "$@")
    local start=$SECONDS
    "$PY" recipes/fewshot.py fit "${args[@]}" > "$runs/$name.fit.log" 2>&1 || true
    local fit_s=$((SECONDS - start))
    "$PY" recipes/fewshot.py test "${args[@]}" --ckpt_path best > "$runs/$name.test.log" 2>&1 || true
    echo "$name precision=$prec fit_seconds=$fit_s $(grep -h 'test accuracy' "$runs/$name.test.log" || echo 'no test accuracy')" \
      | tee -a "$runs/runs.txt"
  }
  run protonet_5w1s_quick_bf16 recipes/configs/omniglot/protonet_5w1s_quick.yaml bf16-mixed
  run protonet_5w1s_quick_fp16 recipes/configs/omniglot/protonet_5w1s_quick.yaml 16-mixed
  run maml_5w1s_quick_bf16 recipes/configs/omniglot/maml_5w1s_quick.yaml bf16-mixed
  tar -czf "$OUT/fits.tar.gz" -C "$runs" --exclude='*.ckpt' . 2>/dev/null || true
  fits="$runs/runs.txt"
fi

# ---------------------------------------------------------------- summary.md
"$PY" - "$OUT" "$fewshot_rc" "$mtl_rcs" "$fits" "$((SECONDS - START))" <<'EOF'
import json
import math
import sys
from pathlib import Path

out, fewshot_rc, mtl_rcs, fits, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3].strip(), sys.argv[4], sys.argv[5]


def num(x, fmt):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def rc_text(rc):
    return rc + (" (stopped at its time limit)" if rc in ("124", "137") else "")


lines = []
throughput = out / "throughput.json"
fewshot = json.loads(throughput.read_text()) if throughput.exists() else None
mtl = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("mtl_k*.json"), key=lambda p: int(p.stem[5:]))}
device = (fewshot or next(iter(mtl.values()), {})).get("device", "unknown device")
mtl_status = [s.split(":") for s in mtl_rcs.split()]  # [K=4, rc], ...
lines += [f"# GPU check (issue #18): {device}", "", "```", (out / "env.txt").read_text().strip(), "```", "",
          f"Wall time of the phases: {seconds} s. fewshot_throughput.py exit status {rc_text(fewshot_rc)}"
          + ("; mtl_overhead.py " + ", ".join(f"{k} {rc_text(rc)}" for k, rc in mtl_status) if mtl_status else "")
          + ".", ""]

if fewshot:
    s = fewshot.get("settings", {})
    lines += ["## Few-shot throughput", "",
              f"`fewshot_throughput.py --accelerator {s.get('accelerator')} --precision {' '.join(s.get('precision', []))}"
              f" --methods {' '.join(s.get('methods', []))} --maml-meta-batch "
              f"{' '.join(map(str, s.get('maml_meta_batch', [])))} --steps {s.get('steps')} --warmup {s.get('warmup')}"
              f" --repeats {s.get('repeats')} --l2l-layout {s.get('l2l_layout')}`; data: {fewshot.get('data')}; "
              f"medians over the repeats. Ratio = ours / raw loop; speed-up = learn2learn ms / ours ms; peak MB = "
              "peak CUDA memory allocated by our Lightning step's run."
              + ("" if fewshot.get("complete") else " **Incomplete: the run stopped before its last rows.**"), "",
              "| method | meta-batch | precision | raw ms | ours ms | ratio | episodes/s | learn2learn ms | speed-up "
              "| peak MB | device |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    precisions = s.get("precision", [])
    runs = sorted(fewshot["runs"], key=lambda r: (not r["method"].startswith("ProtoNet"), r["meta_batch"],
                                                  precisions.index(r["precision"]) if r["precision"] in precisions
                                                  else 99))
    for r in runs:
        lines.append(f"| {r['method'].split(',')[0]} | {r['meta_batch']} | {r['precision']} | {num(r['raw_ms'], '.2f')} "
                     f"| {num(r['lightning_ms'], '.2f')} | {num(r['ratio'], '.3f')} | {num(r['episodes_per_s'], '.1f')} "
                     f"| {num(r['learn2learn_ms'], '.2f')} | {num(r['speedup_vs_learn2learn'], '.2f')} "
                     f"| {num(r['peak_mem_mb'], '.1f')} | {r['device']} |")
    targets = fewshot.get("targets") or []
    note = ""
    if not fewshot.get("complete"):
        try:  # recompute from the rows that finished, with the benchmark's own check
            sys.path.insert(0, "recipes/benchmarks")
            from fewshot_throughput import check_targets

            targets, note = check_targets(fewshot["runs"]), " (from the rows that finished)"
        except Exception as e:  # noqa: BLE001
            note = f" (could not be evaluated: {type(e).__name__}: {e})"
    lines += ["", f"### Targets (issue #18 item 5){note}", "",
              "| verdict | target | row | measured | threshold | device |", "|---|---|---|---|---|---|"]
    for t in targets:
        measured = num(t["value"], ".3f") + (f" ({t['reason']})" if t.get("reason") else "")
        lines.append(f"| **{t['verdict']}** | {t['target']} | {t['row']} | {measured} | {t['threshold']:g} | {device} |")
else:
    lines += ["## Few-shot throughput", "", f"No results (exit status {rc_text(fewshot_rc)}): see throughput.txt."]

if mtl_rcs:
    lines += ["", "## Multi-task step ratios", ""]
    if mtl:
        s = next(iter(mtl.values()))["settings"]
        lines += [f"`mtl_overhead.py --accelerator {s['accelerator']} --backbone {s['backbone']} --hidden {s['hidden']} "
                  f"--batch-size {s['batch_size']} --steps {s['steps']} --warmup {s['warmup']} --repeats {s['repeats']}`"
                  "; hard sharing; ms per training step (ours: through the Lightning Trainer); × equal = step time / "
                  "ours at equal weighting, same K; ours/torchjd = ours / torchjd's mtl_backward loop with the same "
                  "aggregator.", "",
                  "| method | level | K | ms/step | × equal | ours/torchjd | device |", "|---|---|---|---|---|---|---|"]
        for results in mtl.values():
            for r in results["runs"]:
                if r["architecture"] != "HardSharing" or r["loop"] == "libmtl":
                    continue
                name = r["method"] if r["loop"] == "ours" else f"{r['loop']}:{r['method']}"
                lines.append(f"| {name} | {r['level']} | {r['tasks']} | {num(r['ms_per_step'], '.2f')} "
                             f"| {num(r['ratio_vs_equal'], '.3f')} | {num(r['ratio_vs_torchjd'], '.3f')} "
                             f"| {results['device']} |")
    missing = [k for k, _ in mtl_status if f"mtl_k{k[2:]}" not in mtl]
    if missing:
        lines += ["", f"No results for {', '.join(missing)}: see mtl.txt."]

if fits:
    lines += ["", "## Quick fits (FITS=1)", "", "```", Path(fits).read_text().strip(), "```"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF
echo
cat "$OUT/summary.md"
