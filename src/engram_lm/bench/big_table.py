"""`engram bench big-table`: serve an Engram table larger than this machine's memory.

The quickstart backbone with one Engram layer whose table file is `table_gb` GB (random
fp32 rows, written chunk by chunk: the table never exists in RAM) generates from held-out
Bible prompts with the table read from the file by the SSD tier (memory/ssd.py, O_DIRECT)
or the mmap tier. The model is built on the meta device and the table tier replaces the
device table before any memory is allocated. Reported: file size against MemTotal,
prefill and decode tokens/s, and resident memory (current and peak while serving; the
peak is reset after the file is written where the kernel allows it).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_lm.bench.offload import _engram_config, _measure, _workload
from engram_lm.memory.codec import encode_rows
from engram_lm.models.transformer import EngramLM
from engram_lm.recipes import quickstart_moe
from engram_lm.training.data import prepare_data
from engram_lm.training.loop import resolve_model_config

CHUNK_ROWS = 1 << 22


def _proc_kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_random_table(path: Path, rows: int, dim: int, progress=lambda _: None) -> float:
    """Random N(0, 0.02) fp32 rows, written in chunks of CHUNK_ROWS; returns seconds taken."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    chunk = torch.empty(CHUNK_ROWS, dim)
    with path.open("wb") as f:
        for i, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            chunk[:n].normal_(std=0.02, generator=gen)
            f.write(encode_rows(chunk[:n], "fp32").tobytes())
            if i % 8 == 7:
                progress(f"  wrote {(start + n) * dim * 4 / 1e9:.1f} of {rows * dim * 4 / 1e9:.1f} GB")
    return time.perf_counter() - t0


def bench_big_table(table_gb: float = 32.0, workdir: Path | None = None, tier: str = "ssd", batch: int = 4,
                    prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, keep: bool = False,
                    progress=print) -> dict[str, Any]:  # fmt: skip
    if tier not in ("ssd", "mmap"):
        raise ValueError(f"--tier must be ssd or mmap, got {tier!r}")
    workdir = Path(workdir) if workdir is not None else Path.cwd()
    if not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} is not a folder")
    data = prepare_data("bible", "bpe:4096")
    prompts = _workload(np.asarray(data.val), batch, prompt_len)
    base, _ = quickstart_moe()
    cfg = resolve_model_config(base.with_(engram=_engram_config(table_gb)), data)
    with torch.device("meta"):
        model = EngramLM(cfg)
    engram = model.blocks[1].engram
    rows, dim = engram.memory.num_rows, engram.memory.dim
    file_bytes = rows * dim * 4
    free = shutil.disk_usage(workdir).free
    if free < file_bytes + (1 << 30):
        raise ValueError(f"{workdir} has {free / 1e9:.1f} GB free; the table needs {file_bytes / 1e9:.1f} GB "
                         f"plus 1 GB: pass --workdir on a larger disk or a smaller --table-gb")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="engram-big-table-", dir=workdir))
    path = tmp / "layer-1.bin"
    progress = progress or (lambda _: None)
    try:
        progress(f"writing a {file_bytes / 1e9:.1f} GB table ({rows:,} rows x {dim}) to {path}")
        write_seconds = write_random_table(path, rows, dim, progress)
        if tier == "ssd":
            from engram_lm.memory.ssd import SsdTable

            engram.memory = SsdTable(path, rows, dim, "fp32")
        else:
            from engram_lm.memory.host import MmapTable

            engram.memory = MmapTable(path, rows, dim, "fp32")
        model.to_empty(device="cpu")  # the dense weights only: the table is the file
        model._init_weights()
        model.init_rope(torch.device("cpu"))
        model.eval()
        peak_reset = _reset_peak_rss()
        rss_before = _proc_kib("/proc/self/status", "VmRSS")
        prefill, decode = _measure(model, prompts, new_tokens, repeats)
        placement = engram.memory.placement()
        engram.memory.close()
        return {
            "table_bytes": file_bytes, "table_rows": rows, "tier": tier, "placement": placement,
            "mem_total_bytes": (_proc_kib("/proc/meminfo", "MemTotal") or 0) * 1024,
            "write_seconds": write_seconds, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_tok_s": prefill, "decode_tok_s": decode,
            "rss_bytes_before_serving": (rss_before or 0) * 1024,
            "rss_bytes_after_serving": (_proc_kib("/proc/self/status", "VmRSS") or 0) * 1024,
            "peak_rss_bytes_while_serving": (_proc_kib("/proc/self/status", "VmHWM") or 0) * 1024 if peak_reset else None,
            "path": str(path) if keep else None,
        }  # fmt: skip
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
