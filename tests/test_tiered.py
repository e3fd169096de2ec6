"""The tiered tier (memory/tiered.py): rows held within a memory budget, misses read from the disk."""

import numpy as np
import pytest
import torch

from engram_lm.memory.codec import encode_rows, row_bytes
from engram_lm.memory.host import MmapTable
from engram_lm.memory.ssd import SsdTable
from engram_lm.memory.tiered import TieredTable, parse_bytes


def _file(tmp_path, rows=2000, dim=16, dtype="fp32", seed=0):
    weight = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / f"{dtype}.bin"
    encode_rows(weight, dtype).tofile(path)
    return path


@pytest.mark.parametrize("dtype, dim", [("fp32", 16), ("bf16", 48), ("fp8", 32), ("int8", 40), ("int4", 45)])
@pytest.mark.parametrize("budget_rows", [1, 37, 5000])
def test_same_rows_as_the_mmap_tier_under_any_budget(tmp_path, dtype, dim, budget_rows):
    path = _file(tmp_path, dim=dim, dtype=dtype)
    mm = MmapTable(path, 2000, dim, dtype)
    table = TieredTable(path, 2000, dim, dtype, budget_bytes=budget_rows * row_bytes(dtype, dim))
    rng, seen = np.random.default_rng(1), set()
    for step in range(30):  # Zipf-like ids with repeats inside a call: admissions and evictions happen
        rows = torch.from_numpy(np.minimum(rng.zipf(1.3, size=(3, 40)), 2000) - 1)
        assert torch.equal(table(rows), mm(rows)), step
        seen |= set(rows.flatten().tolist())
    assert table.used == min(budget_rows, len(seen))  # every miss enters while there is room
    held = table.row_in[1 : table.used + 1]
    assert len(np.unique(held)) == table.used  # no row held twice
    assert (table.slot_of[held] == np.arange(1, table.used + 1)).all()  # the index and the store agree
    assert np.count_nonzero(table.slot_of) == table.used


def test_held_rows_cost_no_disk_read_and_counters_add_up(tmp_path):
    path = _file(tmp_path)
    table = TieredTable(path, 2000, 16, "fp32", budget_bytes=100 * 64)
    rows = torch.tensor([[5, 7, 5, 1999]])
    first = table(rows)
    assert (table.hits, table.misses, table.disk.rows_read) == (0, 3, 3)  # distinct rows
    again = table(rows)
    assert torch.equal(first, again)
    assert (table.hits, table.misses, table.disk.rows_read) == (3, 3, 3)  # served from memory
    assert table.hit_rate == 0.5
    table(torch.tensor([5, 8]))
    assert (table.hits, table.misses, table.disk.rows_read) == (4, 4, 4)  # only the miss went to the disk


def test_a_hot_row_stays_while_one_off_rows_stream_past(tmp_path):
    path = _file(tmp_path)
    table = TieredTable(path, 2000, 16, "fp32", budget_bytes=10 * 64)  # 10 rows
    for i in range(10):  # fill the store with rows read once
        table(torch.tensor([1500 + i]))
    for step in range(200):  # the hot row 3, with 5 rows never seen again, every call
        table(torch.tensor([3] + [5 * step + k + 20 for k in range(5)]))
    assert table.slot_of[3] > 0  # admitted (missed twice) and never evicted
    last = table.disk.rows_read
    table(torch.tensor([3]))
    assert table.disk.rows_read == last
    assert table.used == 10


def test_a_row_missed_twice_replaces_a_cold_one_when_full(tmp_path):
    path = _file(tmp_path)
    table = TieredTable(path, 2000, 16, "fp32", budget_bytes=4 * 64)
    table(torch.tensor([1, 2, 3, 4]))  # full
    table(torch.tensor([500]))  # missed once: a one-off never displaces anything
    assert table.slot_of[500] == 0
    for _ in range(5):  # missed again and again: it gets in (cold slots lose their mark as draws pass)
        table(torch.tensor([500]))
    assert table.slot_of[500] > 0 and np.count_nonzero(table.slot_of[[1, 2, 3, 4]]) == 3


def test_bad_budgets_sizes_and_ids_are_refused_in_one_line(tmp_path, monkeypatch):
    path = _file(tmp_path)
    with pytest.raises(ValueError, match="holds no row of 64 bytes"):
        TieredTable(path, 2000, 16, "fp32", budget_bytes=10)
    monkeypatch.setattr("engram_lm.memory.tiered.available_memory_bytes", lambda: 100 << 10)
    with pytest.raises(ValueError, match=r"budget of 2,000 rows .* exceeds the 0 MiB this machine has available: give "
                                         "a smaller budget"):  # a budget past the table's size counts as the table's
        TieredTable(path, 2000, 16, "fp32", budget_bytes=64 << 20)
    TieredTable(path, 2000, 16, "fp32", budget_bytes=1000 * 64).close()  # fits
    monkeypatch.undo()
    with pytest.raises(ValueError, match="expected 256,064 bytes; re-export it"):  # a file shorter than its rows
        TieredTable(path, 4001, 16, "fp32", budget_bytes=1 << 20)
    table = TieredTable(path, 2000, 16, "fp32", budget_bytes=1 << 20)
    with pytest.raises(ValueError, match="row ids 0..2000 fall outside this tiered table's 2,000 rows"):
        table(torch.tensor([0, 2000]))
    with pytest.raises(ValueError, match="must be int64"):
        table(torch.tensor([1], dtype=torch.int32))
    assert table.hits == table.misses == 0  # nothing was read for a refused call


def test_parse_bytes():
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("4GiB") == 4 << 30 and parse_bytes("2.5G") == int(2.5 * 2**30)
    assert parse_bytes("1000") == 1000 and parse_bytes(7) == 7
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_bytes(bad)


def test_a_file_system_without_o_direct_falls_back_and_says_so_once(tmp_path, capsys, monkeypatch):
    import errno
    import os

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("this platform has no O_DIRECT")
    from engram_lm.memory import ssd

    real_open = os.open

    def refusing_open(path, flags, *args):  # as tmpfs on older kernels and some overlay file systems answer
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    path = _file(tmp_path)
    monkeypatch.setattr(ssd.os, "open", refusing_open)
    monkeypatch.setattr(ssd, "_BUFFERED_DEVICES", set())
    first, second = SsdTable(path, 2000, 16, "fp32"), TieredTable(path, 2000, 16, "fp32", budget_bytes=1 << 20)
    err = capsys.readouterr().err
    assert err.count("refuses O_DIRECT") == 1 and "ext4 or xfs" in err  # said once for the file system
    assert not first.direct and not second.disk.direct and first.placement()["o_direct"] is False
    mm = MmapTable(path, 2000, 16, "fp32")
    assert torch.equal(first(torch.tensor([4, 1999])), mm(torch.tensor([4, 1999])))
    assert torch.equal(second(torch.tensor([4, 1999])), mm(torch.tensor([4, 1999])))
    first.close(), second.close()


def test_a_budget_is_shared_by_file_size_and_defaults_to_half_the_free_memory(monkeypatch):
    from engram_lm.memory.tiered import budget_shares

    assert budget_shares(100, [300, 700]) == [30, 70]
    assert budget_shares("1K", [300, 700]) == [300, 700]  # never more than a table's file
    monkeypatch.setattr("engram_lm.memory.tiered.available_memory_bytes", lambda: 2000)
    assert budget_shares(None, [3000, 1000]) == [750, 250]
