"""`engram bench penalty`: what an Engram table costs a model of a real size, the paper's way.

The paper's system claim (ENGRAM_SPEC s.7): a table held in host memory and prefetched costs
1.9% (4B dense) and 2.8% (8B dense) of throughput against the same model without Engram. Here
one model of a named shape (bench/shapes.py; random weights) runs every workload with:
    none        the same backbone with its Engram layer and hasher removed (the reference)
    device      the table in GPU memory (CUDA only)
    ram         host RAM (pinned with CUDA)
    tiered      rows held in RAM up to the default budget, misses read from the file at depth
    mmap        the page cache
    ssd         O_DIRECT reads at depth, nothing held
each also `+prefetch` (the model requests every Engram layer's rows when a step's ids are known,
before block 0, so a table at block k overlaps blocks 0..k-1). Warm: every configuration built
once and timed in alternating turns (a VM's drift falls on all alike); cold: one configuration at
a time, a fresh table on a file whose pages were dropped (and checked dropped), one turn, against
the backbone timed just before it.
Workloads: a prefill of T tokens (batch 1) and greedy decoding of n tokens at batch b, each step
timed (p50 / p99 per token); with `offline`, also the paper's offline batch (`offline_workload`:
requests of Uniform(low, high) prompt and output tokens served in waves, output tokens/s). The penalty is the median over turns of (time with the table) /
(time without) - 1, with a bootstrap 95% interval of that median; tokens/s are medians.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_lm.bench.shapes import Shape, get_shape
from engram_lm.memory.codec import encode_rows, row_bytes
from engram_lm.memory.prefetch import PrefetchingTable
from engram_lm.models.transformer import EngramLM

CPU_WORKLOADS = {"prefill": (128,), "decode": (1,), "new_tokens": 16}  # a 4B model in fp32 on 2 cores: ~0.1 s a token
GPU_WORKLOADS = {"prefill": (1024, 4096), "decode": (1, 8, 32), "new_tokens": 64}


@dataclass(frozen=True)
class Workload:
    kind: str  # "prefill", "decode" or "offline"
    size: int  # tokens of the prefill, the decode batch, or the offline sequences
    new_tokens: int = 0
    lengths: tuple[tuple[int, int], ...] = ()  # offline: (prompt, output) tokens of each sequence
    wave: int = 0  # offline: sequences decoded together

    @property
    def name(self) -> str:
        return {"prefill": f"prefill-{self.size}", "decode": f"decode-b{self.size}"}.get(self.kind, f"offline-{self.size}")

    @property
    def longest(self) -> int:
        """Prompt tokens the workload's ids must hold."""
        return max([p for p, _ in self.lengths], default=self.size if self.kind == "prefill" else 16)

    @property
    def batch(self) -> int:
        return {"decode": self.size, "offline": self.wave}.get(self.kind, 1)


def workloads(prefill: tuple[int, ...], decode: tuple[int, ...], new_tokens: int,
              offline: tuple[int, int, int, int] | None = None) -> list[Workload]:  # fmt: skip
    works = [Workload("prefill", t) for t in prefill] + [Workload("decode", b, new_tokens) for b in decode]
    return works + ([offline_workload(*offline)] if offline else [])


def offline_workload(sequences: int, low: int, high: int, wave: int, seed: int = 0) -> Workload:
    """The paper's offline batch (nano-vLLM's benchmark): `sequences` requests, each with a prompt and an
    output of Uniform(low, high) tokens, drawn once from `seed`; served in waves of `wave` sequences
    sorted by length (a static batch per wave, padded to its longest prompt and output: a paged
    engine's continuous batching wastes less), throughput counted in the requested output tokens."""
    if sequences < 1 or wave < 1 or not 1 <= low <= high:
        raise ValueError(f"--offline {sequences},{low},{high},{wave}: give SEQUENCES,LOW,HIGH,WAVE with 1 <= LOW <= HIGH "
                         "and at least one sequence and one per wave (the paper: 512,100,1024)")  # fmt: skip
    rng = np.random.default_rng(seed)
    lengths = sorted(zip(rng.integers(low, high + 1, sequences).tolist(), rng.integers(low, high + 1, sequences).tolist()),
                     key=sum)  # fmt: skip
    return Workload("offline", sequences, lengths=tuple(lengths), wave=min(wave, sequences))


