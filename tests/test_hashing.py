import numpy as np
import pytest
import torch

from engram_lm.config import EngramConfig
from engram_lm.hashing.hasher import NgramHasher
from engram_lm.hashing.layout import build_layout
from engram_lm.hashing.ngram import hash_ngrams
from engram_lm.hashing.reference import reference_hash
from engram_lm.presets import paper_demo
from engram_lm.tokenizer.compression import VocabProjection


def _wrap64(v: int) -> int:
    return (v + 2**63) % 2**64 - 2**63


def scalar_hashes(ids, layout, layer_id, dead=None, eod_id=None):
    """Position-by-position Python-int restatement of the spec (incl. V4.1's latching rule)."""
    layer = layout.layer(layer_id)
    out = []
    for t in range(len(ids)):
        blocked, grams = False, []
        for j in range(layout.max_ngram):
            s = t - j
            blocked |= s < 0 or (dead is not None and dead[s]) or (j >= 1 and ids[s] == eod_id)
            grams.append(layout.pad_id if blocked else ids[s])
        row, mix = [], _wrap64(grams[0] * layer.multipliers[0])
        for n in range(2, layout.max_ngram + 1):
            mix = _wrap64(mix ^ _wrap64(grams[n - 1] * layer.multipliers[n - 1]))
            row += [mix % p for p in layer.primes[n - 2]]  # Python % is floor modulo
        out.append(row)
    return out


def small_hasher(vocab=50, max_ngram=3, heads=2, layers=(0, 3), seed=0, pad=1):
    cfg = EngramConfig(
        tokenizer=f"identity:{vocab}",
        table_sizes=tuple(100 + 37 * i for i in range(max_ngram - 1)),
        max_ngram=max_ngram,
        num_heads=heads,
        layer_ids=layers,
        pad_id=pad,
        seed=seed,
        embed_per_ngram=heads,
    )
    return NgramHasher(build_layout(cfg, vocab, pad), VocabProjection.identity(vocab))


def test_hand_computed_hashes():
    # multipliers (3, 7, 5), primes 11 (2-grams) and 13 (3-grams), pad 0, ids 1 2 3:
    # t0: 3^0=3 -> 3, 3 | t1: 6^7=1 -> 1, 1^0=1 | t2: 9^14=7 -> 7, 7^(1*5)=2 -> 2
    out = hash_ngrams(torch.tensor([[1, 2, 3]]), torch.tensor([[3, 7, 5]]), torch.tensor([[[11], [13]]]), 0)
    assert out.tolist() == [[[[3, 3], [1, 1], [7, 2]]]]


def test_negative_ids_use_floor_modulo():
    out = hash_ngrams(torch.tensor([[-1]]), torch.tensor([[3, 7]]), torch.tensor([[[11]]]), 0)
    assert out.item() == 8  # -3 mod 11 = 8 (floor), not -3 (truncation)


@pytest.mark.parametrize("case", range(12))
def test_torch_matches_numpy_reference_for_random_configs(case):
    rng = np.random.default_rng(case)
    vocab = int(rng.integers(2, 5000))
    hasher = small_hasher(
        vocab=vocab,
        max_ngram=int(rng.integers(2, 6)),
        heads=int(rng.integers(1, 5)),
        layers=tuple(int(x) for x in rng.choice(40, size=int(rng.integers(1, 4)), replace=False)),
        seed=int(rng.integers(0, 1000)),
        pad=int(rng.integers(0, vocab)),
    )
    ids = rng.integers(-3, vocab, size=(3, int(rng.integers(1, 40))))  # negatives pass through
    got = hasher(torch.from_numpy(ids))
    want = reference_hash(ids, hasher.layout, hasher.projection)
    for layer_id in hasher.layout.layer_ids:
        np.testing.assert_array_equal(got[layer_id].numpy(), want[layer_id])


def test_matches_scalar_spec_and_paper_demo_golden(v3_projection):
    hasher = NgramHasher.from_config(paper_demo(), v3_projection)
    ids = [22898, 19737, 270, 9327, 1494, 112253]  # "Only Alexander the Great could tame"
    got = hasher(torch.tensor([ids]))
    canonical = v3_projection.compress_numpy(np.array(ids)).tolist()
    for layer_id in (1, 15):
        assert got[layer_id][0].tolist() == scalar_hashes(canonical, hasher.layout, layer_id)
    # frozen contract: a change here invalidates every trained table
    assert hasher.layout.fingerprint == "7b13d98570fd33fd"
    assert got[1][0, 0, :4].tolist() == [456765, 210478, 187734, 544258]
    assert got[1][0, 2, -2:].tolist() == [367626, 433003]


def test_overflow_edge_largest_id_times_largest_multiplier():
    V = 98_627
    cfg = paper_demo().with_(tokenizer=f"identity:{V}", layer_ids=tuple(range(30)))
    layout = build_layout(cfg, V, 2)
    hasher = NgramHasher(layout, VocabProjection.identity(V))
    layer = max(layout.layers, key=lambda lay: max(lay.multipliers))
    assert max(layer.multipliers) * (V - 1) < 2**63  # the bound the multipliers guarantee
    ids = [V - 1, V - 1, V - 1, 0, V - 1]
    got = hasher(torch.tensor([ids]))[layer.layer_id][0].tolist()
    assert got == scalar_hashes(ids, layout, layer.layer_id)


