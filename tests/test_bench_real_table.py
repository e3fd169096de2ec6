"""`engram bench real-table`: the real layout, the workload's rows, and a scaled run end to end (no timing asserted)."""

import numpy as np
import pytest
import torch

from engram_lm.bench import real_table
from engram_lm.hashing.qwen4 import qwen4_layout, qwen4_row_ids
from engram_lm.memory.codec import decode_rows, row_bytes


def test_the_qwen38_table_is_the_released_size_and_bad_requests_say_why(tmp_path):
    layout, dim = real_table.table_layout("qwen3.8")
    assert layout.padded_rows == 320_001_536 and dim == 160 and layout.num_heads == 16
    assert 320_001_536 * row_bytes("fp8", 160) == 52_800_253_440  # 165 bytes a row: 160 e4m3 codes, 5 scales
    with pytest.raises(ValueError, match="real tables known for"):
        real_table.table_layout("v4.1")
    with pytest.raises(ValueError, match="not a folder"):
        real_table.bench_real_table(workdir=tmp_path / "nope", progress=None)


def test_the_written_rows_decode_to_finite_values(tmp_path, monkeypatch):
    monkeypatch.setattr(real_table, "WRITE_CHUNK_ROWS", 1000)
    path = tmp_path / "t.bin"
    real_table.write_random_fp8_table(path, 2500, 160)
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, row_bytes("fp8", 160))
    assert raw.shape[0] == 2500
    values = decode_rows(raw, "fp8", 160)
    assert torch.isfinite(values).all() and values.abs().max() <= 448 / 128  # e4m3's largest code at scale 2^-7


def test_a_scaled_run_reports_every_tier_and_workload_and_removes_its_file(tmp_path, monkeypatch):
    small = qwen4_layout(vocab_size=248_320, eos_id=248_044, ngram_vocab_size_base=500)
    monkeypatch.setattr(real_table, "table_layout", lambda model: (small, 160))
    monkeypatch.setattr(real_table, "CACHE_ROWS", 256)
    monkeypatch.setattr(real_table, "DECODE_STEPS", 4)
    monkeypatch.setattr(real_table, "PREFILL_LENGTHS", (64,))
    tokens = np.random.default_rng(1).integers(0, 128_000, 10_000)
    monkeypatch.setattr(real_table, "token_stream", lambda n: tokens)
    monkeypatch.setattr(real_table, "reference_iops", lambda path: {"qd1_iops": 1.0, "qd32_iops": 1.0, "tool": "stub"})
    r = real_table.bench_real_table(workdir=tmp_path, progress=None)
    assert set(r["tiers"]) == {"mmap", "ssd", "ssd+cache", "tiered"} and r["table_rows"] == small.padded_rows
    for tier in r["tiers"].values():
        assert set(tier["cold"]) == {"decode_b1", "decode_b8", "decode_b32", "prefill_64"}
        assert tier["cold"]["decode_b32"]["calls"] == 4 and tier["warm"]["prefill_64"]["tok_s"] > 0
    assert not list(tmp_path.iterdir())  # the table file is gone (no --keep)


def test_decode_calls_hash_each_new_token_with_its_real_history():
    layout = qwen4_layout(vocab_size=248_320, eos_id=248_044, ngram_vocab_size_base=500)
    tokens = np.arange(20_000) % 1000
    calls = real_table.workloads(layout, tokens)
    assert [len(calls[f"decode_b{b}"]) for b in (1, 8, 32)] == [real_table.DECODE_STEPS] * 3
    assert calls["decode_b8"][0].shape == (8, 1, 16) and calls["prefill_1024"][0].shape == (1, 1024, 16)
    # the decode steps of one sequence equal hashing its whole window at once (the history carried)
    steps = torch.cat([c[:1] for c in calls["decode_b1"]], dim=1)
    window = torch.from_numpy(tokens)
    for s in range(len(tokens) - real_table.DECODE_STEPS - 2):  # find the sequence the workload drew
        whole = qwen4_row_ids(layout, window[s : s + real_table.DECODE_STEPS + 2].view(1, -1))[0][:, 2:]
        if torch.equal(whole, steps):
            break
    else:
        pytest.fail("the decode steps are not the rows of any window of the stream")


def test_v41_calls_carry_48_rows_a_token_inside_the_table_with_their_history():
    tokens = np.random.default_rng(2).integers(0, 128_000, 20_000)
    calls = real_table.v41_workloads(tokens, rows=5_000)
    assert calls["decode_b8"][0].shape == (8, 1, 48) and calls["prefill_1024"][0].shape == (1, 1024, 48)
    assert all(int(c.max()) < 5_000 and int(c.min()) >= 0 for cs in calls.values() for c in cs)
    # without the wrap, layer 1's 24 ids fall in its table and layer 14's in its own
    big = real_table.v41_workloads(tokens, rows=10**12)
    prefill = big["prefill_1024"][0][0]
    from engram_lm.hashing.layout import build_layout
    from engram_lm.presets import v4_1

    layout = build_layout(v4_1(), real_table.V41_COMPRESSED, 0)
    assert int(prefill[:, :24].max()) < layout.layer(1).rows and int(prefill[:, 24:].max()) < layout.layer(14).rows


def test_a_scaled_v41_run_reports_every_tier(tmp_path, monkeypatch):
    monkeypatch.setattr(real_table, "v41_rows", lambda workdir, path: 1 << 20)
    monkeypatch.setattr(real_table, "DECODE_STEPS", 3)
    monkeypatch.setattr(real_table, "PREFILL_LENGTHS", (32,))
    monkeypatch.setattr(real_table, "token_stream", lambda n: np.random.default_rng(1).integers(0, 128_000, 10_000))
    monkeypatch.setattr(real_table, "reference_iops", lambda path: {"qd1_iops": 1.0, "qd32_iops": 1.0, "tool": "stub"})
    r = real_table.bench_real_table(model="v4.1", workdir=tmp_path, tiers=("ssd", "tiered"), progress=None)
    assert r["dim"] == 256 and r["rows_per_token"] == 48 and r["table_bytes"] == (1 << 20) * 264
    assert r["real_rows"] == 384_006_168 and set(r["tiers"]) == {"ssd", "tiered"}
    assert r["tiers"]["tiered"]["warm"]["prefill_32"]["tok_s"] > 0 and not list(tmp_path.iterdir())
