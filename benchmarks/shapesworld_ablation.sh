#!/usr/bin/env bash
# The conditioning ablation of the embedded model: every arm continues training from the same weights
# (models/shapesworld-moe) on the same scenes, for the same number of images, and differs only in its binding terms.
# Each arm is then exported, evaluated (eval --n EVAL_N --seed 3 --breakdown) and probed (sensitivity).
#   usage: benchmarks/shapesworld_ablation.sh OUT_DIR [ARM ...]     (arms: shipped baseline token negative both)
#   env: STEPS (300), BATCH_SIZE (32), LR (1e-4), TWO_OBJECT_SHARE (0.5), TOKEN_LOSS (0.1), NEGATIVE_LOSS (1),
#        EVAL_N (400), THREADS (2), DEVICE (cpu), PYTHON (python3)
# Writes OUT_DIR/<arm>/{train.log,eval.txt,sensitivity.txt} and OUT_DIR/summary.md (one row per arm).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/shapesworld_ablation.sh OUT_DIR [ARM ...]}
shift
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(shipped baseline token negative both)
python=${PYTHON:-python3}
steps=${STEPS:-300}
device=${DEVICE:-cpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30

arm_flags() {
  case "$1" in
    baseline) ;;
    token) echo "--token-loss ${TOKEN_LOSS:-0.1}" ;;
    negative) echo "--negative-loss ${NEGATIVE_LOSS:-1}" ;;
    both) echo "--token-loss ${TOKEN_LOSS:-0.1} --negative-loss ${NEGATIVE_LOSS:-1}" ;;
    *) echo "unknown arm $1" >&2; return 2 ;;
  esac
}

for arm in "${arms[@]}"; do
  dir="$out/$arm"
  mkdir -p "$dir"
  model=models/shapesworld-moe
  if [ "$arm" != shipped ]; then
    flags=$(arm_flags "$arm") || exit 2
    echo "== $arm: $steps steps × ${BATCH_SIZE:-32} images ($flags) $(date +%T)"
    # shellcheck disable=SC2086
    "$python" -m workbench.shapesworld train --stage transformer --init-from models/shapesworld-moe --init-step 0 \
      --run "$dir/run" --steps "$steps" --batch-size "${BATCH_SIZE:-32}" --lr "${LR:-1e-4}" \
      --two-object-share "${TWO_OBJECT_SHARE:-0.5}" --checkpoint-every 100 --threads "${THREADS:-2}" \
      --device "$device" $flags > "$dir/train.log" 2>&1 || { echo "training $arm failed"; tail -5 "$dir/train.log"; continue; }
    grep -E '^trained on' "$dir/train.log"
    "$python" -m workbench.shapesworld export --run "$dir/run" --out "$dir/model" > /dev/null || continue
    model="$dir/model"
  fi
  echo "== $arm: eval and sensitivity $(date +%T)"
  "$python" -m workbench.shapesworld eval --model "$model" --n "${EVAL_N:-400}" --seed 3 --breakdown \
    --dtype bfloat16 --device "$device" --layout-guidance 0 --layout-control 0 > "$dir/eval.txt" 2>&1
  "$python" -m workbench.shapesworld sensitivity --model "$model" --device "$device" > "$dir/sensitivity.txt" 2>&1
  grep -E '^\| 128' "$dir/eval.txt"
  grep -E 'relation flipped|colours swapped' "$dir/sensitivity.txt"
done
"$python" benchmarks/ablation_table.py "$out" | tee "$out/summary.md"
