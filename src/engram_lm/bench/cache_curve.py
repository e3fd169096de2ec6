"""`engram bench cache-curve`: hot-row cache hit rate against cache size, on held-out text.

The access stream is real: the Engram rows (2- and 3-gram, every hash head, one layer)
that a corpus's tokens address, in reading order. A cache is warmed on a stretch of the
training split, then its hit rate is measured on the validation split (held out). Sizes
are shares of the table's rows. Policies, all simulated exactly (counts, not timings):
- lru:          least recently used;
- w-tinylfu:    Window-TinyLFU (Einziger, Friedman & Manes 2017): a 1% LRU window in front
                of a segmented LRU (20% probation, 80% protected); a count-min sketch
                (4 rows, halved every 10x capacity accesses) admits a window victim into
                the main area only if it is more frequent than the probation victim;
- engram-lm:    the CachedTable in memory/cache.py (frequency-gated admission, LFU eviction);
- static-top:   the rows most frequent in the warm-up stream, pinned (addresses are known
                from the tokens, so a server can pin them ahead of time).
Hit and miss costs are timings and belong to `engram bench offload` on a quiet machine.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHARES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
POLICIES = ("lru", "w-tinylfu", "engram-lm", "static-top")


def access_streams(corpus: str, tokenizer: str, table_size: int, num_heads: int, warm_tokens: int,
                   measure_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """(warm rows, measured rows, table rows): global row ids of one Engram layer in reading order."""
    from engram_lm.config import EngramConfig
    from engram_lm.hashing.hasher import NgramHasher
    from engram_lm.training.data import prepare_data

    data = prepare_data(corpus, tokenizer)
    cfg = EngramConfig(tokenizer=str(data.tokenizer_path), table_sizes=(table_size, table_size), max_ngram=3,
                       num_heads=num_heads, layer_ids=(1,), pad_id=data.eod_id, embed_per_ngram=8 * num_heads)  # fmt: skip
    hasher = NgramHasher.from_config(cfg)

    def rows(tokens: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
        return hasher.hash_all(ids, eod_id=data.eod_id, global_rows=True)[0, 0].reshape(-1).numpy()

    return rows(data.train[:warm_tokens]), rows(data.val[:measure_tokens]), hasher.layout.layers[0].rows


def lru_hits(warm: np.ndarray, measure: np.ndarray, capacity: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for phase, stream in ((0, warm), (1, measure)):
        for r in stream.tolist():
            if r in cache:
                cache.move_to_end(r)
                hits += phase
            else:
                cache[r] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / len(measure)


class _Sketch:
    """Count-min sketch with 4 rows of 4-bit-like saturating counters, halved periodically."""

    def __init__(self, capacity: int) -> None:
        self.width = max(16, 1 << int(np.ceil(np.log2(4 * capacity))))
        self.table = np.zeros((4, self.width), dtype=np.uint8)
        self.seeds = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)
        self.sample, self.count = 10 * capacity, 0

    def _slots(self, key: int) -> list[int]:
        return [((key * s) >> 7) % self.width for s in self.seeds]

    def add(self, key: int) -> None:
        for i, j in enumerate(self._slots(key)):
            if self.table[i, j] < 15:
                self.table[i, j] += 1
        self.count += 1
        if self.count >= self.sample:  # aging: old popularity fades
            self.table >>= 1
            self.count = 0

    def estimate(self, key: int) -> int:
        return int(min(self.table[i, j] for i, j in enumerate(self._slots(key))))


def w_tinylfu_hits(warm: np.ndarray, measure: np.ndarray, capacity: int) -> float:
    window_cap = max(1, capacity // 100)
    main_cap = max(1, capacity - window_cap)
    protected_cap = max(1, int(0.8 * main_cap))
    window: OrderedDict[int, None] = OrderedDict()
    probation: OrderedDict[int, None] = OrderedDict()
    protected: OrderedDict[int, None] = OrderedDict()
    sketch = _Sketch(capacity)
    hits = 0
    for phase, stream in ((0, warm), (1, measure)):
        for r in stream.tolist():
            sketch.add(r)
            if r in window:
                window.move_to_end(r)
                hits += phase
            elif r in protected:
                protected.move_to_end(r)
                hits += phase
            elif r in probation:  # promoted on its second hit
                del probation[r]
                protected[r] = None
                hits += phase
                if len(protected) > protected_cap:
                    demoted, _ = protected.popitem(last=False)
                    probation[demoted] = None
            else:
                window[r] = None
                if len(window) > window_cap:
                    candidate, _ = window.popitem(last=False)
                    if len(probation) + len(protected) < main_cap:
                        probation[candidate] = None
                    elif probation:
                        victim = next(iter(probation))
                        if sketch.estimate(candidate) > sketch.estimate(victim):
                            del probation[victim]
                            probation[candidate] = None
    return hits / len(measure)


def engram_lm_hits(warm: np.ndarray, measure: np.ndarray, capacity: int, num_rows: int, batch: int = 1024) -> float:
    """Fed in calls of `batch` reads (1024: one 128-token sequence of one layer); its
    frequency counters count a row once per call."""
    from engram_lm.memory.cache import CachedTable
    from engram_lm.memory.host import HostTable

    cache = CachedTable(HostTable(torch.zeros(num_rows, 1)), capacity)
    for start in range(0, len(warm), batch):
        cache(torch.from_numpy(warm[start : start + batch].astype(np.int64)))
    cache.reset_counters()
    for start in range(0, len(measure), batch):
        cache(torch.from_numpy(measure[start : start + batch].astype(np.int64)))
    return cache.hit_rate


def static_top_hits(warm: np.ndarray, measure: np.ndarray, capacity: int) -> float:
    rows, counts = np.unique(warm, return_counts=True)
    pinned = rows[np.argsort(-counts, kind="stable")[:capacity]]
    return float(np.isin(measure, pinned).mean())


def cache_curve(*, corpus: str = "bible", tokenizer: str = "bpe:4096", table_size: int = 20_480, num_heads: int = 4,
                warm_tokens: int = 100_000, measure_tokens: int = 50_000, shares=SHARES) -> dict[str, Any]:  # fmt: skip
    warm, measure, num_rows = access_streams(corpus, tokenizer, table_size, num_heads, warm_tokens, measure_tokens)
    rows = []
    for share in shares:
        cap = max(1, int(share * num_rows))
        rows.append({"share": share, "capacity_rows": cap, "lru": lru_hits(warm, measure, cap),
                     "w-tinylfu": w_tinylfu_hits(warm, measure, cap),
                     "engram-lm": engram_lm_hits(warm, measure, cap, num_rows),
                     "static-top": static_top_hits(warm, measure, cap)})  # fmt: skip
    distinct = len(np.unique(measure))
    return {"corpus": corpus, "table_rows": int(num_rows), "warm_accesses": int(len(warm)),
            "measured_accesses": int(len(measure)), "distinct_rows_measured": int(distinct),
            "unbounded_cold_hit_rate": 1 - distinct / len(measure), "rows": rows}  # fmt: skip


def plot_cache_curve(result: dict[str, Any], path: Path) -> None:
    from engram_lm.plotting import saved_figure

    with saved_figure(path, (6, 4)) as (fig, ax):
        xs = [r["share"] for r in result["rows"]]
        for policy in POLICIES:
            ax.plot(xs, [r[policy] for r in result["rows"]], marker="o", label=policy)
        ax.axhline(result["unbounded_cold_hit_rate"], color="grey", ls=":", lw=1, label="unbounded cache, cold start")
        ax.set_xscale("log")
        ax.set_xlabel("cache size (share of the table's rows)")
        ax.set_ylabel("hit rate on held-out text")
        ax.set_title(f"Hot-row cache, {result['corpus']}: {result['table_rows']:,} rows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
