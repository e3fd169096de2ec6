#!/usr/bin/env bash
# GPU check (run on a CUDA machine, < 8 minutes): the CUDA paths of the memory tiers.
#  1. pinned host table + side-stream prefetch + cache return the device table's rows, and a
#     prefetched forward equals the synchronous one bit for bit (tests/test_gpu.py);
#  2. the offload benchmark on the GPU, tables in pinned host RAM vs mmap (+prefetch, +cache).
# Usage: bash benchmarks/gpu_check.sh   (writes $OUT/ or ./gpu_check/ with the JSON results)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pip install -q -e . 2>/dev/null || true
python -m pytest -q tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt"
timeout 360 engram bench offload --device cuda --table-gb 8 --json | tee "$out/offload_cuda.json"
