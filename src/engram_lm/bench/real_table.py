"""`engram bench real-table --model qwen3.8`: a released model's n-gram table at its real size,
served from a file larger than this machine's memory.

Qwen3.8-Flash-Next's PLE n-gram table (the first PLE layer's; Qwen4ExpTextConfig's defaults):
320,001,536 rows of 160 values, addressed by hashing/qwen4.py (bit-exact with the official
`Qwen4ExpTextNGramEmbedding`: 16 rows per token). The rows are valid fp8 of random bytes, one
2M-row block repeated (the bytes of a real table cost the same to read), written chunk by
chunk: the table never exists in RAM.
The token stream is real text (the built-in Bible through the DeepSeek-V3 tokenizer, ids below
its 128,815, inside Qwen's 248,320-id vocabulary), so the rows read have real n-gram
statistics (repeated n-grams reuse rows) though not Qwen's own token ids.

For each tier (mmap, ssd, ssd behind the hot-row cache) the lookup alone (hash, read, decode;
no model) is timed cold (the file dropped from the page cache first, `posix_fadvise`) and then
warm (the same calls again, after one untimed pass that lets the cache admit its rows): decode at batch 1, 8 and 32 (one new token per sequence per step,
with the real history), prefill of 1,024 and 4,096 tokens. Reported: tokens/s, per-call p50 and
p99, rows/s against the file's random 4 KiB read rate at depth 32 (fio, or the project's reader),
and resident memory. The table file is removed at the end unless `keep`; an existing one of the
right size in `workdir` is reused (`keep` leaves it for that).

`--model v4.1`: DeepSeek-V4.1-Flash's layer-1 table at its real row width (256 e4m3 codes and 8
ue8m0 scales: 264 bytes) with as many of its 384,006,168 rows as the disk holds (101 GB whole),
read with both Engram layers' 48 rows a token, hashed with the V4.1 layout (hashing equal to
SGLang's: tests/test_v41_golden.py) over token id mod 99,092 as compressed ids, each id modulo
the rows written.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_lm.bench.big_table import _proc_kib, _reset_peak_rss
from engram_lm.bench.offload import _evict, reference_iops
from engram_lm.hashing.qwen4 import Qwen4NgramLayout, qwen4_layout, qwen4_row_ids
from engram_lm.memory.codec import row_bytes

MODELS = {"qwen3.8": {"vocab_size": 248_320, "eos_id": 248_044, "dim": 160, "rows": 320_001_536}}
DTYPE = "fp8"
WRITE_CHUNK_ROWS = 1 << 21
DECODE_BATCHES = (1, 8, 32)
DECODE_STEPS = 48
PREFILL_LENGTHS = (1024, 4096)
CACHE_ROWS = 1 << 22  # the hot-row cache of the third tier: 4M rows (2.7 GB of fp32 vectors at dim 160)
V41_ROWS, V41_DIM, V41_COMPRESSED = 384_006_168, 256, 99_092  # layer 1's table; config.json's compressed vocabulary


def table_layout(model: str) -> tuple[Qwen4NgramLayout, int]:
    if model not in MODELS:
        raise ValueError(f"--model {model!r}: real tables known for {sorted(MODELS)} and v4.1 (its own path below)")
    spec = MODELS[model]
    layout = qwen4_layout(vocab_size=spec["vocab_size"], eos_id=spec["eos_id"])
    if layout.padded_rows != spec["rows"]:
        raise AssertionError(f"the layout has {layout.padded_rows:,} rows, the released table {spec['rows']:,}")
    return layout, spec["dim"]


def write_random_fp8_table(path: Path, rows: int, dim: int, progress=lambda _: None) -> float:
    """Valid fp8 rows of random bytes (e4m3 codes without the NaN patterns, every block scale
    2^-7): one block of WRITE_CHUNK_ROWS rows, written again and again (reading a row costs the
    same whatever its bytes; drawing 52 GB of random bytes costs ~10 minutes on 2 cores).
    Returns seconds taken."""
    t0 = time.perf_counter()
    width = row_bytes(DTYPE, dim)
    block = np.frombuffer(bytearray(np.random.default_rng(0).bytes(WRITE_CHUNK_ROWS * width)), dtype=np.uint8)
    block = block.reshape(WRITE_CHUNK_ROWS, width)
    codes = block[:, :dim]
    codes[(codes & 0x7F) == 0x7F] ^= 1  # 0x7F / 0xFF are e4m3's NaN: the next code instead
    block[:, dim:] = 120  # ue8m0 exponent 120 - 127: scale 2^-7
    total = rows * width
    with path.open("wb") as f:
        for i, start in enumerate(range(0, rows, WRITE_CHUNK_ROWS)):
            f.write(memoryview(block)[: min(WRITE_CHUNK_ROWS, rows - start)])
            if i % 32 == 31:
                progress(f"  wrote {f.tell() / 1e9:.1f} of {total / 1e9:.1f} GB")
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def token_stream(min_tokens: int) -> np.ndarray:
    from engram_lm.training.data import prepare_data

    tokens = np.asarray(prepare_data("bible", "deepseek-v3").train, dtype=np.int64)
    if len(tokens) < min_tokens:
        raise ValueError(f"the token stream has {len(tokens):,} tokens, the workload needs {min_tokens:,}")
    return tokens


def workloads(layout: Qwen4NgramLayout, tokens: np.ndarray) -> dict[str, list[torch.Tensor]]:
    """Row ids per call: decode steps (B sequences, one token each, with their history) and prefills."""
    out: dict[str, list[torch.Tensor]] = {}
    rng = np.random.default_rng(0)
    for batch in DECODE_BATCHES:
        starts = rng.integers(0, len(tokens) - 4096 - DECODE_STEPS, batch)
        ids = torch.from_numpy(np.stack([tokens[s + 4096 - 2 : s + 4096 + DECODE_STEPS] for s in starts]))
        history, calls = ids[:, :2], []
        for t in range(DECODE_STEPS):
            rows, history = qwen4_row_ids(layout, ids[:, 2 + t : 3 + t], history)
            calls.append(rows)
        out[f"decode_b{batch}"] = calls
    for length in PREFILL_LENGTHS:
        starts = rng.integers(0, len(tokens) - length, 3)
        out[f"prefill_{length}"] = [qwen4_row_ids(layout, torch.from_numpy(tokens[s : s + length]).view(1, -1))[0]
                                    for s in starts]  # fmt: skip
    return out


def v41_rows(workdir: Path, path: Path) -> int:
    """DeepSeek-V4.1's layer-1 table rows, or as many as the disk holds with 2 GB to spare."""
    free = shutil.disk_usage(workdir).free + (path.stat().st_size if path.exists() else 0)
    return min(V41_ROWS, max(0, free - (2 << 30)) // row_bytes(DTYPE, V41_DIM))


def v41_workloads(tokens: np.ndarray, rows: int) -> dict[str, list[torch.Tensor]]:
    """The calls of `workloads`, hashed with DeepSeek-V4.1's layout (both Engram layers: 48 rows a
    token) over compressed ids taken as token id mod 99,092 (the V4 tokenizer is no dependency),
    each row id modulo the rows the table file holds."""
    from engram_lm.hashing.layout import build_layout
    from engram_lm.hashing.reference import reference_layer_hashes
    from engram_lm.presets import v4_1

    layout = build_layout(v4_1(), V41_COMPRESSED, 0)
    ids = tokens % V41_COMPRESSED

    def row_ids(window_BT: np.ndarray) -> torch.Tensor:
        parts = [reference_layer_hashes(window_BT, layout, lid) + np.array(layout.layer(lid).offsets)
                 for lid in layout.layer_ids]  # fmt: skip
        return torch.from_numpy(np.concatenate(parts, -1) % rows)

    out: dict[str, list[torch.Tensor]] = {}
    rng = np.random.default_rng(0)
    n = layout.max_ngram
    for batch in DECODE_BATCHES:
        starts = rng.integers(0, len(ids) - 4096 - DECODE_STEPS, batch)
        seqs = np.stack([ids[s + 4096 - (n - 1) : s + 4096 + DECODE_STEPS] for s in starts])
        out[f"decode_b{batch}"] = [row_ids(seqs[:, t : t + n])[:, -1:] for t in range(DECODE_STEPS)]  # full history
    for length in PREFILL_LENGTHS:
        starts = rng.integers(0, len(ids) - length, 3)
        out[f"prefill_{length}"] = [row_ids(ids[s : s + length][None]) for s in starts]
    return out


def _time_calls(table, calls: list[torch.Tensor]) -> dict[str, float]:
    times = []
    for rows in calls:
        t0 = time.perf_counter()
        table(rows)
        times.append(time.perf_counter() - t0)
    tokens = sum(rows.shape[0] * rows.shape[1] for rows in calls)
    rows = sum(rows.numel() for rows in calls)
    return {"tok_s": tokens / sum(times), "rows_s": rows / sum(times), "p50_ms": 1e3 * float(np.percentile(times, 50)),
            "p99_ms": 1e3 * float(np.percentile(times, 99)), "calls": len(calls)}  # fmt: skip


def _tier(name: str, path: Path, rows: int, dim: int):
    from engram_lm.memory.cache import CachedTable
    from engram_lm.memory.host import MmapTable
    from engram_lm.memory.ssd import SsdTable

    if name == "mmap":
        return MmapTable(path, rows, dim, DTYPE)
    if name == "tiered":  # the default budget: half the available memory
        from engram_lm.memory.tiered import tiered_table

        return tiered_table(path, rows, dim, DTYPE)
    ssd = SsdTable(path, rows, dim, DTYPE)
    return CachedTable(ssd, CACHE_ROWS) if name == "ssd+cache" else ssd


def bench_real_table(model: str = "qwen3.8", workdir: Path | str = ".", keep: bool = False,
                     tiers: tuple[str, ...] = ("mmap", "ssd", "ssd+cache", "tiered"), progress=print) -> dict[str, Any]:  # fmt: skip
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} is not a folder")
    path = workdir / f"{model}-ngram-table-{DTYPE}.bin"
    if model == "v4.1":  # as much of layer 1's table as the disk holds
        dim, rows, per_token = V41_DIM, v41_rows(workdir, path), 48
        if rows < 1 << 20:
            raise ValueError(f"{workdir} holds only {rows:,} rows of V4.1's table (264 bytes each, 2 GB kept free): "
                             "pass --workdir on a larger disk")  # fmt: skip
        make_calls = lambda tokens: v41_workloads(tokens, rows)  # noqa: E731
    else:
        layout, dim = table_layout(model)
        rows, per_token = layout.padded_rows, layout.num_heads
        make_calls = lambda tokens: workloads(layout, tokens)  # noqa: E731
    file_bytes = rows * row_bytes(DTYPE, dim)
    progress = progress or (lambda _: None)
    reused = path.exists() and path.stat().st_size == file_bytes
    write_seconds = None
    if not reused:
        free = shutil.disk_usage(workdir).free + (path.stat().st_size if path.exists() else 0)
        if free < file_bytes + (1 << 30):
            raise ValueError(f"{workdir} has {free / 1e9:.1f} GB free; the {model} table needs {file_bytes / 1e9:.1f} GB "
                             "plus 1 GB: pass --workdir on a larger disk")  # fmt: skip
        progress(f"writing the {model} table: {rows:,} rows x {dim} {DTYPE} = {file_bytes / 1e9:.1f} GB to {path}")
        write_seconds = write_random_fp8_table(path, rows, dim, progress)
    try:
        calls = make_calls(token_stream(8192))
        iops = reference_iops(path)
        results: dict[str, Any] = {}
        peak_reset = _reset_peak_rss()
        for name in tiers:
            progress(f"tier {name}")
            table = _tier(name, path, rows, dim)
            _evict(path)
            cold = {work: _time_calls(table, c) for work, c in calls.items()}
            for c in calls.values():  # untimed: the cache admits a row on its second sighting
                _time_calls(table, c)
            warm = {work: _time_calls(table, c) for work, c in calls.items()}
            results[name] = {"cold": cold, "warm": warm, "placement": table.placement()}
            table.close()
        return {"model": model, "table_rows": rows, "dim": dim, "dtype": DTYPE, "table_bytes": file_bytes,
                "mem_total_bytes": (_proc_kib("/proc/meminfo", "MemTotal") or 0) * 1024, "write_seconds": write_seconds,
                "reused_file": reused, "reference_iops": iops, "rows_per_token": per_token,
                "real_rows": V41_ROWS if model == "v4.1" else rows,
                "decode_steps": DECODE_STEPS, "tiers": results,
                "rss_bytes_after": (_proc_kib("/proc/self/status", "VmRSS") or 0) * 1024,
                "peak_rss_bytes": (_proc_kib("/proc/self/status", "VmHWM") or 0) * 1024 if peak_reset else None,
                "path": str(path) if keep else None}  # fmt: skip
    finally:
        if not keep:
            path.unlink(missing_ok=True)
