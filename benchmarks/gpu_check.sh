#!/usr/bin/env bash
# One prepared command for a lent GPU machine: the gpu-marked tests, then training throughput.
# Usage (repository root): bash benchmarks/gpu_check.sh   -> results to paste into benchmarks/RESULTS.md
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
.venv/bin/python -m pytest -m gpu -q -x tests/test_gpu.py 2>&1 | tail -n 20
.venv/bin/python benchmarks/throughput.py --threads 8 --images 7680 2>&1 | tail -n 5
