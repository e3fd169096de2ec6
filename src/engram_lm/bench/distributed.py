"""`engram bench distributed`: the cost of a row-sharded table's all-to-all exchanges.

For P = 1, 2, 4 processes on this machine (gloo over loopback, one thread each), every
rank looks up a training batch of rows (B x T x hash columns) in a ShardedTable and runs
the backward (rows out, gradients back); the median time per step and the bytes each rank
sent are reported next to the same lookup+backward on an unsharded table in one process.
With more processes than cores the times include oversubscription: read them as upper
bounds on this 2-core machine.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engram_lm.distributed.context import init_process_group
from engram_lm.distributed.sharded_table import ShardedTable


def _rows(rank: int, step: int, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, rows, shape, generator=torch.Generator().manual_seed(1000 * step + rank))


def _worker(rank: int, world: int, init: str, out: str, rows: int, dim: int, shape, steps: int) -> None:
    torch.set_num_threads(1)
    init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        table = ShardedTable(rows, dim)
        times = []
        for step in range(steps + 2):
            ids = _rows(rank, step, rows, shape)
            before = table.bytes_sent
            t0 = time.perf_counter()
            table(ids).sum().backward()
            elapsed = time.perf_counter() - t0
            sent = table.bytes_sent - before
            table.weight.grad = None
            if step >= 2:
                times.append(elapsed)
        torch.save({"ms": 1e3 * statistics.median(times), "bytes": sent}, os.path.join(out, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sharded(world: int, rows: int, dim: int, shape, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, rows, dim, shape, steps), nprocs=world)
        per_rank = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]
    return {"processes": world, "step_ms": max(r["ms"] for r in per_rank),
            "bytes_sent_per_rank": max(r["bytes"] for r in per_rank)}  # fmt: skip


def _unsharded(rows: int, dim: int, shape, steps: int) -> float:
    torch.set_num_threads(1)
    weight = torch.nn.Parameter(torch.zeros(rows, dim))
    times = []
    for step in range(steps + 2):
        ids = _rows(0, step, rows, shape)
        t0 = time.perf_counter()
        F.embedding(ids, weight, sparse=True).sum().backward()
        weight.grad = None
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_distributed(worlds=(1, 2, 4), rows: int = 1 << 20, dim: int = 32, batch: int = 16, seq: int = 128,
                      columns: int = 8, steps: int = 10) -> dict:  # fmt: skip
    shape = (batch, seq, columns)
    results = [_sharded(w, rows, dim, shape, steps) for w in worlds]
    return {"rows": rows, "dim": dim, "ids_per_rank": batch * seq * columns, "unsharded_step_ms": _unsharded(rows, dim, shape, steps),
            "configs": results, "cpus": os.cpu_count()}  # fmt: skip
