#!/usr/bin/env bash
# One short GPU session, in parts that fail independently:
#   0. benchmarks/shapesworld_data_speed.py on the GPU (OUT_DIR/data_speed.md, at most 60 s);
#   1. benchmarks/gpu.sh (at most BENCH_SECONDS), its tables written to OUT_DIR/gpu_bench.md;
#   2. the embedded model's transformer training resumed from models/shapesworld-moe on the GPU for the time left
#      of TOTAL_SECONDS, then exported; OUT_DIR receives the training log and the exported folder as a tar.gz cut
#      into pieces of at most 15 MiB (rejoin with `cat OUT_DIR/model.tgz.* | tar xz`);
#   3. with EVAL_N > 0: the exported model's caption-sensitivity probe (OUT_DIR/sensitivity.txt, at most 60 s), then
#      its evaluation table with the failure breakdown on EVAL_N captions in full precision, nf4 and int8
#      (OUT_DIR/eval_{fp32,nf4,int8}.txt; these run after TOTAL_SECONDS, at most EVAL_SECONDS each).
# usage: benchmarks/gpu_session.sh OUT_DIR [TOTAL_SECONDS=520] [BENCH_SECONDS=200 (0: no benchmark)]
# env: DEVICE (cuda), INIT_FROM (model folder to resume from), INIT_STEP, GROW_DEPTH (deepen the transformer to this
#   many blocks first; new blocks start as identity), TWO_OBJECT_SHARE (probability of a two-object scene; default
#   one or two equally likely), BATCH_SIZE (256), LR (5e-4), RENDERER (torch: scenes rasterised on the GPU; pil:
#   PIL in DATA_WORKERS processes), DATA_WORKERS (12, pil only), TOKEN_LOSS / NEGATIVE_LOSS (weights of the binding
#   terms, default 0), COMPILE (1: torch.compile the transformer), EVAL_N (0),
#   EVAL_SECONDS (90), EVAL_VARIANTS (fp32 nf4 int8), STEPS / GUIDANCE / SHIFT (sampling defaults written into the
#   exported folder: 24 / 6 / 1)
# Needs a Python with CUDA torch, transformers, safetensors, tokenizers, tqdm; diffusers and bitsandbytes for the
# benchmark's comparison rows (PYTHONPATH may point at them).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [TOTAL_SECONDS] [BENCH_SECONDS]}
total=${2:-520}
bench=${3:-200}
python=${PYTHON:-python3}
mkdir -p "$out"
begin=$SECONDS
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10

echo "== data speed on the GPU (at most 60 s)"
timeout 60 "$python" benchmarks/shapesworld_data_speed.py --device "${DEVICE:-cuda}" --batch-size 1024 \
  > "$out/data_speed.md" 2>&1; grep -E '^\|' "$out/data_speed.md"

if [ "$bench" -gt 0 ]; then
  echo "== benchmark (at most ${bench} s)"
  PYTHON=$python timeout --signal=INT --kill-after=10 "$bench" bash benchmarks/gpu.sh 2>&1 | tee "$out/gpu_bench.md"
fi

budget=$((total - (SECONDS - begin) - 70))
echo "== training for ${budget} s of steps (after $((SECONDS - begin)) s)"
run=/tmp/shapesworld-gpu
rm -rf "$run" /tmp/shapesworld-export
timeout --signal=INT $((budget + 60)) "$python" -m workbench.shapesworld train --stage transformer \
  --init-from "${INIT_FROM:-models/shapesworld-moe}" ${INIT_STEP:+--init-step "$INIT_STEP"} ${GROW_DEPTH:+--grow-depth "$GROW_DEPTH"} ${TWO_OBJECT_SHARE:+--two-object-share "$TWO_OBJECT_SHARE"} \
  ${TOKEN_LOSS:+--token-loss "$TOKEN_LOSS"} ${NEGATIVE_LOSS:+--negative-loss "$NEGATIVE_LOSS"} \
  --renderer "${RENDERER:-torch}" $([ "${COMPILE:-0}" = 1 ] && echo --compile) --run "$run" --device "${DEVICE:-cuda}" --data-workers "${DATA_WORKERS:-12}" \
  --batch-size "${BATCH_SIZE:-256}" --lr "${LR:-5e-4}" --steps 1000000 --time-budget "$budget" \
  --checkpoint-every 2000 > "$out/train.log" 2>&1
echo "training exit $?"
tr '\r' '\n' < "$out/train.log" | grep -v '^$' | tail -n 4
grep -E '^trained on' "$out/train.log"
cp "$run/transformer.json" "$out/" 2>/dev/null
gzip -c "$run/transformer_log.jsonl" > "$out/transformer_log.jsonl.gz" 2>/dev/null
"$python" -m workbench.shapesworld export --run "$run" --out /tmp/shapesworld-export \
  --steps "${STEPS:-24}" --guidance "${GUIDANCE:-6}" --shift "${SHIFT:-1}" &&
  tar czf - -C /tmp shapesworld-export | split -b 15m - "$out/model.tgz."
if [ "${EVAL_N:-0}" -gt 0 ] && [ -d /tmp/shapesworld-export ]; then
  timeout 60 "$python" -m workbench.shapesworld sensitivity --model /tmp/shapesworld-export --device "${DEVICE:-cuda}" \
    > "$out/sensitivity.txt" 2>&1
  grep -E '^\| (one|two)' "$out/sensitivity.txt"
fi
for variant in ${EVAL_VARIANTS:-fp32 nf4 int8}; do
  [ "${EVAL_N:-0}" -gt 0 ] && [ -d /tmp/shapesworld-export ] || break
  echo "== eval $variant on ${EVAL_N} captions (after $((SECONDS - begin)) s)"
  quantization=(); [ "$variant" = fp32 ] || quantization=(--quantization "$variant")
  timeout "${EVAL_SECONDS:-90}" "$python" -m workbench.shapesworld eval --model /tmp/shapesworld-export \
    --n "$EVAL_N" --device "${DEVICE:-cuda}" --batch-size 250 --breakdown "${quantization[@]}" > "$out/eval_$variant.txt" 2>&1
  echo "eval exit $?"; grep -E '^\| 128|captions' "$out/eval_$variant.txt"
done
ls -la "$out"
echo "== done in $((SECONDS - begin)) s"
