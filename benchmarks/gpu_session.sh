#!/usr/bin/env bash
# One short GPU session, in parts that fail independently:
#   0. benchmarks/shapesworld_data_speed.py on the GPU (OUT_DIR/data_speed.md, at most 60 s);
#   1. benchmarks/gpu.sh (at most BENCH_SECONDS), its tables written to OUT_DIR/gpu_bench.md;
#   2. the embedded model's transformer trained from INIT_FROM (default models/shapesworld-moe) on the device, one
#      process per training arm of ARMS, all at the same time (a model this small leaves the GPU room for several),
#      on the same scenes (seed 0), for the time left of TOTAL_SECONDS less RESERVE_SECONDS per arm; each arm differs
#      only in its binding terms (the arms of benchmarks/shapesworld_ablation.sh):
#        baseline (flow loss only), token (--token-loss TOKEN_LOSS), negative (--negative-loss NEGATIVE_LOSS), both;
#   3. each arm exported (EMA weights, sampling defaults STEPS / GUIDANCE / SHIFT) and, with EVAL_N > 0, probed
#      (sensitivity, at most 60 s) and evaluated on EVAL_N captions with the failure breakdown in each of
#      EVAL_VARIANTS (fp32 nf4 int8; at most EVAL_SECONDS each), the weights alone (no layout guidance or control);
#      these run after the training.
# Writes, per arm, OUT_DIR/<arm>/{train.log, run/transformer.json, run/transformer_log.jsonl, sensitivity.txt,
# eval.txt (fp32), eval_nf4.txt, eval_int8.txt, model.tgz.*} (the exported folder as a tar.gz cut into pieces of at
# most 15 MiB: `cat OUT_DIR/ARM/model.tgz.* | tar xz`), and OUT_DIR/summary.md, one row per arm
# (benchmarks/ablation_table.py, the README's ablation table).
# usage: benchmarks/gpu_session.sh OUT_DIR [TOTAL_SECONDS=520] [BENCH_SECONDS=200 (0: no benchmark)]
# env: ARMS ("baseline"), DEVICE (cuda), INIT_FROM, INIT_STEP (schedule step to start at, 0), GROW_DEPTH (deepen the
#   transformer to this many blocks first; new blocks start as identity), TWO_OBJECT_SHARE (probability of a
#   two-object scene; default one or two equally likely), BATCH_SIZE (256), LR (5e-4), RENDERER (torch: scenes
#   rasterised on the GPU; pil: PIL in DATA_WORKERS processes), DATA_WORKERS (12, shared by the arms),
#   TOKEN_LOSS (0.01), NEGATIVE_LOSS (0.1), COMPILE (1: torch.compile the transformer), RESERVE_SECONDS (70 per arm),
#   EVAL_N (0), EVAL_SECONDS (90), EVAL_VARIANTS (fp32 nf4 int8), STEPS / GUIDANCE / SHIFT (24 / 6 / 1), PYTHON.
# Needs a Python with CUDA torch, transformers, safetensors, tokenizers, tqdm; diffusers and bitsandbytes for the
# benchmark's comparison rows (PYTHONPATH may point at them). `DEVICE=cpu BATCH_SIZE=8 EVAL_N=16 … OUT 200 0` runs
# the whole script on a CPU in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [TOTAL_SECONDS] [BENCH_SECONDS]}
total=${2:-520}
bench=${3:-200}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
read -r -a arms <<< "${ARMS:-baseline}"
mkdir -p "$out"
begin=$SECONDS
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10

arm_flags() {
  case "$1" in
    baseline) ;;
    token) echo "--token-loss ${TOKEN_LOSS:-0.01}" ;;
    negative) echo "--negative-loss ${NEGATIVE_LOSS:-0.1}" ;;
    both) echo "--token-loss ${TOKEN_LOSS:-0.01} --negative-loss ${NEGATIVE_LOSS:-0.1}" ;;
    *) echo "unknown arm '$1' (arms: baseline token negative both)" >&2; return 2 ;;
  esac
}
for arm in "${arms[@]}"; do arm_flags "$arm" > /dev/null || exit 2; done

echo "== data speed on the device (at most 60 s)"
timeout 60 "$python" benchmarks/shapesworld_data_speed.py --device "$device" --batch-size 1024 \
  > "$out/data_speed.md" 2>&1; grep -E '^\|' "$out/data_speed.md"

