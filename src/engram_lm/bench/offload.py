"""`engram bench offload`: what does it cost to keep Engram tables off the compute device?

One model (the quickstart backbone, Engram at layer 1 with a table of `table_gb` GB,
random weights: throughput does not depend on training) runs the same prefill and
greedy decode on real text (held-out Bible chapters, BPE 4096) with its table:
    no_engram   the backbone alone (same blocks, no Engram layer)
    ram         in host RAM
    mmap_sync   in a memory-mapped file (MADV_RANDOM), read when the layer needs it
    ssd         in the file, read as O_DIRECT 4 KiB blocks by 32 threads (memory/ssd.py)
each also with `_prefetch` (gathered in the background from the start of the pass),
`_cache` (behind a hot-row cache of `cache_rows` rows) and `_prefetch_cache`.
Every configuration is measured cold (the file evicted from the page cache with
posix_fadvise(DONTNEED) first) and warm, with its raw gather rate (rows/s) beside prefill
and decode tokens/s; the file's own random 4 KiB read rate at queue depth 1 and 32 (fio,
or the project's block reader) is measured in the same run as the reference. Cold: one
configuration at a time, a fresh table on an evicted file, one pass. Warm: all
configurations (and `no_engram`) built at once and timed in turns after untimed passes,
so slow drift of the machine falls on all of them alike. `configs` lists the warm numbers
with the penalty relative to `ram`; `checks` the acceptance ratios of this one run.
"""

from __future__ import annotations

import json
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
    if not table_gb > 0 or table_gb * 1e9 / (HEAD_DIM * 4) < 2 * HEADS * (MAX_NGRAM - 1):
        raise ValueError(f"--table-gb {table_gb:g}: the table file's size in GB must be > 0 (and at least a few KB), "
                         "e.g. --table-gb 4")  # fmt: skip
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


def _measure(model: EngramLM, prompts: list[list[int]], new_tokens: int, repeats: int,
             warmup: int = 0) -> tuple[float, float]:  # fmt: skip
    """Median prefill and decode tokens/s over `repeats` passes after `warmup` untimed ones."""
    device = model.head.weight.device
    ids = torch.tensor(prompts, device=device)
    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(warmup):
            model(ids)
            generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens))
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


