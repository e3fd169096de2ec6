#!/usr/bin/env bash
# engram-lm's tiers side by side with engramdb-python (benchmarks/peers/engramdb_bench.py). engramdb goes in
# its own virtual environment (.peers/engramdb), never in engram-lm's; run from the repository root with
# engram-lm's environment active, on a quiet machine (nothing else running):
#   bash benchmarks/peers/run_engramdb.sh --gib 4 --turns 6 --json results/bench/peers-engramdb.json
set -euo pipefail
PEER=.peers/engramdb
if [ ! -x "$PEER/bin/python" ]; then
  python3 -m venv "$PEER"
  "$PEER/bin/pip" install -q "engramdb-python==0.3.0" numpy
fi
python benchmarks/peers/engramdb_bench.py --peer-python "$PEER/bin/python" "$@"
