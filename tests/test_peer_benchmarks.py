"""The peer benchmarks under benchmarks/peers/ still run (here without the peer installed: only
engram-lm's contenders), so that the documented command does not rot between quiet runs."""

import argparse
import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "peers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_engramdb_benchmark_checks_bytes_and_reports_every_row(tmp_path, monkeypatch):
    bench = _load("engramdb_bench")
    monkeypatch.setattr(bench, "CALLS", {k: 2 for k in bench.CALLS})
    monkeypatch.setattr(bench.shutil, "which", lambda tool: None)  # no fio, no fincore: the run says so
    args = argparse.Namespace(workdir=str(tmp_path / "w"), gib=1 / 1024, turns=2, peer_python=None, fio_seconds=1)
    result = bench.run(args)
    assert result["identical_bytes"] and result["fio_iops"] == {} and result["contenders"] == list(bench.OURS)
    assert result["rows"] == 4096 and result["resident_after_drop_max_bytes"] == -1
    one = (tmp_path / "w" / "one" / "shard_000.bin").read_bytes()
    parts = b"".join((tmp_path / "w" / "sharded" / f"shard_{s:03d}.bin").read_bytes() for s in range(bench.SHARDS))
    assert one == parts  # engramdb's 128-shard layout is the same table cut in order
    rows = result["results"]
    assert len(rows) == 2 * len(bench.SIZES) * 2 * len(bench.OURS)
    tiered = [r for r in rows if r["contender"] == "engram-lm tiered"]
    assert all(len(r["vs_best_other_per_turn"]) == 2 and r["p99_ms"] >= r["p50_ms"] > 0 for r in tiered)
    assert "| uniform decode (64) cold |" in bench.markdown(result)


def test_zipf_batches_scatter_the_hot_rows_over_the_table():
    bench = _load("engramdb_bench")
    ids = bench.batches_for("zipf", 4096, 4, 1 << 20, seed=0)
    values, counts = np.unique(ids, return_counts=True)
    assert ids.min() >= 0 and ids.max() < 1 << 20
    assert counts.max() > 50 * np.median(counts)  # a hot head
    assert values[np.argsort(counts)[-8:]].max() > 1 << 16  # not packed at the start of the file