def reference_iops(path: Path, reads: int = 20000, queue_depth: int = 32) -> dict[str, Any]:
    """Random aligned 4 KiB reads of `path` at queue depth 1 and `queue_depth`: fio when it is
    installed, else the project's own block reader (memory/aio.py) at those depths."""
    import shutil
    import subprocess

    if shutil.which("fio"):
        out = {}
        for qd in (1, queue_depth):
            cmd = ["fio", "--name=ref", f"--filename={path}", "--rw=randread", "--bs=4k", "--direct=1",
                   "--ioengine=libaio", f"--iodepth={qd}", "--runtime=5", "--time_based", "--output-format=json"]  # fmt: skip
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            out[f"qd{1 if qd == 1 else 32}_iops"] = res["jobs"][0]["read"]["iops"]
        return {**out, "tool": "fio"}
    from engram_lm.memory.aio import BLOCK, BlockReader, aligned_buffer
    from engram_lm.memory.ssd import _open  # the tier's own open rules (O_DIRECT where allowed)

    size = os.path.getsize(path)
    rng = np.random.default_rng(0)
    fd, direct = _open(path)
    out: dict[str, Any] = {}
    try:
        for qd, n in ((1, reads // 4), (queue_depth, reads)):
            n = min(n, size // BLOCK)  # distinct blocks: a small table has fewer than `reads`
            reader = BlockReader(fd, str(path), size, queue_depth=qd)
            blocks = rng.choice(size // BLOCK, size=n, replace=False)
            buf = aligned_buffer(n * BLOCK)
            _evict(path)
            t0 = time.perf_counter()
            reader.read(blocks * BLOCK, np.full(n, BLOCK), buf, np.arange(n) * BLOCK)
            out[f"qd{1 if qd == 1 else 32}_iops"] = n / (time.perf_counter() - t0)
            engine = reader.engine
            reader.close()
            buf.close()
    finally:
        os.close(fd)
    return {**out, "tool": f"engram-lm {engine} reader ({'O_DIRECT' if direct else 'buffered'}; fio not installed)"}


def _rows_per_s(table, rows: torch.Tensor) -> float:
    """Raw gather rate: the host gather of an offloaded tier, the lookup itself for `device`."""
    gather = getattr(table, "gather_host", None)
    with torch.no_grad():
        t0 = time.perf_counter()
        if gather is not None:
            gather(rows)
        else:
            weight = table.weight
            table(rows.to(weight.device))
            _sync(weight.device)
        return rows.numel() / (time.perf_counter() - t0)


TIERS = ("ram", "mmap_sync", "ssd", "tiered")
WARMUP_PASSES = 6  # enough for the prefetch policy to have tried both modes in every size class
VARIANTS = ("", "_prefetch", "_cache", "_prefetch_cache")


def bench_offload(table_gb: float = 4.0, batch: int = 8, prompt_len: int = 192, new_tokens: int = 32,
                  cache_rows: int = 1 << 18, repeats: int = 25, workdir: Path | None = None,
                  device: str = "cpu", device_config: bool | None = None) -> dict[str, Any]:  # fmt: skip
    """Warm and cold (page cache dropped for the file) throughput of every tier x variant,
    with the file's own random-read reference measured in the same run."""
    keep_large_buffers_on_heap()
    device = torch.device(device)
    data = prepare_data("bible", "bpe:4096")
    prompts = _workload(np.asarray(data.val), batch, prompt_len)
    model, weight = _bench_model(table_gb, data, device)
    rows, dim = weight.shape
    probe_rows = model.hasher(torch.tensor(prompts), eod_id=model.config.eod_id, global_rows=True)[1].cpu()
    result: dict[str, Any] = {"cold": {}, "warm": {}}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "table.bin"
        with path.open("wb") as f:
            for start in range(0, rows, 1 << 20):
                f.write(encode_rows(weight[start : start + (1 << 20)], "fp32").tobytes())
        result["reference"] = reference_iops(path)
        result["cache"] = {"hit_rate": _stream_hit_rate(model, weight, np.asarray(data.val), cache_rows, prompt_len),
                           "rows": cache_rows}  # fmt: skip
        names = [tier + variant for tier in TIERS for variant in VARIANTS
                 if not (tier == "tiered" and "cache" in variant)]  # the tiered tier holds its rows itself
        if device_config if device_config is not None else device.type == "cuda":
            names.insert(0, "device")  # the table in GPU memory: the reference the paper's <= 3% is against
        build = lambda name: _stack(name, weight, path, rows, dim, device, cache_rows)  # noqa: E731
        result["cold"] = _cold_pass(model, names, build, path, probe_rows, prompts, new_tokens)
        warm, no_engram, paired = _warm_pass(model, names, build, probe_rows, prompts, new_tokens, repeats)
        result["warm"], result["no_engram"] = warm, no_engram
        result["cold"]["ram"] = result["warm"]["ram"]  # the same numbers: listed so every tier has both
    ram = result["warm"]["ram"]
    configs = [{"name": n, **r, "penalty_vs_ram": _penalty(r, ram)} for n, r in result["warm"].items()]
    return {"table_gb": rows * dim * 4 / 1e9, "table_bytes": rows * dim * 4, "table_rows": rows,
            "cache_rows": cache_rows, "cache_hit_rate": result["cache"]["hit_rate"], "batch": batch,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "device": str(device), **result, "configs": configs,
            "checks": {**_checks(result), "paired_warm": paired}}  # fmt: skip


def _paired_ratios(samples: dict[str, list[tuple[float, float]]], resamples: int = 2000) -> dict[str, Any]:
    """Warm turn-by-turn ratios (prefill + decode tok/s), each pair timed seconds apart in the
    same turn: X_prefetch / X and X / ram, as the median with a bootstrap 95% interval of
    that median. An interval that excludes 1 is a difference this machine can resolve."""
    rng = np.random.default_rng(0)

    def summary(a: str, b: str) -> dict[str, Any]:
        x = np.array([sum(s) for s in samples[a]]) / np.array([sum(s) for s in samples[b]])
        medians = np.median(rng.choice(x, size=(resamples, len(x))), axis=1)
        return {"median": float(np.median(x)), "ci95": [float(np.quantile(medians, 0.025)),
                                                        float(np.quantile(medians, 0.975))], "turns": len(x)}  # fmt: skip

    out = {}
    for name in samples:
        if "_prefetch" in name:
            out[f"{name} / {name.replace('_prefetch', '')}"] = summary(name, name.replace("_prefetch", ""))
        elif name not in ("ram", "no_engram"):
            out[f"{name} / ram"] = summary(name, "ram")
    return out


def _penalty(r: dict[str, float], ram: dict[str, float]) -> float:
    """Throughput lost against RAM, prefill and decode tokens/s summed."""
    return 1 - (r["prefill_tok_s"] + r["decode_tok_s"]) / (ram["prefill_tok_s"] + ram["decode_tok_s"])


def _checks(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance ratios, each from numbers measured in this one run."""
    cold, warm = result["cold"], result["warm"]
    offloaded = {n: r for n, r in warm.items() if n not in ("ram", "device")}
    best = min(offloaded, key=lambda n: _penalty(offloaded[n], warm["ram"]))
    on_device = {"warm_best_offload_vs_device": _penalty(offloaded[best], warm["device"])} if "device" in warm else {}
    slower = {}
    for state in ("cold", "warm"):
        for name, r in result[state].items():
            if "_prefetch" in name:
                slower[f"{state}/{name}"] = 1 - _penalty(r, result[state][name.replace("_prefetch", "")])
    return {
        "ssd_cold_rows_vs_qd32_iops": cold["ssd"]["rows_per_s"] / result["reference"]["qd32_iops"],
        "cold_prefill_ssd_vs_mmap": cold["ssd"]["prefill_tok_s"] / cold["mmap_sync"]["prefill_tok_s"],
        "cold_prefill_best": max((r["prefill_tok_s"], n) for n, r in cold.items() if n != "ram")[::-1],
        "warm_best_offload": {"name": best, "penalty_vs_ram": _penalty(offloaded[best], warm["ram"])},
        "prefetch_vs_without": slower,  # (prefill + decode tok/s) with prefetch / without; < 1 is slower
        **on_device,
    }


def _decisions(table) -> dict[str, int]:
    """How often a prefetching table handed its gather to the worker, and how often not."""
    if not isinstance(table, PrefetchingTable):
        return {}
    return {"handed_off": table.prefetched, "synchronous": table.synchronous}


def _stack(name: str, weight: torch.Tensor, path: Path, rows: int, dim: int, device: torch.device, cache_rows: int):
    """The table of one configuration: a tier, optionally behind a cache, optionally prefetched."""
    if name == "device":
        from engram_lm.memory.dense import DenseTable

        with torch.device("meta"):
            table = DenseTable(rows, dim)
        table.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
        return table
    tier = next(t for t in TIERS if name == t or name.startswith(t + "_"))
    variant = name[len(tier) :]
    table = _table(tier, weight, path, rows, dim, device)
    if "cache" in variant:
        table = CachedTable(table, cache_rows, device=device)
    if "prefetch" in variant:
        table = PrefetchingTable(table, device=device)
    return table


def _table(tier: str, weight: torch.Tensor, path: Path, rows: int, dim: int, device: torch.device):
    if tier == "ram":
        return HostTable(weight, device=device)
    return file_table(tier, path, rows, dim, "fp32", device)


def file_table(tier: str, path: Path, rows: int, dim: int, dtype: str, device: torch.device):
    """A table file of `dtype` rows served by `tier`: ssd, tiered (the default budget: the whole
    file, or half the available memory) or mmap."""
    if tier == "ssd":
        from engram_lm.memory.ssd import SsdTable

        return SsdTable(path, rows, dim, dtype, device=device)
    if tier == "tiered":
        from engram_lm.memory.tiered import tiered_table

        return tiered_table(path, rows, dim, dtype, device=device)
    return MmapTable(path, rows, dim, dtype, device=device)


def _bench_model(table_gb: float, data, device: torch.device) -> tuple[EngramLM, torch.Tensor]:
    """The quickstart MoE with one Engram layer whose table is about `table_gb` (built on the
    meta device, so the table is never allocated twice) and that table's random fp32 rows."""
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
    return model, weight


def _cold_pass(model: EngramLM, names: list[str], build, path: Path, probe_rows: torch.Tensor, prompts,
               new_tokens: int) -> dict[str, Any]:  # fmt: skip
    """One configuration at a time, each a fresh table on an evicted file: its first contact."""
    cold: dict[str, Any] = {}
    engram_block = model.blocks[1].engram
    for name in names:
        if name.startswith("ram") or name == "device":
            continue  # nothing to drop: RAM has no page cache
        _evict(path)  # pages an mmap still maps cannot be dropped: every table is closed first
        table = build(name)
        gather = _rows_per_s(table, probe_rows)
        table.close()
        del table
        _evict(path)
        table = engram_block.memory = build(name)
        pre, dec = _measure(model, prompts, new_tokens, 1)  # the first contact is the cold one
        cold[name] = {"prefill_tok_s": pre, "decode_tok_s": dec, "rows_per_s": gather, **_decisions(table)}
        table.close()
        engram_block.memory = None
        del table
    return cold


def _warm_pass(model: EngramLM, names: list[str], build, probe_rows: torch.Tensor, prompts, new_tokens: int,
               repeats: int) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:  # fmt: skip
    """Every configuration built at once and timed in turns (and the backbone without Engram),
    so that drift of the machine (a shared VM drifts by 5-10% within minutes) falls on all of
    them alike: (warm results, no-Engram result, paired ratios)."""
    engram_block, hasher = model.blocks[1].engram, model.hasher
    tables = {name: build(name) for name in names}
    gathers = {name: _rows_per_s(t, probe_rows) for name, t in tables.items()}

    def install(name: str) -> None:
        if name == "no_engram":  # the same backbone without its Engram layer
            model.blocks[1].engram = model.hasher = None
        else:
            model.blocks[1].engram, model.hasher = engram_block, hasher
            engram_block.memory = tables[name]

    timed = ["no_engram", *names]
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in timed}
    for turn in range(WARMUP_PASSES + repeats):  # steady state: caches filled, prefetch policy decided
        for name in timed[turn % len(timed) :] + timed[: turn % len(timed)]:
            install(name)
            sample = _measure(model, prompts, new_tokens, 1)
            if turn >= WARMUP_PASSES:
                samples[name].append(sample)
    install(names[0])
    warm, no_engram = {}, {}
    for name in timed:
        pre, dec = (statistics.median(x) for x in zip(*samples[name]))
        entry = {"prefill_tok_s": pre, "decode_tok_s": dec}
        if name == "no_engram":
            no_engram = entry
        else:
            warm[name] = {**entry, "rows_per_s": gathers[name], **_decisions(tables[name])}
    for t in tables.values():
        t.close()
    return warm, no_engram, _paired_ratios(samples)