def test_wrapping_products_match_python_int64_emulation():
    ids = [-(2**40), 2**41 + 3, -5]
    mult = [(2**40) + 1, (2**39) + 7, 3]
    got = hash_ngrams(torch.tensor([ids]), torch.tensor([mult]), torch.tensor([[[1_000_003], [999_983]]]), 2)
    x = ids
    t2_mix3 = _wrap64(_wrap64(_wrap64(x[2] * mult[0]) ^ _wrap64(x[1] * mult[1])) ^ _wrap64(x[0] * mult[2]))
    assert got[0, 0, 2, 1].item() == t2_mix3 % 999_983


def test_packed_row_hashes_like_separate_documents():
    hasher = small_hasher(vocab=30, max_ngram=4, heads=2)
    eod = 29
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(0, 29, size=n)) + [eod] for n in (1, 5, 0, 7, 2)]
    packed = torch.tensor([sum(docs, [])])
    got = hasher.hash_all(packed, eod_id=eod)
    separate = torch.cat([hasher.hash_all(torch.tensor([d])) for d in docs], dim=2)
    assert torch.equal(got, separate)
    assert not torch.equal(hasher.hash_all(packed), separate)  # without the flag n-grams cross


def test_dead_tokens_latch_like_v41():
    hasher = small_hasher(vocab=40, max_ngram=4, heads=1, layers=(2,))
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    dead = [False, False, True, False, False, False, True, False]
    got = hasher(torch.tensor([ids]), dead_BT=torch.tensor([dead]))[2][0].tolist()
    assert got == scalar_hashes(ids, hasher.layout, 2, dead=dead)
    # position 3 sees lookback 1 = dead -> its 2-gram reads (pad, 8), same as a row start
    start = hasher(torch.tensor([[8]]))[2][0, 0].tolist()
    assert got[3] == start


@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_full_sequence(seed):
    rng = np.random.default_rng(seed)
    hasher = small_hasher(vocab=25, max_ngram=int(rng.integers(2, 5)), heads=2)
    B, T, eod = 2, 30, 24
    ids = torch.from_numpy(rng.integers(0, 25, size=(B, T)))
    dead = torch.from_numpy(rng.random((B, T)) < 0.1)
    full = hasher.hash_all(ids, dead_BT=dead, eod_id=eod, global_rows=True)
    history, pieces, t = hasher.init_history(B), [], 0
    while t < T:
        s = int(rng.integers(1, 5))
        rows, history = hasher.step(
            history, ids[:, t : t + s], dead_BS=dead[:, t : t + s], eod_id=eod, global_rows=True
        )
        pieces.append(rows)
        t += s
    assert torch.equal(torch.cat(pieces, dim=2), full)


def test_global_rows_add_head_offsets():
    hasher = small_hasher()
    ids = torch.tensor([[3, 4, 5]])
    local, glob = hasher(ids), hasher(ids, global_rows=True)
    for layer in hasher.layout.layers:
        assert torch.equal(glob[layer.layer_id] - local[layer.layer_id], torch.tensor(layer.offsets).expand(1, 3, -1))
        assert int(glob[layer.layer_id].max()) < layer.rows


def test_hashing_is_causal():
    hasher = small_hasher(max_ngram=4)
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = a.clone()
    b[0, 4] = 9
    ha, hb = hasher.hash_all(a), hasher.hash_all(b)
    assert torch.equal(ha[:, :, :4], hb[:, :, :4]) and not torch.equal(ha[:, :, 4], hb[:, :, 4])


@pytest.mark.parametrize(
    "ids, error, message",
    [
        (torch.tensor([1, 2]), ValueError, "shape \\(B, T\\)"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer tensor"),
        ([[1, 2]], TypeError, "torch.Tensor"),
        (torch.tensor([[1, 50]]), ValueError, "outside the raw vocabulary \\[0, 50\\)"),
    ],
)
def test_bad_ids_are_refused(ids, error, message):
    with pytest.raises(error, match=message):
        small_hasher(vocab=50)(ids)


def test_bad_mask_and_history_are_refused():
    hasher = small_hasher()
    with pytest.raises(ValueError, match="dead-token mask has shape"):
        hasher(torch.tensor([[1, 2]]), dead_BT=torch.tensor([[True]]))
    with pytest.raises(ValueError, match="history holds 2 rows"):
        hasher.step(hasher.init_history(2), torch.tensor([[1]]))


def test_layout_and_projection_must_agree():
    layout = build_layout(EngramConfig(tokenizer="identity:10"), 10, 2)
    with pytest.raises(ValueError, match="compresses to 11"):
        NgramHasher(layout, VocabProjection.identity(11))


def test_suffix_windows_equal_the_shifted_copies_reference_with_dead_tokens_and_document_ends():
    from engram_lm.hashing.ngram import ngram_window_start, suffix_ngram_ids, suffix_ngram_ids_reference

    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 3, 7, 50):
        ids = torch.randint(-3, 100, (3, T), generator=g)  # negative pass-through markers too
        dead, ends = torch.rand(3, T, generator=g) < 0.2, torch.rand(3, T, generator=g) < 0.2
        for start in (None, ngram_window_start(T, dead, None), ngram_window_start(T, None, ends),
                      ngram_window_start(T, dead, ends)):  # fmt: skip
            for N in (2, 3, 4):
                assert torch.equal(suffix_ngram_ids(ids, N, 2, start), suffix_ngram_ids_reference(ids, N, 2, start))
