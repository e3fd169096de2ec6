"""`engram bench hashing`: hashing throughput of the torch path next to plain NumPy.

Both hash the same random raw ids with the paper-demo layout (compression included),
in the same run, and must agree exactly; the best of `repeats` runs is reported.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

from engram_lm.hashing.hasher import NgramHasher
from engram_lm.hashing.reference import reference_hash
from engram_lm.presets import paper_demo


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_hashing(batch: int = 64, seq: int = 4096, repeats: int = 3, seed: int = 0) -> dict:
    hasher = NgramHasher.from_config(paper_demo())
    gen = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(0, hasher.projection.raw_size, (batch, seq), generator=gen)
    ids_np = ids_BT.numpy()
    torch_out = hasher(ids_BT)
    numpy_out = reference_hash(ids_np, hasher.layout, hasher.projection)
    agree = all(np.array_equal(torch_out[k].numpy(), numpy_out[k]) for k in numpy_out)
    t_torch = _best_seconds(lambda: hasher(ids_BT), repeats)
    t_numpy = _best_seconds(lambda: reference_hash(ids_np, hasher.layout, hasher.projection), repeats)
    tokens = batch * seq
    return {
        "layout": "paper-demo",
        "fingerprint": hasher.layout.fingerprint,
        "batch": batch,
        "seq": seq,
        "layers": len(hasher.layout.layers),
        "hash_columns_per_layer": hasher.num_columns,
        "torch_tokens_per_s": tokens / t_torch,
        "numpy_tokens_per_s": tokens / t_numpy,
        "speedup_vs_numpy": t_numpy / t_torch,
        "outputs_equal": agree,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
