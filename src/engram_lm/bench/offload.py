"""`engram bench offload`: what does it cost to keep Engram tables off the compute device?

One model (the quickstart backbone, Engram at layer 1 with a table of `table_gb` GB,
random weights: throughput does not depend on training) runs the same prefill and
greedy decode on real text (held-out Bible chapters, BPE 4096) with its table:
    no_engram            the backbone alone (same blocks, no Engram layer)
    ram                  in host RAM
    mmap_sync            in a memory-mapped file, read when the layer needs it
    mmap_prefetch        in the file, gathered in the background from the start of the pass
    mmap_prefetch_cache  the same behind a hot-row cache of `cache_rows` rows
Penalties are relative to `ram`, measured in the same run. The file is measured twice:
cold (evicted from the page cache with posix_fadvise(DONTNEED) first) and warm; the
`configs` rows report the warm numbers and carry the cold ones beside them.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_lm.config import EngramConfig
from engram_lm.inference.generate import SamplingConfig, generate
from engram_lm.memory.cache import CachedTable
from engram_lm.memory.codec import encode_rows
from engram_lm.memory.host import HostTable, MmapTable
from engram_lm.memory.prefetch import PrefetchingTable
from engram_lm.models.transformer import EngramLM
from engram_lm.recipes import quickstart_moe
from engram_lm.training.allocator import keep_large_buffers_on_heap
from engram_lm.training.data import prepare_data
from engram_lm.training.loop import resolve_model_config

HEAD_DIM, HEADS, MAX_NGRAM = 32, 4, 3


def _engram_config(table_gb: float) -> EngramConfig:
    columns = HEADS * (MAX_NGRAM - 1)
    rows = int(table_gb * 1e9 / (HEAD_DIM * 4))
    return EngramConfig(tokenizer="identity:4096", table_sizes=(rows // columns,) * (MAX_NGRAM - 1), max_ngram=MAX_NGRAM,
                        num_heads=HEADS, layer_ids=(1,), pad_id=0, embed_per_ngram=HEADS * HEAD_DIM,
                        zero_init_conv=False)  # fmt: skip


def _workload(tokens: np.ndarray, batch: int, prompt_len: int) -> list[list[int]]:
    return [tokens[i * prompt_len : (i + 1) * prompt_len].astype(int).tolist() for i in range(batch)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(model: EngramLM, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, float]:
    device = model.head.weight.device
    ids = torch.tensor(prompts, device=device)
    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(ids)
            _sync(device)
            prefill.append(ids.numel() / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens))
            _sync(device)
            total = time.perf_counter() - t0
            decode.append(len(prompts) * new_tokens / total)
    return statistics.median(prefill), statistics.median(decode)


def _stream_hit_rate(model: EngramLM, weight: torch.Tensor, tokens: np.ndarray, cache_rows: int, seq: int) -> float:
    """Hit rate of a fresh cache over a stream of distinct held-out windows (the first
    quarter warms it up and is not counted)."""
    cache = CachedTable(HostTable(weight), cache_rows)
    windows = torch.from_numpy(tokens[: len(tokens) // seq * seq].astype(np.int64)).view(-1, seq)
    warm = len(windows) // 4
    for i, window in enumerate(windows):
        if i == warm:
            cache.reset_counters()
        cache(model.hasher(window.unsqueeze(0), eod_id=model.config.eod_id, global_rows=True)[1].cpu())
    return cache.hit_rate


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_offload(table_gb: float = 4.0, batch: int = 8, prompt_len: int = 192, new_tokens: int = 32,
                  cache_rows: int = 1 << 18, repeats: int = 3, workdir: Path | None = None,
                  device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    keep_large_buffers_on_heap()
    device = torch.device(device)
    data = prepare_data("bible", "bpe:4096")
    prompts = _workload(np.asarray(data.val), batch, prompt_len)
    base, _ = quickstart_moe()
    cfg = resolve_model_config(base.with_(engram=_engram_config(table_gb)), data)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = EngramLM(cfg)
    engram = model.blocks[1].engram
    rows, dim = engram.memory.num_rows, engram.memory.dim
    model.to_empty(device=device)
    model._init_weights()
    model.init_rope(device)
    weight = torch.empty(rows, dim)
    for start in range(0, rows, 1 << 22):  # chunked init keeps peak memory at one table
        weight[start : start + (1 << 22)].normal_(std=0.02)
    model.eval()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "table.bin"
        with path.open("wb") as f:
            for start in range(0, rows, 1 << 20):
                f.write(encode_rows(weight[start : start + (1 << 20)], "fp32").tobytes())
        engram_block, hasher = model.blocks[1].engram, model.hasher
        model.blocks[1].engram = model.hasher = None  # the same backbone without its Engram layer
        results["no_engram"] = dict(zip(("prefill", "decode"), _measure(model, prompts, new_tokens, repeats)))
        model.blocks[1].engram, model.hasher = engram_block, hasher
        engram_block.memory = HostTable(weight, device=device)
        results["ram"] = dict(zip(("prefill", "decode"), _measure(model, prompts, new_tokens, repeats)))
        hit_rate = _stream_hit_rate(model, weight, np.asarray(data.val), cache_rows, prompt_len)
        for name in ("mmap_sync", "mmap_prefetch", "mmap_prefetch_cache"):
            for state in ("cold", "warm"):
                table = MmapTable(path, rows, dim, "fp32", device=device)
                if name.endswith("cache"):
                    table = CachedTable(table, cache_rows, device=device)
                if "prefetch" in name:
                    table = PrefetchingTable(table, device=device)
                engram_block.memory = table
                if state == "cold":
                    _evict(path)
                measured = _measure(model, prompts, new_tokens, 1 if state == "cold" else repeats)
                results.setdefault(name, {}).update(
                    {("prefill" if state == "warm" else "cold_prefill"): measured[0],
                     ("decode" if state == "warm" else "cold_decode"): measured[1]})  # fmt: skip
                if isinstance(table, PrefetchingTable):
                    table.close()
    ram = results["ram"]
    configs = []
    for name, r in results.items():
        entry = {"name": name, "prefill_tok_s": r["prefill"], "decode_tok_s": r["decode"],
                 "penalty_vs_ram": 1 - (r["prefill"] + r["decode"]) / (ram["prefill"] + ram["decode"]),
                 "prefill_penalty_vs_ram": 1 - r["prefill"] / ram["prefill"],
                 "decode_penalty_vs_ram": 1 - r["decode"] / ram["decode"]}  # fmt: skip
        if "cold_prefill" in r:
            entry.update(cold_prefill_tok_s=r["cold_prefill"], cold_decode_tok_s=r["cold_decode"])
        configs.append(entry)
    return {"table_bytes": rows * dim * 4, "table_rows": rows, "cache_rows": cache_rows, "cache_hit_rate": hit_rate,
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "device": str(device), "configs": configs}  # fmt: skip
