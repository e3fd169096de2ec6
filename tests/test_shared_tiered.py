"""The tiered tier's store shared by processes (memory/shared_store.py, memory/shared_tiered.py): rows equal
the file's under concurrent access from several processes with evictions forced, a process killed mid-admission
leaves the store consistent for the others, the last one out removes it, mismatches and a full /dev/shm refused."""

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch

from engram_lm.memory.codec import encode_rows, row_bytes
from engram_lm.memory.host import MmapTable
from engram_lm.memory.shared_store import APPLYING, SharedRowStore, store_name
from engram_lm.memory.shared_tiered import SharedTieredTable
from tier_util import hammer

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the shared store registers processes by /proc")

ROWS, DIM, KEY = 3000, 16, "0123456789abcdef" * 4


def _file(folder):
    path = folder / "table.bin"
    if not path.exists():
        encode_rows(torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0)), "fp32").tofile(path)
    return path


def _open(folder, budget_rows=50, **kw):
    return SharedTieredTable(_file(folder), ROWS, DIM, "fp32", budget_bytes=budget_rows * row_bytes("fp32", DIM),
                             content_sha256=KEY, shm=folder / "shm", **kw)  # fmt: skip



def _serve(folder, seed: int, calls: int, queue) -> None:
    """A process of its own: open the shared table, read at random, report the wrong calls and its counters."""
    try:
        table = _open(folder)
        wrong = hammer(table, MmapTable(_file(folder), ROWS, DIM, "fp32"), calls, seed, rows=ROWS)
        queue.put((wrong, table.hits, table.misses))
        table.close()
    except Exception as exc:  # noqa: BLE001
        queue.put(repr(exc))


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "shm").mkdir()
    return tmp_path


def test_four_processes_read_the_files_rows_through_one_store_with_evictions(folder):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(folder, seed, 150, queue)) for seed in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(not isinstance(r, str) for r in results), results
    assert [r[0] for r in results] == [0, 0, 0, 0] and all(r[1] > 0 for r in results)  # right rows; hits for each
    assert list((folder / "shm").iterdir()) == []  # the last one out removed the store and its lock file


def test_a_row_admitted_by_one_process_is_a_hit_for_another(folder):
    first = _open(folder)
    first(torch.tensor([5, 7, 9]))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_once, args=(folder, [5, 7, 9], queue))
    proc.start()
    assert queue.get(timeout=120) == (3, 0)  # (hits, misses) in a process that never read these rows itself
    proc.join(timeout=60)
    first.close()


def _read_once(folder, rows, queue) -> None:
    table = _open(folder)
    table(torch.tensor(rows))
    queue.put((table.hits, table.misses))
    table.close()


def _die_mid_admission(folder, queue, dying) -> None:
    """Admit rows and be killed (SIGKILL) with half of the new rows written: seq odd, journal applying."""
    try:
        table = _open(folder, budget_rows=200)
    except Exception as exc:  # noqa: BLE001
        queue.put(repr(exc))
        return

    def fill(slots, rows, raw):
        table.shared.begin(slots, rows)
        table.seq[slots] += 1
        half = len(slots) // 2
        table.store[slots[:half]] = 0xAB  # garbage where rows were to be
        table.row_in[slots[:half]] = rows[:half]
        table.slot_of[rows[:half]] = slots[:half]
        dying.set()  # synchronous, unlike a queue's feeder thread, which a SIGKILL would cut short
        os.kill(os.getpid(), signal.SIGKILL)

    table._fill = fill
    table(torch.arange(2000, 2040))


def test_a_process_killed_mid_admission_leaves_the_store_consistent_for_the_others(folder):
    reference = MmapTable(_file(folder), ROWS, DIM, "fp32")
    survivor = _open(folder, budget_rows=200)
    assert hammer(survivor, reference, 20, seed=1, rows=ROWS) == 0
    ctx = multiprocessing.get_context("spawn")
    queue, dying = ctx.Queue(), ctx.Event()
    victim = ctx.Process(target=_die_mid_admission, args=(folder, queue, dying))
    victim.start()
    victim.join(timeout=120)
    assert dying.is_set(), queue.get(timeout=5)
    assert victim.exitcode == -signal.SIGKILL
    assert int(survivor.shared.header["journal_state"][0]) == APPLYING  # what the dead writer left
    rows = torch.arange(2000, 2040)
    assert torch.equal(survivor(rows), reference(rows))  # its half-written slots read as misses, never served
    assert int(survivor.shared.header["journal_state"][0]) == 0  # the next admission repaired the store first
    assert hammer(survivor, reference, 100, seed=2, rows=ROWS) == 0
    assert survivor.hits > 0
    survivor.close()
    assert list((folder / "shm").iterdir()) == []  # the dead process did not keep the store alive


