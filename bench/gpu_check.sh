#!/usr/bin/env bash
# The one command sequence for a machine with an NVIDIA GPU (run from the repository root):
#   (a) install the carried wheels in .whl/ (ftfy, wcwidth), if any
#   (b) GPU, torch and transformers versions; which runtime dependencies import
#   (c) the core tests on CUDA (device="auto" picks it)                       timeout 150 s
#   (d) bench/bench_paperscale.py: real-sized models, fp32 and bf16, peak memory  timeout 200 s
#   (e) the coco preset through the CLI in a one-process NCCL group (DDP), bf16,
#       2 init + 2 CgT-GAN steps on (d)'s models and data                      timeout 120 s
#   (f) ShapesWorld's `python cgtgan.py train` with its defaults, wall time     timeout 240 s
# Everything goes to $OUT/gpu_log.txt; each step prints its exit status and seconds, and a failed
# step does not stop the next. All steps together stop at BUDGET seconds (default 540): a step
# gets what is left of it when that is less than its own cap.
#
#   bash bench/gpu_check.sh          # on the GPU machine
#   bash bench/gpu_check.sh --dry    # here: the same sequence on the CPU with tiny settings
set -u
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/gpu_check_work}
BUDGET=${BUDGET:-540}
START=$(date +%s)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
exec > >(tee -a "$OUT/gpu_log.txt") 2>&1

if [ $DRY = 1 ]; then
  DEVICE=cpu
  PYTEST_EXTRA=(--collect-only)
  BENCH_EXTRA=(--tiny --steps 1 --repeats 1 --threads 1)
  TRAIN_EXTRA=(--set device=cpu --set threads=1 --set gan.batch=4 --set init.batch=4
               --set gan.k=2)
  SHAPES_RUNS=$WORK/runs
  SHAPES_EXTRA=(--set runs_dir="$SHAPES_RUNS" --set world.root="$WORK/world"
                --set world.n_clip_pairs=300 --set world.n_clip_heldout=60 --set world.n_train=40
                --set world.n_corpus=150 --set world.n_val=8 --set world.n_test=12
                --set world.clip_steps=3 --set world.clip_batch_size=32 --set world.n_clip_closeups=60
                --set world.clip_vision_layers=1 --set world.clip_text_layers=1
                --set world.clip_embed_dim=32 --set init.steps=5 --set init.batch=8
                --set gan.steps=3 --set gan.batch=4 --set gan.k=2 --set gan.eval_every=2)
else
  DEVICE=cuda
  PYTEST_EXTRA=()
  BENCH_EXTRA=()
  TRAIN_EXTRA=(--set threads=0)
  SHAPES_RUNS=runs
  SHAPES_EXTRA=()
fi

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME CAP COMMAND...: run COMMAND under timeout min(CAP, budget left); print its status.
step() {
  local name=$1 cap=$2 t
  shift 2
  t=$(left)
  (( t > cap )) && t=$cap
  if (( t < 15 )); then
    echo "=== [$name] SKIPPED: the ${BUDGET}s budget is spent"
    return
  fi
  echo
  echo "=== [$name] (timeout ${t}s) $*"
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@"
  local rc=$?
  local what=ok
  (( rc == 124 || rc == 137 )) && what="TIMED OUT"
  (( rc != 0 && rc != 124 && rc != 137 )) && what=FAILED
  echo "=== [$name] exit $rc ($what) in $(( $(date +%s) - t0 ))s"
  echo "[$name] exit $rc $what $(( $(date +%s) - t0 ))s" >> "$OUT/status.txt"
}

echo "gpu_check $(date -u +%FT%TZ) dry=$DRY out=$OUT work=$WORK budget=${BUDGET}s"
rm -f "$OUT/status.txt"
rm -rf "$WORK/runs"  # this check's own training runs start afresh

# (a) Carried wheels, when the .whl folder travelled with the tree.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  echo "=== [wheels] installed: $(ls .whl | tr '\n' ' ')"
else
  echo "=== [wheels] no .whl folder: nothing installed"
fi

# (b) The machine and the packages.
echo "=== [versions]"
nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
python3 - <<'EOF'
import importlib, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}, NCCL "
      f"{torch.cuda.nccl.version() if torch.cuda.is_available() else '-'})")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name(0)}, bf16 supported {torch.cuda.is_bf16_supported()}")
for name in ("transformers", "tokenizers", "safetensors", "ftfy", "wcwidth", "regex", "PIL",
             "numpy", "tqdm", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except ImportError as err:
        print(f"  {name} MISSING ({err})")
EOF

# (c) The core tests, on CUDA where there is one.
step tests 150 python3 -m pytest -q -x tests/test_cgtgan.py tests/test_train.py \
  tests/test_clip_model.py -p no:cacheprovider "${PYTEST_EXTRA[@]}"

# (d) The paper-scale benchmark; its models and data stay in $WORK/ps for (e).
step bench 200 python3 bench/bench_paperscale.py --device "$DEVICE" --workdir "$WORK/ps" \
  --json "$OUT/bench_paperscale.json" "${BENCH_EXTRA[@]}"

# (e) The coco preset through the CLI under torchrun, in a process group of one (NCCL on the GPU).
if [ -f "$WORK/ps/cli_args.txt" ]; then
  read -r -a PS_ARGS < "$WORK/ps/cli_args.txt"
  step ddp 120 python3 -m torch.distributed.run --nproc_per_node 1 bench/ddp_single.py \
    train --preset coco --name ddp "${PS_ARGS[@]}" --set runs_dir="$WORK/runs" \
    --set bf16=true --set init.steps=2 --set init.epochs=0 --set gan.steps=2 --set gan.epochs=0 \
    --set gan.eval_every=2 --set gan.ckpt_every=2 "${TRAIN_EXTRA[@]}"
  [ -f "$WORK/runs/ddp/metrics.jsonl" ] && cp "$WORK/runs/ddp/metrics.jsonl" "$OUT/ddp_metrics.jsonl"
else
  echo "=== [ddp] SKIPPED: the bench wrote no $WORK/ps/cli_args.txt"
fi

# (f) ShapesWorld end to end with the defaults (runs/shapesworld_seed0, started again if it holds a
# run), on CUDA where there is one.
step shapesworld 240 python3 cgtgan.py train --name shapesworld_seed0 --overwrite "${SHAPES_EXTRA[@]}"
[ -f "$SHAPES_RUNS/shapesworld_seed0/results.json" ] && \
  cp "$SHAPES_RUNS/shapesworld_seed0/results.json" "$OUT/shapesworld_results.json"

echo
echo "=== summary ($(( $(date +%s) - START ))s in all)"
cat "$OUT/status.txt"
