#!/usr/bin/env bash
# One prepared command for a lent GPU machine (the device tool), under 10 minutes:
#   1. the gpu-marked tests: GPU == CPU in float64, nccl DDP on 2 GPUs (skipped on 1), model parallel on
#      cuda:0,cuda:0 == [cpu, cpu], real CUDA OOM recovery,
#      16-mixed and bf16-mixed (with EMA and flip TTA), the DDP OOM agreement on CUDA;
#   2. images/s at batch 128: the source notes' loop (DataLoader + ToTensor) vs trainrig (batches on the GPU);
#   3. the 3-epoch recipe's time to 91.5% test accuracy (configs/fashion_resnet18_3epochs.yaml, seed 0);
#   4. FSDP vs DDP per-rank memory (parameters + gradients + optimizer state, CUDA peak) and throughput for
#      ResNet50 and ViT-B/16 at 1, 2 (and 4) GPUs (benchmarks/fsdp_memory.py);
#   5. model.compile: images/s with and without it, bf16-mixed, and what compiling costs (compile_speed.py).
# The device machine has python3 with torch, torchvision, typer, rich, pyyaml, pytest but no internet and no
# FashionMNIST: copy the four files into ./data (ignored by git) and carry it:
#   mkdir -p data && cp /usr/share/datasets/fashion-mnist/* data/
#   device run: command "bash benchmarks/gpu_check.sh", carry ["data"]
# Everything printed also goes to $OUT/gpu_check.md (when OUT is set): paste it into benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRAINRIG_DATA="$PWD/data"
LOG="${OUT:-/tmp}/gpu_check.md"
{
  echo "## GPU check ($(date -u +%F))"
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  echo "--- pytest -m gpu"
  timeout 200 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15
  echo "--- throughput, batch 128 (plain loop vs trainrig)"
  timeout 70 $PY benchmarks/throughput.py --threads 8 --batch-sizes 128 --images 25600 2>&1 | tail -n 3
  echo "--- time to 91.5% (3-epoch recipe, seed 0)"
  timeout 120 $PY benchmarks/time_to_accuracy.py --config configs/fashion_resnet18_3epochs.yaml --seeds 0 \
    --targets 91.5 92.5 --set data.root=data \
    --set threads=8 2>&1 | tail -n 8
  echo "--- FSDP vs DDP memory per rank and throughput"
  timeout 120 $PY benchmarks/fsdp_memory.py --batch 32 --steps 5 2>&1 | grep -v '^\[{' | tail -n 14
  echo "--- model.compile, bf16-mixed"
  timeout 90 $PY benchmarks/compile_speed.py --precisions bf16-mixed --images 6400 2>&1 | tail -n 4
  echo '```'
} 2>&1 | tee "$LOG"