def test_another_budget_while_the_store_is_in_use_is_refused_naming_both(folder):
    first = _open(folder, budget_rows=50)
    with pytest.raises(ValueError, match="holds this table as rows 3000, budget 50 rows .* asks for rows 3000, budget 60 rows"):
        _open(folder, budget_rows=60)
    first.close()
    again = _open(folder, budget_rows=60)  # nobody uses the old one: it is rebuilt with the new budget
    assert again.capacity == 60
    again.close()


def test_a_full_dev_shm_is_refused_before_anything_is_mapped(folder, monkeypatch):
    import engram_lm.memory.shared_store as shared_store

    real = os.statvfs

    class Small:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(shared_store.os, "statvfs", lambda p: Small() if str(p).endswith("shm") else real(p))
    with pytest.raises(ValueError, match=r"has 0 MiB free, the shared store needs \d+ MiB .* smaller budget"):
        _open(folder)
    assert list((folder / "shm").iterdir()) == []


def test_a_store_left_half_built_is_rebuilt_and_a_dead_owners_store_reused(folder):
    store = SharedRowStore(store_name(KEY), ROWS, 10, 64, "fp32", folder=folder / "shm")
    store.header["ready"] = 0  # as if its creator died while building it
    store.header["procs"][0][:] = 0
    path = store.path  # the old mapping stays with `store`, never closed: a crashed creator's
    table = _open(folder, budget_rows=10)  # rebuilt, not served
    assert int(table.shared.header["ready"][0]) == 1 and table.used == 0 and path.exists()
    table.close()


def test_generate_with_a_shared_tiered_tier_gives_the_same_tokens_and_leaves_nothing_in_dev_shm(tmp_path, capsys):
    import json
    from pathlib import Path

    from engram_lm.cli import main

    folder = Path("/dev/shm")
    before = {p.name for p in folder.glob("engram-lm-*")}
    assert main(["train", "--preset", "tiny", "--steps", "3", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    prompt = ["--checkpoint", str(tmp_path / "run"), "--prompt", "In the beginning", "--max-new-tokens", "5", "--json"]
    capsys.readouterr()
    assert main(["generate", *prompt]) == 0
    want = json.loads(capsys.readouterr().out)["completions"][0]["ids"]
    assert main(["generate", *prompt, "--memory", "tiered", "--shared", "--memory-budget", "1M"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["completions"][0]["ids"] == want and got["memory"][0]["shared"].startswith("/dev/shm/engram-lm-")
    assert {p.name for p in folder.glob("engram-lm-*")} == before  # the last process out removed its store
    assert main(["generate", *prompt, "--memory", "mmap", "--shared"]) == 2
    assert "shared row store is the tiered tier's" in capsys.readouterr().err


def test_the_replicas_bench_runs_every_mode_and_a_newcomer_finds_the_shared_rows(tmp_path):
    from engram_lm.bench.replicas import bench_replicas

    (tmp_path / "shm").mkdir()
    r = bench_replicas(table_gb=0.005, processes=2, budget_gb=0.002, calls=4, workdir=tmp_path, shm=tmp_path / "shm")
    assert list(r["modes"]) == ["private", "shared", "mmap"] and all(m["total_pss_gb"] > 0 for m in r["modes"].values())
    for m in r["modes"].values():
        assert m["warm_decode_rows_s"] > 0 and m["warm_decode_p99_ms"] >= m["warm_decode_p50_ms"] > 0
    assert r["modes"]["shared"]["newcomer_hit_rate"] > r["modes"]["private"]["newcomer_hit_rate"]
    assert set(r["shared_vs_private"]) >= {"table_pss", "warm_decode_rows_s", "cold_prefill_rows_s"}
    assert list((tmp_path / "shm").iterdir()) == []


def test_rows_a_dead_writer_left_half_written_are_repaired_even_when_no_row_is_new(folder):
    """Every row asked for maps to a slot the dead writer left odd: the call still takes the lock and repairs."""
    reference = MmapTable(_file(folder), ROWS, DIM, "fp32")
    table = _open(folder, budget_rows=100)
    rows = torch.arange(100, 110)
    table(rows)
    slots = table.slot_of[rows.numpy()].astype(np.int64)
    table.shared.begin(slots, rows.numpy())  # as a writer that died after marking its slots
    table.seq[slots] += 1
    assert torch.equal(table(rows), reference(rows))
    assert int(table.shared.header["journal_state"][0]) == 0 and (table.seq[slots] & 1 == 0).all()
    before = table.hits
    assert torch.equal(table(rows), reference(rows)) and table.hits == before + 10  # held again, whole
    table.close()
