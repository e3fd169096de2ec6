"""DeepSeek-V4.1-Flash's Engram addressing against SGLang's merged V4.1 Engram code.

SGLang (sgl-project/sglang, commit 4be612a4e88844801456247768a23ca6b9bdf010,
python/sglang/srt/layers/engram.py: `compute_hash_multipliers`, `EngramLayout.build`,
`EngramHasher.__init__` (offsets), `compute_engram_hash_ids`) is restated below in NumPy, line
for line in meaning, and compared with engram-lm's v4.1 layout (presets.v4_1, hashing/layout.py)
and hashing (hashing/reference.py) at the real configuration: layers [1, 14], n-grams up to 4,
8 heads, base 16,000,000 rows, compressed vocabulary 99,092 (config.json's
engram_compressed_vocab_size). The rows are ids into each layer's table; the golden values
at the end pin them independently of both codes.
"""

import numpy as np
import pytest

from engram_lm.hashing.layout import build_layout
from engram_lm.hashing.primes import is_prime
from engram_lm.hashing.reference import reference_layer_hashes
from engram_lm.presets import v4_1

LAYERS, MAX_N, HEADS, BASE, VOCAB = (1, 14), 4, 8, 16_000_000, 99_092


def sglang_multipliers():
    """compute_hash_multipliers: per layer default_rng(10007 * layer), odd, bounded by int64 / V."""
    bound = max(1, (np.iinfo(np.int64).max // VOCAB) // 2)
    return np.stack([np.random.default_rng(10007 * layer).integers(0, bound, size=(MAX_N,), dtype=np.int64) * 2 + 1
                     for layer in LAYERS])  # fmt: skip


def sglang_primes():
    """EngramLayout.build: per layer, per n-gram size, heads drawn from base - 1 upwards, never reused."""
    primes, seen = [], set()
    for _ in LAYERS:
        per_n = []
        for _ in range(MAX_N - 1):
            sizes, current = [], BASE - 1
            for _ in range(HEADS):
                current += 1
                while not is_prime(current) or current in seen:
                    current += 1
                seen.add(current)
                sizes.append(current)
            per_n.append(sizes)
        primes.append(per_n)
    return np.array(primes, dtype=np.int64)  # [layer][n-gram size][head]


def sglang_hash_ids(compressed_BT: np.ndarray, pad: int) -> np.ndarray:
    """compute_engram_hash_ids on whole sequences: column s of `tokens` is the s-th predecessor
    (pad where it runs off the start); [B, T, layers, (N - 1) * heads] row ids."""
    B, T = compressed_BT.shape
    mult, primes = sglang_multipliers(), sglang_primes()
    flat = primes.reshape(len(LAYERS), -1)
    offsets = np.concatenate([np.zeros((len(LAYERS), 1), np.int64), np.cumsum(flat, 1)[:, :-1]], 1)
    t = np.arange(T)
    tokens = np.stack([np.where(t - s >= 0, compressed_BT[:, np.clip(t - s, 0, None)], pad) for s in range(MAX_N)], -1)
    with np.errstate(over="ignore"):
        products = tokens[:, :, None, :] * mult[None, None]  # [B, T, L, N]
        rolling, hashes = products[..., 0], []
        for i in range(1, MAX_N):
            rolling = np.bitwise_xor(rolling, products[..., i])
            hashes.append(rolling[..., None] % primes[:, i - 1][None, None])
    return np.concatenate(hashes, -1) + offsets[None, None]


@pytest.fixture(scope="module")
def layout():
    return build_layout(v4_1(), VOCAB, 2)


def test_layout_equals_sglangs(layout):
    primes, mult = sglang_primes(), sglang_multipliers()
    for k, layer_id in enumerate(LAYERS):
        ours = layout.layer(layer_id)
        assert np.array_equal(np.array(ours.primes), primes[k]) and ours.multipliers == tuple(int(m) for m in mult[k])
    assert [int(p.sum()) for p in primes] == [layer.rows for layer in layout.layers] == [384_006_168, 384_016_682]


def test_row_ids_equal_sglangs_at_every_position(layout):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(3, 64), dtype=np.int64)
    ids[1, :5] = VOCAB - 1  # the largest compressed id: the multipliers' overflow bound
    ids[2, 10] = layout.pad_id  # the pad inside a sequence hashes as a token
    want = sglang_hash_ids(ids, layout.pad_id)
    for k, layer_id in enumerate(LAYERS):
        ours = reference_layer_hashes(ids, layout, layer_id) + np.array(layout.layer(layer_id).offsets)
        assert np.array_equal(ours, want[:, :, k])


def test_golden_row_ids(layout):
    """Pinned values (computed once from the restated SGLang code) for ids 5, 17, 99091, 42."""
    ids = np.array([[5, 17, 99_091, 42]], dtype=np.int64)
    got = sglang_hash_ids(ids, layout.pad_id)
    ours = [reference_layer_hashes(ids, layout, lid) + np.array(layout.layer(lid).offsets) for lid in LAYERS]
    assert np.array_equal(np.stack(ours, 2), got)
    assert got.shape == (1, 4, 2, 24) and (got[..., :8] < 8 * 16_000_200).all()
    assert got[0, 3, 0, :3].tolist() == GOLDEN_LAYER1_POS3_FIRST3
    assert got[0, 3, 1, -1].item() == GOLDEN_LAYER14_POS3_LAST


GOLDEN_LAYER1_POS3_FIRST3 = [13_131_409, 22_107_638, 46_286_683]  # layer 1, position 3, 2-gram heads 0-2
GOLDEN_LAYER14_POS3_LAST = 382_145_690  # layer 14, position 3, 4-gram head 7
