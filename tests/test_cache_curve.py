"""Cache policies of the hit-rate curve, on hand-made access streams."""

import numpy as np

from engram_lm.bench.cache_curve import engram_lm_hits, lru_hits, static_top_hits, w_tinylfu_hits


def a(*xs):
    return np.asarray(xs, dtype=np.int64)


def test_lru_and_static_by_hand():
    assert lru_hits(a(1, 2, 1, 3), a(1, 2), 2) == 0.5  # cache {1, 3}: 1 hits, 2 misses
    assert static_top_hits(a(5, 5, 5, 6, 6, 7), a(5, 7, 6, 8), 2) == 0.5  # pinned {5, 6}


def test_w_tinylfu_keeps_frequent_rows_through_a_scan_that_flushes_lru():
    frequent = np.tile(a(1, 2, 3), 60)
    scan = np.arange(100, 300, dtype=np.int64)  # one-off rows, more than the cache holds
    warm, measure = np.concatenate([frequent, scan]), np.tile(a(1, 2, 3), 10)
    assert lru_hits(warm, measure, 20) < 1.0  # the scan pushed the frequent rows out of LRU
    assert w_tinylfu_hits(warm, measure, 20) == 1.0  # the sketch refused to admit scan rows over them
    assert engram_lm_hits(warm, measure, 20, num_rows=400, batch=3) > 0.9  # frequency counts once per call


def test_everything_hits_when_the_cache_holds_every_row():
    warm = measure = np.tile(a(4, 8, 15, 16), 5)
    for hits in (lru_hits(warm, measure, 10), w_tinylfu_hits(warm, measure, 10), static_top_hits(warm, measure, 10)):
        assert hits == 1.0
