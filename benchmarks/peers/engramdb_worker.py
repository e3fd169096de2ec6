"""The engramdb side of benchmarks/peers/engramdb_bench.py, run inside engramdb's own virtual environment
(it imports only engramdb and NumPy, never engram-lm): one JSON request per stdin line, one
JSON answer per stdout line.

    {"op": "open", "name": ..., "dir": ..., "shards": S, "rows_per_shard": R, "width": W}
    {"op": "time", "name": ..., "batches": "x.npy", "calls": C}  -> per-call seconds
    {"op": "sha256", "name": ..., "rows": "x.npy"}               -> sha256 of the fetched bytes
    {"op": "close", "name": ...}
"""

import hashlib
import json
import sys
import time

import engramdb
import numpy as np


def main() -> None:
    stores = {}
    for line in sys.stdin:
        req = json.loads(line)
        op, name = req["op"], req.get("name")
        if op == "open":  # a fresh Store: no state of its own carried from an earlier turn
            stores[name] = engramdb.Store(req["dir"], req["shards"], req["rows_per_shard"], req["width"])
            answer = {"total_rows": stores[name].total_rows, "version": engramdb.__version__}
        elif op == "time":
            batches = np.load(req["batches"])  # (calls, rows) int64
            store, seconds = stores[name], []
            for ids in batches:
                ids = ids.tolist()
                t0 = time.perf_counter()
                store.fetch(ids)
                seconds.append(time.perf_counter() - t0)
            answer = {"seconds": seconds}
        elif op == "sha256":
            answer = {"sha256": hashlib.sha256(stores[name].fetch(np.load(req["rows"]).tolist())).hexdigest()}
        elif op == "close":
            stores.pop(name).close()
            answer = {}
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
