#!/usr/bin/env bash
# One short GPU session, in two parts that fail independently:
#   1. benchmarks/gpu.sh (at most BENCH_SECONDS), its tables written to OUT_DIR/gpu_bench.md;
#   2. the embedded model's transformer training resumed from models/shapesworld-moe on the GPU for the time left
#      of TOTAL_SECONDS, then exported; OUT_DIR receives the training log and the exported folder as a tar.gz cut
#      into pieces of at most 15 MiB (rejoin with `cat OUT_DIR/model.tgz.* | tar xz`).
# usage: benchmarks/gpu_session.sh OUT_DIR [TOTAL_SECONDS=520] [BENCH_SECONDS=200 (0: no benchmark)]
# env: INIT_FROM (model folder to resume from), INIT_STEP, BATCH_SIZE, LR
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

if [ "$bench" -gt 0 ]; then
  echo "== benchmark (at most ${bench} s)"
  PYTHON=$python timeout --signal=INT --kill-after=10 "$bench" bash benchmarks/gpu.sh 2>&1 | tee "$out/gpu_bench.md"
fi

budget=$((total - (SECONDS - begin) - 70))
echo "== training for ${budget} s of steps (after $((SECONDS - begin)) s)"
run=/tmp/shapesworld-gpu
rm -rf "$run" /tmp/shapesworld-export
timeout --signal=INT $((budget + 60)) "$python" -m workbench.shapesworld train --stage transformer \
  --init-from "${INIT_FROM:-models/shapesworld-moe}" ${INIT_STEP:+--init-step "$INIT_STEP"} --run "$run" --device cuda --data-workers 12 \
  --batch-size "${BATCH_SIZE:-256}" --lr "${LR:-5e-4}" --steps 1000000 --time-budget "$budget" \
  --checkpoint-every 2000 > "$out/train.log" 2>&1
echo "training exit $?"
tr '\r' '\n' < "$out/train.log" | grep -v '^$' | tail -n 4
cp "$run/transformer.json" "$out/" 2>/dev/null
gzip -c "$run/transformer_log.jsonl" > "$out/transformer_log.jsonl.gz" 2>/dev/null
"$python" -m workbench.shapesworld export --run "$run" --out /tmp/shapesworld-export &&
  tar czf - -C /tmp shapesworld-export | split -b 15m - "$out/model.tgz."
ls -la "$out"
echo "== done in $((SECONDS - begin)) s"
