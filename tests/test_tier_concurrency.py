"""Every tier from several threads at once, and in a child process after fork(): the rows of the
file, or a clear refusal, never another row. Engines: native AIO and the thread pool."""

import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch

from engram_lm.memory.cache import CachedTable
from engram_lm.memory.codec import encode_rows, row_bytes
from engram_lm.memory.host import HostTable, MmapTable
from engram_lm.memory.prefetch import PrefetchingTable
from engram_lm.memory.ssd import SsdTable
from engram_lm.memory.tiered import TieredTable
from tier_util import hammer

ROWS, DIM = 3000, 16
ENGINES = ["threads", "aio"]


def _file(tmp_path, dtype="fp32"):
    weight = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    path = tmp_path / f"{dtype}.bin"
    encode_rows(weight, dtype).tofile(path)
    return path, MmapTable(path, ROWS, DIM, dtype)


def _table(kind: str, path, engine: str):
    if kind == "ssd":
        return SsdTable(path, ROWS, DIM, "fp32", engine=engine)
    if kind == "tiered":  # a budget of 50 rows: every call admits and evicts
        return TieredTable(path, ROWS, DIM, "fp32", budget_bytes=50 * row_bytes("fp32", DIM), engine=engine)
    raise AssertionError(kind)



def _in_threads(table, reference, threads: int = 4, calls: int = 150) -> list:
    results: list = []

    def work(seed: int) -> None:
        try:
            results.append(hammer(table, reference, calls, seed, rows=ROWS))
        except Exception as exc:  # noqa: BLE001 - any error is a failure of the tier
            results.append(repr(exc))

    workers = [threading.Thread(target=work, args=(s,)) for s in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["ssd", "tiered"])
def test_the_disk_tiers_give_the_files_rows_to_four_threads_at_once(tmp_path, kind, engine):
    path, reference = _file(tmp_path)
    table = _table(kind, path, engine)
    assert _in_threads(table, reference) == [0, 0, 0, 0]  # wrong calls per thread, no exception


def test_the_hot_row_cache_and_the_prefetcher_give_the_files_rows_to_four_threads_at_once(tmp_path):
    path, reference = _file(tmp_path)
    cached = CachedTable(SsdTable(path, ROWS, DIM, "fp32"), 64, admit_after=1)
    assert _in_threads(cached, reference) == [0, 0, 0, 0]
    prefetching = PrefetchingTable(HostTable(reference.gather_host(torch.arange(ROWS))), policy="always")

    def prefetch_then_read(rows):
        prefetching.prefetch(rows)
        return prefetching(rows)

    class Caller:
        def __call__(self, rows):
            return prefetch_then_read(rows)

    assert _in_threads(Caller(), reference) == [0, 0, 0, 0]


def _child(kind: str, path, engine: str, table_holder: list, queue) -> None:
    try:
        table = table_holder[0]
        reference = MmapTable(path, ROWS, DIM, "fp32")
        queue.put(hammer(table, reference, 200, seed=11, rows=ROWS))
    except Exception as exc:  # noqa: BLE001
        queue.put(repr(exc))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["ssd", "tiered"])
def test_a_table_used_before_fork_serves_the_files_rows_in_the_child_and_the_parent(tmp_path, kind, engine):
    """Data loaders, servers and multiprocessing pools fork: the child's table must read its own
    rows (its AIO context, buffers, locks and the tiered store's counters are rebuilt or private)
    while the parent goes on reading at the same time."""
    path, reference = _file(tmp_path)
    table = _table(kind, path, engine)
    assert hammer(table, reference, 50, seed=1, rows=ROWS) == 0  # warm: the store is full, the reader has run
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(kind, path, engine, [table], queue))
    child.start()
    parent_wrong = hammer(table, reference, 200, seed=12, rows=ROWS)  # at the same time as the child
    child_result = queue.get(timeout=120)
    child.join(timeout=60)
    assert (parent_wrong, child_result, child.exitcode) == (0, 0, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_prefetching_table_made_before_fork_prefetches_in_the_child(tmp_path):
    path, reference = _file(tmp_path)
    table = PrefetchingTable(SsdTable(path, ROWS, DIM, "fp32"), policy="always")
    rows = torch.arange(0, ROWS, 7)
    table.prefetch(rows)
    assert torch.equal(table(rows), reference(rows))  # its worker thread exists in the parent
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        try:
            table.prefetch(rows)  # the parent's worker thread does not exist here
            queue.put(bool(torch.equal(table(rows), reference(rows))))
        except Exception as exc:  # noqa: BLE001
            queue.put(repr(exc))

    proc = ctx.Process(target=child)
    proc.start()
    assert queue.get(timeout=60) is True
    proc.join(timeout=60)
    assert proc.exitcode == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_an_empty_call_returns_no_rows(tmp_path, engine):
    path, reference = _file(tmp_path)
    for table in (_table("ssd", path, engine), _table("tiered", path, engine), reference):
        out = table(torch.zeros(2, 0, dtype=torch.int64))
        assert out.shape == (2, 0, DIM)
