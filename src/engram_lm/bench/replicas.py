"""`engram bench replicas`: several processes serving one table, each with its own tiered store,
all with one shared store, or through the page cache (mmap): memory and speed side by side.

Every process reads the same Zipf(1.1) row distribution (the same rows hot for every replica,
as for replicas of one model), its own sample of it. Phases, each started together (a barrier):
  cold    the file's pages dropped (and the shared store new) before the processes start: the
          first `calls` decode-sized calls (16 rows) and prefill-sized calls (4,096 rows)
  warm    the same again, each call timed: rows/s, p50/p99 per decode call
  memory  while every process is alive: each one's proportional set size (PSS: a shared page
          counts 1/N in each of its N mappers), summed
Then the hit rate a newcomer sees: one process warms a fresh store alone, a second then reads
its own sample (shared: the first one's rows are hits for it; private: it starts empty).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_lm.memory.codec import encode_rows, row_bytes

MODES = ("private", "shared", "mmap")
DECODE_ROWS, PREFILL_ROWS = 16, 4096


def zipf_rows(num_rows: int, size: int, seed: int, a: float = 1.1) -> np.ndarray:
    """Row ids whose popularity follows Zipf(a) by a rank -> row map fixed for every process."""
    ranks = np.minimum(np.random.default_rng(seed).zipf(a, size=size), num_rows) - 1
    return (ranks * 2_654_435_761 + 12_345) % num_rows  # a fixed scatter of ranks over the table


def open_table(mode: str, path: Path, rows: int, dim: int, dtype: str, budget: int, sha: str, shm: Path | None = None):
    if mode == "mmap":
        from engram_lm.memory.host import MmapTable

        return MmapTable(path, rows, dim, dtype)
    if mode == "shared":
        from engram_lm.memory.shared_tiered import SharedTieredTable

        kwargs = {"shm": shm} if shm is not None else {}
        return SharedTieredTable(path, rows, dim, dtype, budget_bytes=budget, content_sha256=sha, **kwargs)
    from engram_lm.memory.tiered import TieredTable

    return TieredTable(path, rows, dim, dtype, budget_bytes=budget)


def pss_bytes() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _run_calls(table, rows: np.ndarray, size: int, calls: int) -> list[float]:
    seconds = []
    for k in range(calls):
        ids = torch.from_numpy(rows[k * size : (k + 1) * size].astype(np.int64))
        t0 = time.perf_counter()
        table.gather_host(ids)
        seconds.append(time.perf_counter() - t0)
    return seconds


def _worker(mode, path, rows, dim, dtype, budget, sha, seed, calls, shm, barrier, queue) -> None:
    try:
        torch.set_num_threads(1)
        base = pss_bytes()  # the interpreter and its libraries, before the table
        table = open_table(mode, path, rows, dim, dtype, budget, sha, shm)
        stream = zipf_rows(rows, 2 * calls * (DECODE_ROWS + PREFILL_ROWS), seed)
        half = calls * (DECODE_ROWS + PREFILL_ROWS)
        out: dict[str, Any] = {}
        for phase, part in (("cold", stream[:half]), ("warm", stream[half:])):
            barrier.wait(timeout=600)
            decode = _run_calls(table, part, DECODE_ROWS, calls)
            prefill = _run_calls(table, part[calls * DECODE_ROWS :], PREFILL_ROWS, calls)
            out[phase] = {"decode_rows_s": calls * DECODE_ROWS / sum(decode), "prefill_rows_s": calls * PREFILL_ROWS / sum(prefill),
                          "decode_p50_ms": 1e3 * statistics.median(decode),
                          "decode_p99_ms": 1e3 * float(np.quantile(decode, 0.99))}  # fmt: skip
        barrier.wait(timeout=600)
        out["pss_bytes"], out["table_pss_bytes"] = pss_bytes(), pss_bytes() - base
        out["hit_rate"] = getattr(table, "hit_rate", None)
        barrier.wait(timeout=600)  # every process measured its memory while all were alive
        table.close()
        queue.put(out)
    except Exception as exc:  # noqa: BLE001 - said by the driver
        barrier.abort()
        queue.put({"error": repr(exc)})


def _newcomer(mode, path, rows, dim, dtype, budget, sha, calls, shm, queue) -> None:
    """Warm a fresh store alone (seed 0), then a second process reads its own sample (seed 1)."""
    try:
        torch.set_num_threads(1)
        first = open_table(mode, path, rows, dim, dtype, budget, sha, shm)
        _run_calls(first, zipf_rows(rows, calls * PREFILL_ROWS, 0), PREFILL_ROWS, calls)
        ctx = multiprocessing.get_context("spawn")
        inner = ctx.Queue()
        second = ctx.Process(target=_second, args=(mode, path, rows, dim, dtype, budget, sha, calls, shm, inner))
        second.start()
        result = inner.get(timeout=600)
        second.join(timeout=60)
        first.close()
        queue.put(result)
    except Exception as exc:  # noqa: BLE001
        queue.put({"error": repr(exc)})


def _second(mode, path, rows, dim, dtype, budget, sha, calls, shm, queue) -> None:
    table = open_table(mode, path, rows, dim, dtype, budget, sha, shm)
    _run_calls(table, zipf_rows(rows, calls * DECODE_ROWS, 1), DECODE_ROWS, calls)
    queue.put({"newcomer_hit_rate": table.hit_rate})
    table.close()


def _evict(path: Path) -> None:
    from engram_lm.bench.offload import _evict as evict

    evict(path)


def table_file(table: str, table_gb: float, dim: int, folder: Path) -> tuple[Path, int, int, str]:
    """(file, rows, dim, dtype): random fp32 rows of `table_gb` GB, or the Qwen3.8 n-gram table at its real
    size (engram bench real-table's file, reused when `folder` holds it)."""
    if table == "qwen3.8":
        from engram_lm.bench.real_table import DTYPE, table_layout, write_random_fp8_table

        layout, dim = table_layout("qwen3.8")
        path = folder / f"qwen3.8-ngram-table-{DTYPE}.bin"
        if not path.exists() or path.stat().st_size != layout.padded_rows * row_bytes(DTYPE, dim):
            write_random_fp8_table(path, layout.padded_rows, dim)
        return path, layout.padded_rows, dim, DTYPE
    rows = int(table_gb * 1e9 / row_bytes("fp32", dim))
    path = folder / "table.bin"
    g = torch.Generator().manual_seed(0)
    with path.open("wb") as f:
        for start in range(0, rows, 1 << 20):
            f.write(encode_rows(torch.randn(min(1 << 20, rows - start), dim, generator=g), "fp32").tobytes())
    return path, rows, dim, "fp32"


def bench_replicas(*, table_gb: float = 1.0, processes: int = 4, budget_gb: float = 0.25, dim: int = 64,
                   calls: int = 200, workdir: Path | None = None, modes: tuple[str, ...] = MODES,
                   shm: Path | None = None, table: str = "random") -> dict[str, Any]:  # fmt: skip
    """Every mode with `processes` processes on one table (`table_gb` GB of random rows, or "qwen3.8") and a
    budget of `budget_gb` GB."""
    if processes < 1 or calls < 1:
        raise ValueError(f"--processes {processes} and --calls {calls}: give 1 or more of each")
    budget = int(budget_gb * 1e9)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path, rows, dim, dtype = table_file(table, table_gb, dim, Path(workdir or tmp) if table == "qwen3.8" else Path(tmp))
        st = path.stat()  # the store's name: this very file (hashing 52.8 GB would take minutes)
        sha = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        result: dict[str, Any] = {"table": table, "table_gb": rows * row_bytes(dtype, dim) / 1e9, "rows": rows, "dim": dim,
                                  "dtype": dtype, "budget_gb": budget / 1e9, "processes": processes, "calls": calls,
                                  "modes": {}}  # fmt: skip
        for mode in modes:
            _evict(path)
            barrier, queue = ctx.Barrier(processes), ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(mode, path, rows, dim, dtype, budget, sha, seed, calls, shm, barrier,
                                                       queue)) for seed in range(processes)]  # fmt: skip
            for p in procs:
                p.start()
            outs = [queue.get(timeout=3600) for _ in procs]
            for p in procs:
                p.join(timeout=60)
            errors = [o["error"] for o in outs if "error" in o]
            if errors:
                raise RuntimeError(f"a {mode} process failed: {errors[0]}")
            result["modes"][mode] = {"total_pss_gb": sum(o["pss_bytes"] for o in outs) / 1e9,
                                     "table_pss_gb": sum(o["table_pss_bytes"] for o in outs) / 1e9, "processes": outs,
                                     **{f"{phase}_{k}": statistics.median(o[phase][k] for o in outs)
                                        for phase in ("cold", "warm") for k in outs[0][phase]}}  # fmt: skip
            if mode != "mmap":
                queue = ctx.Queue()
                p = ctx.Process(target=_newcomer, args=(mode, path, rows, dim, dtype, budget, sha, calls, shm, queue))
                p.start()
                result["modes"][mode].update(queue.get(timeout=3600))
                p.join(timeout=60)
    shared, private = result["modes"].get("shared"), result["modes"].get("private")
    if shared and private:
        result["shared_vs_private"] = {k: shared[k] / private[k] for k in shared if k.startswith(("cold_", "warm_"))
                                       and "rows_s" in k} | {"table_pss": shared["table_pss_gb"] / private["table_pss_gb"]}  # fmt: skip
    return result
