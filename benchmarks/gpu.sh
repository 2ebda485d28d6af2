#!/usr/bin/env bash
# GPU benchmark (at most 8 minutes): full-size SD3-Medium with random bf16 weights on one CUDA device.
# One guided step at 1024²: ours eager / compiled / fp8 / with step caching (0.2) vs diffusers eager and diffusers +
# torch.compile on the same weights (s/step, % of the chip's peak bf16, peak memory, compile time, velocity error vs
# bf16 eager); then peak GPU memory for bf16 / int8 / nf4 transformers and a pipeline call with and without offload,
# as far as the internal time budget (--budget, 420 s) allows. Writes gpu_bench.md under $OUT (or --out DIR).
# Installs nothing. Needs a Python with torch (CUDA), transformers, safetensors; diffusers, torchao (fp8) and
# bitsandbytes rows are skipped without them. Extra arguments go to benchmarks/gpu_bench.py (e.g. --repeats 5,
# --sections accel, --mode max-autotune-no-cudagraphs). Smoke test without a GPU: gpu_bench.py --tiny --device cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
export PYTHONUNBUFFERED=1
exec timeout --signal=INT --kill-after=20 470 "$PYTHON" benchmarks/gpu_bench.py "$@"
