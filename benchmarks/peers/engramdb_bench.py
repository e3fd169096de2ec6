"""engram-lm's table tiers side by side with engramdb (`engramdb-python`, a Rust disk store for
Engram/PLE tables), on one table file both read. Run it with benchmarks/peers/run_engramdb.sh,
which puts engramdb in its own virtual environment (never engram-lm's dependency):

    bash benchmarks/peers/run_engramdb.sh --gib 4 --turns 6 --json results/bench/peers-engramdb.json

What it does, on a quiet machine:
- writes a table of 256-byte rows (fp32, dim 64) of random bytes once, as one file and as
  engramdb's 128-shard layout (row r in shard r // rows_per_shard: the same file cut in 128);
- checks that every contender returns identical bytes for the same ids;
- times the same row-id batches, uniform and Zipf(1.1) (ranks scattered over the file), at
  decode sizes (16, 64, 128, 512 rows a call: 1, 4, 8, 32 sequences x 16 rows) and prefill
  (24,576 rows a call), cold (page cache dropped with posix_fadvise(DONTNEED) before each
  contender's run, fincore showing what stays resident; our tiers and engramdb's stores opened
  afresh, so no cache of their own survives) and warm (the same batches once before timing);
- in alternating turns (each turn starts with another contender), reporting per row the median
  rows/s over turns with its range, per-call p50/p99, and each turn's ratio of the tiered tier
  to the best other contender;
- fio's random 4 KiB read rate at depth 1 and 32 on the same file (O_DIRECT, libaio), when fio is
  installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engram_lm.memory.host import MmapTable
from engram_lm.memory.ssd import SsdTable
from engram_lm.memory.tiered import table_budgets, tiered_table

WIDTH, DIM, SHARDS = 256, 64, 128
SIZES = {"decode b1": 16, "decode (64)": 64, "decode b8": 128, "decode b32": 512, "prefill": 24_576}
CALLS = {"decode b1": 200, "decode (64)": 200, "decode b8": 100, "decode b32": 50, "prefill": 2}
OURS = ("engram-lm mmap", "engram-lm ssd", "engram-lm tiered")
PEERS = ("engramdb 128 shards", "engramdb 1 file")


def write_table(root: Path, rows: int) -> tuple[Path, Path]:
    """one/shard_000.bin (the whole table) and sharded/shard_NNN.bin (its 128 consecutive parts), written once."""
    one, sharded = root / "one", root / "sharded"
    whole = one / "shard_000.bin"
    if whole.exists() and whole.stat().st_size == rows * WIDTH and (sharded / f"shard_{SHARDS - 1:03d}.bin").exists():
        return one, sharded
    one.mkdir(parents=True, exist_ok=True)
    sharded.mkdir(parents=True, exist_ok=True)
    per = rows // SHARDS
    rng = np.random.default_rng(0)
    with open(whole, "wb") as f:
        for s in range(SHARDS):
            part = rng.integers(0, 256, size=per * WIDTH, dtype=np.uint8).tobytes()
            f.write(part)
            (sharded / f"shard_{s:03d}.bin").write_bytes(part)
    return one, sharded


def drop_cache(paths: list[Path]) -> int:
    """posix_fadvise(DONTNEED) on every file; returns the bytes fincore still finds resident."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if not shutil.which("fincore"):
        return -1
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return sum(int(x) for x in out.split())


