"""The hash layout: per-layer multipliers, prime table sizes, head offsets, fingerprint.

Reference-exact (ENGRAM_SPEC s.3): multipliers come from NumPy's default_rng seeded with
seed + 10007 * layer_id; primes are searched per layer (in the configured order), per
order, per head, from engram_vocab_size - 1, never reusing a prime anywhere in the model.
The fingerprint freezes this contract: every checkpoint stores it, and a layout that
hashes differently has a different fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from engram_lm.config import EngramConfig
from engram_lm.hashing.primes import next_unused_prime

LAYER_SEED_STRIDE = 10007  # PRIME_1 in the reference demo
LAYOUT_VERSION = 1  # bump on any change to how ids are hashed


@dataclass(frozen=True, slots=True)
class LayerLayout:
    layer_id: int
    multipliers: tuple[int, ...]  # N odd int64 multipliers, lookback k = 0..N-1
    primes: tuple[tuple[int, ...], ...]  # [order n-2][head k]: per-head table size

    @property
    def head_sizes(self) -> tuple[int, ...]:
        """Table size of each hash column, ordered n=2 heads 0..K-1, n=3 heads 0..K-1, ..."""
        return tuple(p for order in self.primes for p in order)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First global row of each hash column in the layer's single table."""
        return (0, *accumulate(self.head_sizes[:-1]))

    @property
    def rows(self) -> int:
        return sum(self.head_sizes)


@dataclass(frozen=True, slots=True)
class HashLayout:
    compressed_vocab_size: int
    pad_id: int  # already mapped through the compression
    max_ngram: int
    num_heads: int
    seed: int
    layers: tuple[LayerLayout, ...]
    compression_digest: str = ""  # sha256 of the projection lookup; "" when unknown

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(layer.layer_id for layer in self.layers)

    def layer(self, layer_id: int) -> LayerLayout:
        for layer in self.layers:
            if layer.layer_id == layer_id:
                return layer
        raise ValueError(f"layer {layer_id} has no Engram; Engram layers are {list(self.layer_ids)}")

    @property
    def total_rows(self) -> int:
        return sum(layer.rows for layer in self.layers)

    def num_params(self, head_dim: int) -> int:
        """Embedding parameters of all layer tables for a given head dim."""
        return self.total_rows * head_dim

    def to_dict(self) -> dict:
        return {
            "layout_version": LAYOUT_VERSION,
            "compressed_vocab_size": self.compressed_vocab_size,
            "pad_id": self.pad_id,
            "max_ngram": self.max_ngram,
            "num_heads": self.num_heads,
            "seed": self.seed,
            "compression_digest": self.compression_digest,
            "layers": {
                str(layer.layer_id): {
                    "multipliers": list(layer.multipliers),
                    "primes": [list(order) for order in layer.primes],
                    "offsets": list(layer.offsets),
                    "rows": layer.rows,
                }
                for layer in self.layers
            },
        }

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def layer_multipliers(layer_id: int, seed: int, max_ngram: int, compressed_vocab_size: int) -> tuple[int, ...]:
    """Odd multipliers 2r+1, r ~ default_rng(seed + 10007*layer).integers(0, half_bound, N).

    half_bound keeps id * multiplier below 2**63 for every canonical id < V'."""
    half_bound = max(1, ((2**63 - 1) // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * layer_id))
    r = rng.integers(low=0, high=half_bound, size=(max_ngram,), dtype=np.int64)
    return tuple(int(2 * v + 1) for v in r)


def build_layout(
    config: EngramConfig, compressed_vocab_size: int, pad_id: int, compression_digest: str = ""
) -> HashLayout:
    """The layout for `config` given the compressed vocabulary size and the mapped pad id."""
    if compressed_vocab_size < 1:
        raise ValueError(f"compressed vocabulary size must be >= 1, got {compressed_vocab_size}")
    used: set[int] = set()
    layers = []
    for layer_id in config.layer_ids:
        primes = []
        for base in config.table_sizes:
            start, order = base - 1, []
            for _ in range(config.num_heads):
                start = next_unused_prime(start, used)
                used.add(start)
                order.append(start)
            primes.append(tuple(order))
        multipliers = layer_multipliers(layer_id, config.seed, config.max_ngram, compressed_vocab_size)
        layers.append(LayerLayout(layer_id, multipliers, tuple(primes)))
    return HashLayout(
        compressed_vocab_size=compressed_vocab_size,
        pad_id=pad_id,
        max_ngram=config.max_ngram,
        num_heads=config.num_heads,
        seed=config.seed,
        layers=tuple(layers),
        compression_digest=compression_digest,
    )
