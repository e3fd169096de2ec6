import numpy as np
import pytest

from engram_lm.config import EngramConfig
from engram_lm.hashing.layout import build_layout, layer_multipliers
from engram_lm.hashing.primes import is_prime, next_unused_prime
from engram_lm.presets import get_preset, paper_27b, paper_demo, v4_1


def _sieve(n):
    flags = np.ones(n, dtype=bool)
    flags[:2] = False
    for i in range(2, int(n**0.5) + 1):
        if flags[i]:
            flags[i * i :: i] = False
    return flags


def test_is_prime_matches_sieve():
    flags = _sieve(20000)
    assert [is_prime(i) for i in range(20000)] == flags.tolist()


def test_is_prime_large_known_values():
    assert is_prime(2**61 - 1)  # Mersenne prime
    assert not is_prime(2**61 + 1)
    assert not is_prime(3215031751)  # strong pseudoprime to bases 2, 3, 5, 7


def test_next_unused_prime_skips_used():
    assert next_unused_prime(10, set()) == 11
    assert next_unused_prime(10, {11}) == 13
    assert next_unused_prime(11, set()) == 13  # strictly greater than start


def test_paper_demo_first_primes_from_spec():
    layout = build_layout(paper_demo(), 98_627, 2)
    assert layout.layer(1).primes[0][:3] == (646403, 646411, 646421)


def test_primes_are_distinct_across_layers_orders_and_heads():
    layout = build_layout(paper_demo(), 98_627, 2)
    all_primes = [p for layer in layout.layers for p in layer.head_sizes]
    assert len(all_primes) == len(set(all_primes)) == 2 * 2 * 8
    assert all(is_prime(p) for p in all_primes)


def test_v41_rows_and_primes_from_spec():
    layout = build_layout(v4_1(), 99_092, 2)
    assert [layer.rows for layer in layout.layers] == [384_006_168, 384_016_682]
    assert layout.layer(1).primes[0][:3] == (16000057, 16000079, 16000081)
    assert layout.layer(14).primes[0][0] == 16000477
    assert len(layout.layer(1).head_sizes) == 24


def test_paper_27b_table_params():
    cfg = paper_27b()
    layout = build_layout(cfg, 98_627, 2)
    assert cfg.memory_dim == 1280 and cfg.head_dim == 80
    assert 5.7e9 < layout.num_params(cfg.head_dim) < 5.85e9  # paper: 5.7B Engram params
    assert all(2_262_400 < p < 2_263_000 for p in layout.layer(1).head_sizes)


def test_multipliers_follow_numpy_default_rng():
    V = 98_627
    half = ((2**63 - 1) // V) // 2
    rng = np.random.default_rng(0 + 10007 * 15)
    expected = [2 * int(r) + 1 for r in rng.integers(0, half, size=3, dtype=np.int64)]
    got = layer_multipliers(15, seed=0, max_ngram=3, compressed_vocab_size=V)
    assert list(got) == expected
    assert all(m % 2 == 1 and m * (V - 1) < 2**63 for m in got)


def test_offsets_are_cumulative_head_sizes():
    layer = build_layout(EngramConfig(table_sizes=(10, 20), num_heads=2, embed_per_ngram=4), 50, 2).layers[0]
    assert layer.head_sizes == (11, 13, 23, 29)
    assert layer.offsets == (0, 11, 24, 47)
    assert layer.rows == 76


def test_fingerprint_is_stable_and_sensitive():
    cfg = paper_demo()
    base = build_layout(cfg, 98_627, 2, "abc").fingerprint
    assert base == build_layout(cfg, 98_627, 2, "abc").fingerprint
    variants = [
        build_layout(cfg.with_(seed=1), 98_627, 2, "abc"),
        build_layout(cfg.with_(layer_ids=(1, 16)), 98_627, 2, "abc"),
        build_layout(cfg.with_(table_sizes=(646400, 700000)), 98_627, 2, "abc"),
        build_layout(cfg, 98_628, 2, "abc"),
        build_layout(cfg, 98_627, 3, "abc"),
        build_layout(cfg, 98_627, 2, "abd"),
    ]
    assert len({base, *(v.fingerprint for v in variants)}) == 1 + len(variants)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_ngram": 1, "table_sizes": ()}, "max_ngram"),
        ({"num_heads": 0}, "num_heads"),
        ({"table_sizes": (646400, 1)}, "table_sizes"),
        ({"table_sizes": (646400,)}, "one base table size per order"),
        ({"layer_ids": (1, 1)}, "distinct"),
        ({"layer_ids": (-1, 2)}, ">= 0"),
        ({"layer_ids": ()}, "at least one"),
        ({"embed_per_ngram": 100}, "divisible by num_heads"),
        ({"num_branches": 0}, "num_branches"),
    ],
)
def test_invalid_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        paper_demo().with_(**changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt'"):
        get_preset("gpt")


def test_config_dict_round_trip_and_unknown_field():
    cfg = v4_1()
    assert EngramConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown EngramConfig field"):
        EngramConfig.from_dict({**cfg.to_dict(), "heads": 3})