def batches_for(dist: str, size: int, calls: int, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        return rng.integers(0, rows, size=(calls, size), dtype=np.int64)
    ranks = (rng.zipf(1.1, size=(calls, size)) - 1) % rows
    return (ranks * 2_654_435_761) % rows  # the popular ranks scattered over the file (an odd multiplier: a bijection)


class Peer:
    """engramdb in its own interpreter (benchmarks/peers/engramdb_worker.py)."""

    def __init__(self, python: str) -> None:
        worker = Path(__file__).with_name("engramdb_worker.py")
        self.proc = subprocess.Popen([python, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Contenders:
    def __init__(self, one: Path, sharded: Path, rows: int, peer: Peer | None, scratch: Path) -> None:
        self.one, self.sharded, self.rows, self.peer, self.scratch = one, sharded, rows, peer, scratch
        self.names = OURS + (PEERS if peer else ())
        self.budget = table_budgets(None, "fp32", [(rows, DIM)])[0]  # what a user gets by default
        self.tables: dict[str, object] = {}

    def files(self, name: str) -> list[Path]:
        if name == "engramdb 128 shards":
            return sorted(self.sharded.glob("shard_*.bin"))
        return [self.one / "shard_000.bin"]

    def open(self, name: str) -> None:
        path = self.one / "shard_000.bin"
        if name == "engram-lm mmap":
            self.tables[name] = MmapTable(path, self.rows, DIM, "fp32")
        elif name == "engram-lm ssd":
            self.tables[name] = SsdTable(path, self.rows, DIM, "fp32")
        elif name == "engram-lm tiered":
            self.tables[name] = tiered_table(path, self.rows, DIM, "fp32", budget_bytes=self.budget)
        else:
            folder, shards = (self.sharded, SHARDS) if "128" in name else (self.one, 1)
            self.peer.ask(op="open", name=name, dir=str(folder), shards=shards, rows_per_shard=self.rows // shards,
                          width=WIDTH)  # fmt: skip

    def close(self, name: str) -> None:
        if name in self.tables:
            self.tables.pop(name).close()
        else:
            self.peer.ask(op="close", name=name)

    def time(self, name: str, batches: np.ndarray) -> list[float]:
        if name in self.tables:
            table, seconds = self.tables[name], []
            for ids in torch.from_numpy(batches):
                t0 = time.perf_counter()
                table(ids)
                seconds.append(time.perf_counter() - t0)
            return seconds
        path = self.scratch / "batches.npy"
        np.save(path, batches)
        return self.peer.ask(op="time", name=name, batches=str(path), calls=len(batches))["seconds"]

    def sha256(self, name: str, ids: np.ndarray) -> str:
        if name in self.tables:
            return hashlib.sha256(self.tables[name](torch.from_numpy(ids)).numpy().tobytes()).hexdigest()
        path = self.scratch / "check.npy"
        np.save(path, ids)
        return self.peer.ask(op="sha256", name=name, rows=str(path))["sha256"]


def fio_rates(path: Path, seconds: int) -> dict[str, float]:
    """fio's random 4 KiB O_DIRECT read IOPS at depth 1 and 32 on `path` (empty without fio)."""
    if not shutil.which("fio"):
        return {}
    rates = {}
    for depth in (1, 32):
        out = subprocess.run(["fio", "--name=peers", f"--filename={path}", "--rw=randread", "--bs=4k", "--direct=1",
                              "--ioengine=libaio", f"--iodepth={depth}", f"--runtime={seconds}", "--time_based",
                              "--output-format=json"], capture_output=True, text=True, check=True).stdout  # fmt: skip
        rates[f"depth {depth}"] = json.loads(out)["jobs"][0]["read"]["iops"]
    return rates


def run(args: argparse.Namespace) -> dict:
    root = Path(args.workdir)
    rows = (int(args.gib * 2**30) // WIDTH) // SHARDS * SHARDS
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if not (root / "one" / "shard_000.bin").exists() and free < 2 * rows * WIDTH + (1 << 30):
        raise SystemExit(f"{root} has {free / 2**30:.1f} GiB free; the two copies of a {args.gib} GiB table need "
                         f"{2 * rows * WIDTH / 2**30:.1f} GiB: choose --workdir on a larger disk or a smaller --gib")  # fmt: skip
    one, sharded = write_table(root, rows)
    peer = Peer(args.peer_python) if args.peer_python else None
    c = Contenders(one, sharded, rows, peer, root)
    check = np.concatenate([batches_for("uniform", 999, 1, rows, 99)[0], [rows - 1]])
    sums = {}
    for name in c.names:
        c.open(name)
        sums[name] = c.sha256(name, check)
        c.close(name)
    if len(set(sums.values())) != 1:
        raise SystemExit(f"the contenders returned different bytes for the same ids: {sums}")
    workloads = [(d, s) for d in ("uniform", "zipf") for s in SIZES]
    times: dict[tuple, list[list[float]]] = {}
    resident: list[int] = []
    for turn in range(args.turns):
        order = c.names[turn % len(c.names):] + c.names[: turn % len(c.names)]
        for w, (dist, size) in enumerate(workloads):
            batches = batches_for(dist, SIZES[size], CALLS[size], rows, seed=1000 * turn + w)
            for name in order:
                for state in ("cold", "warm"):
                    if state == "cold":
                        resident.append(drop_cache(c.files(name)))
                    c.open(name)
                    if state == "warm":
                        c.time(name, batches)  # the warm-up: page cache, or the tier's own store
                    times.setdefault((dist, size, state, name), []).append(c.time(name, batches))
                    c.close(name)
        print(f"turn {turn + 1}/{args.turns} done", file=sys.stderr, flush=True)
    if peer:
        peer.close()
    return summarise(times, rows, c, fio_rates(one / "shard_000.bin", args.fio_seconds), resident, sums)


def summarise(times, rows, c: Contenders, fio, resident, sums) -> dict:
    table = []
    for (dist, size, state, name), turns in times.items():
        per_turn = [SIZES[size] * len(s) / sum(s) for s in turns]
        calls = [x for s in turns for x in s]
        table.append({"dist": dist, "size": size, "rows_per_call": SIZES[size], "state": state, "contender": name,
                      "rows_per_s_median": statistics.median(per_turn), "rows_per_s_min": min(per_turn),
                      "rows_per_s_max": max(per_turn), "per_turn": per_turn,
                      "p50_ms": float(np.percentile(calls, 50) * 1e3), "p99_ms": float(np.percentile(calls, 99) * 1e3)})  # fmt: skip
    for row in table:  # the tiered tier against the best other contender, turn by turn
        if row["contender"] != "engram-lm tiered":
            continue
        others = [r for r in table if (r["dist"], r["size"], r["state"]) == (row["dist"], row["size"], row["state"])
                  and r["contender"] != row["contender"]]  # fmt: skip
        best = [max(r["per_turn"][t] for r in others) for t in range(len(row["per_turn"]))]
        row["vs_best_other_per_turn"] = [a / b for a, b in zip(row["per_turn"], best)]
        row["best_other"] = max(others, key=lambda r: r["rows_per_s_median"])["contender"]
    return {"rows": rows, "row_bytes": WIDTH, "table_gib": rows * WIDTH / 2**30, "budget_bytes": c.budget,
            "contenders": list(c.names), "fio_iops": fio, "resident_after_drop_max_bytes": max(resident),
            "identical_bytes": len(set(sums.values())) == 1, "results": table}  # fmt: skip


def markdown(result: dict) -> str:
    names = result["contenders"]
    lines = ["| rows/s (median over turns) | " + " | ".join(names) + " | tiered / best other (per-turn range) |",
             "|---" * (len(names) + 2) + "|"]
    rows = {(r["dist"], r["size"], r["state"], r["contender"]): r for r in result["results"]}
    for dist in ("uniform", "zipf"):
        for size in SIZES:
            for state in ("cold", "warm"):
                cells = [rows[(dist, size, state, n)] for n in names]
                tiered = rows[(dist, size, state, "engram-lm tiered")]
                ratio = tiered["vs_best_other_per_turn"]
                lines.append(f"| {dist} {size} {state} | " + " | ".join(
                    f"{r['rows_per_s_median'] / 1e3:,.1f}k" for r in cells) +
                    f" | {statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) vs {tiered['best_other']} |")  # fmt: skip
    lines += ["", "| per-call latency, ms (p50 / p99) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for dist in ("uniform", "zipf"):
        for size in SIZES:
            for state in ("cold", "warm"):
                lines.append(f"| {dist} {size} ({SIZES[size]} rows) {state} | " + " | ".join(
                    f"{rows[(dist, size, state, n)]['p50_ms']:.3f} / {rows[(dist, size, state, n)]['p99_ms']:.3f}"
                    for n in names) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/engram-peers", help="where the two copies of the table are written")
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--peer-python", help="the python of engramdb's virtual environment (run_engramdb.sh sets it)")
    ap.add_argument("--fio-seconds", type=int, default=10)
    ap.add_argument("--json", help="write the full result here")
    args = ap.parse_args()
    result = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"table: {result['rows']:,} rows x {WIDTH} B = {result['table_gib']:.2f} GiB; tiered budget "
          f"{result['budget_bytes'] / 2**30:.2f} GiB; identical bytes: {result['identical_bytes']}; fio IOPS: "
          f"{result['fio_iops']}; resident after each drop at most {result['resident_after_drop_max_bytes']:,} bytes")  # fmt: skip
    print(markdown(result))


if __name__ == "__main__":
    main()
