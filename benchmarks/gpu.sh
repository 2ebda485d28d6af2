#!/usr/bin/env bash
# GPU benchmark (at most 8 minutes): full-size SD3-Medium with random bf16 weights on one CUDA device.
# Prints it/s at 1024² with guidance for ours and diffusers, the fraction of the chip's peak bf16 throughput, peak GPU
# memory for bf16 / int8 / nf4 transformers and for a pipeline call without offload, with model offload and with
# sequential offload. Installs nothing and writes nothing outside the temporary directory of the Python process.
# Needs a Python with torch (CUDA), transformers, safetensors; diffusers and bitsandbytes rows are skipped without them.
# Extra arguments go to benchmarks/gpu_bench.py (e.g. --repeats 5, --sections speed).
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