def offline_waves(work: Workload):
    """(prompt length, output length, sequences) of each wave: its longest prompt and output."""
    for start in range(0, len(work.lengths), work.wave):
        group = work.lengths[start : start + work.wave]
        yield max(p for p, _ in group), max(o for _, o in group), len(group)


def penalty_interval(with_table: list[float], without: list[float], resamples: int = 2000,
                     seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Seconds per turn, paired by turn: the median ratio - 1 and a bootstrap 95% interval of it."""
    if len(with_table) != len(without) or not with_table:
        raise ValueError(f"paired timings need as many turns with the table as without, got {len(with_table)} and {len(without)}")
    ratios = np.asarray(with_table) / np.asarray(without)
    medians = np.median(np.random.default_rng(seed).choice(ratios, size=(resamples, len(ratios))), axis=1)
    return {"penalty": float(np.median(ratios) - 1), "ci95": [float(np.quantile(medians, 0.025) - 1),
                                                              float(np.quantile(medians, 0.975) - 1)], "turns": len(ratios)}  # fmt: skip


def check_fits(shape: Shape, table_bytes: int, workdir: Path, dtype_bytes: int, *, memory: int | None = None,
               disk: int | None = None) -> int:  # fmt: skip
    """The backbone's parameter count; refuses, before anything is written, a shape whose weights (and
    the RAM tier's copy of the table) exceed the available memory, or a table larger than the disk."""
    with torch.device("meta"):
        model = EngramLM(shape.model)
    params = sum(p.numel() for n, p in model.named_parameters() if ".memory." not in n)
    check_fits_bytes(shape.name, params, dtype_bytes, table_bytes, table_bytes, workdir, memory=memory, disk=disk)
    return params


def check_fits_bytes(name: str, params: int, dtype_bytes: int, in_memory: int, file_bytes: int, workdir: Path, *,
                     memory: int | None = None, disk: int | None = None,
                     fix: str = "a smaller --table-gb, fewer --tiers, or a larger machine") -> None:  # fmt: skip
    """Refuses, in one line naming what it needs, weights plus `in_memory` table bytes beyond 90% of
    the available memory, or a table file of `file_bytes` (+1 GB) beyond the free disk of `workdir`."""
    from engram_lm.memory.tiered import available_memory_bytes

    need = params * dtype_bytes + in_memory
    memory = available_memory_bytes() if memory is None else memory
    if memory is not None and need > 0.9 * memory:
        raise ValueError(f"--shape {name} needs {need / 1e9:.1f} GB of memory ({params / 1e9:.2f}B parameters at "
                         f"{dtype_bytes} bytes + a {in_memory / 1e9:.1f} GB table for the ram tier), this machine has "
                         f"{memory / 1e9:.1f} GB available: {fix}")  # fmt: skip
    disk = _free_disk(workdir) if disk is None else disk
    if file_bytes + (1 << 30) > disk:
        raise ValueError(f"--shape {name}: the table file needs {file_bytes / 1e9:.1f} GB + 1 GB free in {workdir}, which "
                         f"has {disk / 1e9:.1f} GB: a smaller --table-gb or another --workdir")  # fmt: skip


def _free_disk(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def build_model(shape: Shape, device: torch.device) -> EngramLM:
    """The shape's model with random fp32 weights, its table left on the meta device (the tiers serve it)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = EngramLM(shape.model)
    placeholders = {i: b.engram.memory for i, b in enumerate(model.blocks) if b.engram is not None}
    for i in placeholders:
        model.blocks[i].engram.memory = None
    model.to_empty(device=device)
    model._init_weights()
    with torch.no_grad():  # the module's value rows start at zero: random, so its output counts
        for i in placeholders:
            model.blocks[i].engram.key_value.weight.normal_(std=0.02)
    model.init_rope(device)
    for i, table in placeholders.items():
        model.blocks[i].engram.memory = table
    return model.eval()


def write_table(path: Path, rows: int, dim: int, chunk: int = 1 << 20) -> None:
    """Random fp32 rows, chunk by chunk (the table is never in memory whole)."""
    g = torch.Generator().manual_seed(1)
    with path.open("wb") as f:
        for start in range(0, rows, chunk):
            f.write(encode_rows(torch.randn(min(chunk, rows - start), dim, generator=g) * 0.02, "fp32").tobytes())


def time_workload(model: EngramLM, work: Workload, ids: torch.Tensor) -> dict[str, Any]:
    """Seconds for the workload (and each decode step's seconds), on `ids` of shape (B, T)."""

    def start(prompt, total):
        cache = model.new_cache(prompt.shape[0], total)
        return model(prompt, cache=cache)[0][:, -1].argmax(-1, keepdim=True), cache

    def step(nxt, cache):
        return model(nxt, cache=cache)[0][:, -1].argmax(-1, keepdim=True)

    return timed(work, ids, model.head.weight.device, model, start, step)


def timed(work: Workload, ids: torch.Tensor, device: torch.device, full, start, step) -> dict[str, Any]:
    """Seconds for `work` on `ids` (B, T), whatever the model: `full(ids_BT)` a forward without a cache,
    `start(prompt_BT, total_len) -> (next_B1, state)` a prefill into a cache for `total_len` tokens,
    `step(next_B1, state) -> next_B1` one greedy decode step. Prefill: the cacheless forward; decode:
    each step timed (a 16-token prompt first, untimed); offline: every wave's prefill and steps."""
    with torch.no_grad():
        if work.kind == "prefill":
            _sync(device)
            t0 = time.perf_counter()
            full(ids[:1, : work.size].to(device))
            _sync(device)
            return {"seconds": time.perf_counter() - t0, "tokens": work.size}
        if work.kind == "offline":
            _sync(device)
            t0 = time.perf_counter()
            for prompt_len, output_len, count in offline_waves(work):
                nxt, state = start(ids[:count, :prompt_len].to(device), prompt_len + output_len)
                for _ in range(output_len - 1):
                    nxt = step(nxt, state)
            _sync(device)
            return {"seconds": time.perf_counter() - t0, "tokens": sum(o for _, o in work.lengths)}
        prompt = ids[: work.size, :16].to(device)
        nxt, state = start(prompt, prompt.shape[1] + work.new_tokens)
        steps = []
        for _ in range(work.new_tokens):
            _sync(device)
            t0 = time.perf_counter()
            nxt = step(nxt, state)
            _sync(device)
            steps.append(time.perf_counter() - t0)
        return {"seconds": sum(steps), "tokens": work.size * work.new_tokens, "steps": steps}


def workload_ids(works: list[Workload], vocab: int) -> torch.Tensor:
    """Random ids every workload reads from: as many rows as the largest batch, as long as the longest prompt."""
    shape = (max(w.batch for w in works), max(w.longest for w in works))
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(2))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tier_names(device: torch.device, tiers: tuple[str, ...]) -> list[str]:
    names = [t for t in tiers if t != "device" or device.type == "cuda"]
    return [n + suffix for n in names for suffix in ("", "+prefetch")]


def make_table(name: str, path: Path, rows: int, dim: int, device: torch.device):
    from engram_lm.bench.offload import _table

    tier = name.removesuffix("+prefetch")
    if tier == "device":
        from engram_lm.memory.dense import DenseTable

        table = DenseTable(rows, dim)
        table.weight = torch.nn.Parameter(torch.from_numpy(np.fromfile(path, dtype=np.float32)).view(rows, dim).to(device),
                                          requires_grad=False)  # fmt: skip
    elif tier == "ram":
        from engram_lm.memory.host import HostTable

        table = HostTable(torch.from_numpy(np.fromfile(path, dtype=np.float32)).view(rows, dim), device=device)
    else:  # tiered (the default budget: the whole file, or half the available memory), mmap, ssd
        table = _table(tier, None, path, rows, dim, device)
    return PrefetchingTable(table, device=device, policy="always") if name.endswith("+prefetch") else table


def bench_penalty(shape_name: str, *, table_gb: float = 1.0, workdir: Path | None = None, device: str = "cpu",
                  turns: int = 5, tiers: tuple[str, ...] = ("device", "ram", "tiered", "mmap", "ssd"),
                  prefill: tuple[int, ...] | None = None, decode: tuple[int, ...] | None = None,
                  new_tokens: int | None = None, cold: bool = True, shape: Shape | None = None,
                  offline: tuple[int, int, int, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every tier x prefetch against the backbone without Engram, warm (alternating turns) and cold.
    A released model's shape (bench/hf_shapes.py) runs its own table instead (`table_gb` unused)."""
    from engram_lm.bench.hf_shapes import HF_SHAPES
    from engram_lm.training.allocator import keep_large_buffers_on_heap

    keep_large_buffers_on_heap()
    if shape is None and shape_name in HF_SHAPES:
        from engram_lm.bench.hf_penalty import bench_hf_penalty

        return bench_hf_penalty(HF_SHAPES[shape_name](), workdir=workdir, device=device, turns=turns, tiers=tiers,
                                prefill=prefill, decode=decode, new_tokens=new_tokens, cold=cold, offline=offline)  # fmt: skip
    device = torch.device(device)
    defaults = GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    works = workloads(prefill or defaults["prefill"], decode or defaults["decode"], new_tokens or defaults["new_tokens"], offline)
    shape = shape or get_shape(shape_name)
    e = shape.model.engram
    dim = e.head_dim
    rows_per_head = max(1009, int(table_gb * 1e9 / row_bytes("fp32", dim) / e.num_hash_columns))
    shape = shape.with_table(rows_per_head)
    workdir = Path(workdir or tempfile.gettempdir())
    with torch.device("meta"):
        rows = EngramLM(shape.model).blocks[e.layer_ids[0]].engram.memory.num_rows
    table_bytes = rows * row_bytes("fp32", dim)
    params = check_fits(shape, table_bytes if "ram" in tiers or "device" in tiers else 0, workdir, 4)
    model = build_model(shape, device)
    ids = workload_ids(works, shape.model.vocab_size)
    names = tier_names(device, tiers)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "table.bin"
        write_table(path, rows, dim)
        runner = EngramRunner(model, shape, path, rows, dim, device)
        warm = _warm(runner, works, ids, names, turns)
        cold_results = _cold(runner, works, ids, names, warm["none"]) if cold else {}
    return {"shape": shape.name, "source": shape.source, "chosen": shape.chosen, "params": params,
            "table_rows": rows, "table_bytes": table_bytes, "device": str(device), "torch_threads": torch.get_num_threads(),
            "turns": turns, "workloads": [w.name for w in works], "new_tokens": max(w.new_tokens for w in works),
            "scaled_for_cpu": device.type != "cuda", "warm": warm, "cold": cold_results,
            "peak_rss_gb": _peak_rss() / 1e9}  # fmt: skip


class EngramRunner:
    """How the timing loop drives an engram-lm model: a tier's table under its Engram layer (or no
    Engram at all), and one workload timed."""

    def __init__(self, model: EngramLM, shape: Shape, path: Path, rows: int, dim: int, device: torch.device) -> None:
        self.model, self.shape, self.path, self.rows, self.dim, self.device = model, shape, path, rows, dim, device
        self.layer = shape.model.engram.layer_ids[0]
        self.engram, self.hasher = model.blocks[self.layer].engram, model.hasher

    def make_table(self, name: str):
        return make_table(name, self.path, self.rows, self.dim, self.device)

    def install(self, table) -> None:
        """The table under the Engram layer, or (table None) the backbone without Engram at all."""
        if table is None:
            self.model.blocks[self.layer].engram = self.model.hasher = None
        else:
            self.model.blocks[self.layer].engram, self.model.hasher = self.engram, self.hasher
            self.engram.memory = table

    def time(self, work: Workload, ids: torch.Tensor) -> dict[str, Any]:
        return time_workload(self.model, work, ids)

    def placement(self, table) -> dict[str, Any]:
        return {k: v for k, v in table.placement().items() if isinstance(v, (int, float, str))}

    def close(self, table) -> None:
        table.close()


def _warm(runner, works, ids, names, turns) -> dict[str, Any]:
    """Every configuration built once, then timed in alternating turns (the first turn warms every tier, uncounted)."""
    tables = {"none": None, **{n: runner.make_table(n) for n in names}}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {n: {w.name: [] for w in works} for n in tables}
    order = list(tables)
    for turn in range(turns + 1):
        for name in order[turn % len(order) :] + order[: turn % len(order)]:
            runner.install(tables[name])
            for work in works:
                sample = runner.time(work, ids)
                if turn:
                    samples[name][work.name].append(sample)
    out = {name: summarise(samples[name], samples["none"]) for name in order}
    for name, table in tables.items():
        if table is not None:
            runner.install(table)
            out[name]["placement"] = runner.placement(table)
            runner.close(table)
    runner.install(None)
    return out


def _cold(runner, works, ids, names, warm_none) -> dict[str, Any]:
    """One configuration at a time on a file whose pages were dropped: its first contact, one turn,
    against the backbone timed just before it (a VM drifts over minutes: the warm median is a
    second reference, `penalty_vs_warm_none`)."""
    from engram_lm.bench.offload import _evict

    out = {}
    for name in names:
        if name.split("+")[0] in ("ram", "device"):
            continue  # in memory: nothing to drop
        runner.install(None)
        before = {w.name: _rate(runner.time(w, ids)) for w in works}
        _evict(runner.path)
        table = runner.make_table(name)
        runner.install(table)
        out[name] = {"resident_before": _resident_fraction(runner.path), **{
            w.name: _rate(runner.time(w, ids)) for w in works}}  # fmt: skip
        out[name]["placement"] = runner.placement(table)
        runner.close(table)
        for work, ref in before.items():
            entry = out[name][work]
            entry["penalty"] = ref["tok_s"] / entry["tok_s"] - 1
            entry["penalty_vs_warm_none"] = warm_none[work]["tok_s"] / entry["tok_s"] - 1
            entry["none_tok_s"] = ref["tok_s"]
    runner.install(None)
    return out


def summarise(samples: dict[str, list[dict[str, Any]]], reference: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per workload: median tokens/s, the paired penalty against `reference` with its interval, and
    the per-token p50 / p99 of decode steps."""
    out = {}
    for work, runs in samples.items():
        entry = {"tok_s": statistics.median(r["tokens"] / r["seconds"] for r in runs)}
        if reference[work] is not runs:
            entry.update(penalty_interval([r["seconds"] for r in runs], [r["seconds"] for r in reference[work]]))
        steps = [s for r in runs for s in r.get("steps", [])]
        if steps:
            entry["p50_ms"], entry["p99_ms"] = (1e3 * float(np.quantile(steps, q)) for q in (0.5, 0.99))
        out[work] = entry
    return out


def _rate(sample: dict[str, Any]) -> dict[str, float]:
    out = {"tok_s": sample["tokens"] / sample["seconds"]}
    if sample.get("steps"):
        out["p50_ms"], out["p99_ms"] = (1e3 * float(np.quantile(sample["steps"], q)) for q in (0.5, 0.99))
    return out


def _resident_fraction(path: Path) -> float | None:
    """The share of the file's pages in the page cache (mincore through a fresh mapping, which
    itself brings no page in); None where unknown."""
    import ctypes
    import mmap

    size = path.stat().st_size
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        resident = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
        with path.open("rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            view = np.frombuffer(m, dtype=np.uint8)
            ok = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size),
                              ctypes.c_void_p(resident.ctypes.data)) == 0  # fmt: skip
            del view  # the mapping closes only without views
        return float((resident & 1).mean()) if ok else None
    except (OSError, AttributeError, ValueError):
        return None


def _peak_rss() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
