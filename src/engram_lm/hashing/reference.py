"""A plain NumPy restatement of the reference demo's hashing, kept beside the fast path.

Slow and obviously correct: shift with np.pad, multiply, XOR, floor-mod, one head at a
time. Tests check the torch path against it; `engram bench hashing` times both.
"""

from __future__ import annotations

import numpy as np

from engram_lm.hashing.layout import HashLayout
from engram_lm.tokenizer.compression import VocabProjection


def reference_layer_hashes(canonical_BT: np.ndarray, layout: HashLayout, layer_id: int) -> np.ndarray:
    """Local per-head hash ids of one layer: (B, T, (N-1)*K) int64."""
    x = np.asarray(canonical_BT, dtype=np.int64)
    T = x.shape[1]
    layer = layout.layer(layer_id)
    m = np.asarray(layer.multipliers, dtype=np.int64)
    shifted = [x] + [
        np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=layout.pad_id)[:, :T]
        for k in range(1, layout.max_ngram)
    ]
    columns = []
    with np.errstate(over="ignore"):  # int64 wraps, as in the reference
        for n in range(2, layout.max_ngram + 1):
            mix = shifted[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifted[k] * m[k])
            for prime in layer.primes[n - 2]:
                columns.append(mix % prime)
    return np.stack(columns, axis=2)


def reference_hash(raw_BT: np.ndarray, layout: HashLayout, projection: VocabProjection) -> dict[int, np.ndarray]:
    """The demo's NgramHashMapping.hash: compress, then hash every layer."""
    canonical = projection.compress_numpy(raw_BT)
    return {layer_id: reference_layer_hashes(canonical, layout, layer_id) for layer_id in layout.layer_ids}