if [ "$bench" -gt 0 ]; then
  echo "== benchmark (at most ${bench} s)"
  PYTHON=$python timeout --signal=INT --kill-after=10 "$bench" bash benchmarks/gpu.sh 2>&1 | tee "$out/gpu_bench.md"
fi

budget=$((total - (SECONDS - begin) - ${RESERVE_SECONDS:-70} * ${#arms[@]}))
workers=$(( ${DATA_WORKERS:-12} / ${#arms[@]} )); [ "$workers" -ge 1 ] || workers=1
echo "== training ${arms[*]} at the same time for ${budget} s of steps each (after $((SECONDS - begin)) s)"
pids=()
for arm in "${arms[@]}"; do
  mkdir -p "$out/$arm"
  rm -rf "/tmp/shapesworld-gpu-$arm" "/tmp/shapesworld-export-$arm"
  # shellcheck disable=SC2046
  timeout --signal=INT $((budget + 60)) "$python" -m workbench.shapesworld train --stage transformer \
    --init-from "${INIT_FROM:-models/shapesworld-moe}" --init-step "${INIT_STEP:-0}" \
    ${GROW_DEPTH:+--grow-depth "$GROW_DEPTH"} ${TWO_OBJECT_SHARE:+--two-object-share "$TWO_OBJECT_SHARE"} \
    $(arm_flags "$arm") --renderer "${RENDERER:-torch}" $([ "${COMPILE:-0}" = 1 ] && echo --compile) \
    --run "/tmp/shapesworld-gpu-$arm" --device "$device" --data-workers "$workers" --seed 0 \
    --batch-size "${BATCH_SIZE:-256}" --lr "${LR:-5e-4}" --steps 1000000 --time-budget "$budget" \
    --checkpoint-every 2000 > "$out/$arm/train.log" 2>&1 &
  pids+=($!)
done
for i in "${!arms[@]}"; do
  wait "${pids[$i]}"; echo "${arms[$i]}: training exit $?"
done

for arm in "${arms[@]}"; do
  run=/tmp/shapesworld-gpu-$arm export=/tmp/shapesworld-export-$arm dir=$out/$arm
  echo "== $arm (after $((SECONDS - begin)) s)"
  tr '\r' '\n' < "$dir/train.log" | grep -v '^$' | tail -n 2  # the last progress line and "trained on … images/s"
  mkdir -p "$dir/run"
  cp "$run/transformer.json" "$run/transformer_log.jsonl" "$dir/run/" 2>/dev/null
  "$python" -m workbench.shapesworld export --run "$run" --out "$export" \
    --steps "${STEPS:-24}" --guidance "${GUIDANCE:-6}" --shift "${SHIFT:-1}" > "$dir/export.log" 2>&1 &&
    tar czf - -C /tmp "$(basename "$export")" | split -b 15m - "$dir/model.tgz." || continue
  [ "${EVAL_N:-0}" -gt 0 ] || continue
  timeout 60 "$python" -m workbench.shapesworld sensitivity --model "$export" --device "$device" \
    > "$dir/sensitivity.txt" 2>&1
  grep -E 'relation flipped|colours swapped' "$dir/sensitivity.txt"
  for variant in ${EVAL_VARIANTS:-fp32 nf4 int8}; do
    quantization=(); name=eval.txt
    [ "$variant" = fp32 ] || { quantization=(--quantization "$variant"); name=eval_$variant.txt; }
    echo "-- eval $variant on ${EVAL_N} captions (after $((SECONDS - begin)) s)"
    timeout "${EVAL_SECONDS:-90}" "$python" -m workbench.shapesworld eval --model "$export" --n "$EVAL_N" \
      --device "$device" --batch-size 250 --breakdown --layout-guidance 0 --layout-control 0 "${quantization[@]}" \
      > "$dir/$name" 2>&1
    echo "eval exit $?"; grep -E '^\| 128|captions' "$dir/$name"
  done
done
[ "${EVAL_N:-0}" -gt 0 ] && "$python" benchmarks/ablation_table.py "$out" | tee "$out/summary.md"
ls -la "$out" "$out"/*/
echo "== done in $((SECONDS - begin)) s"
