"""Over-Encoding as its paper defines it: index, combination and decoding, by hand."""

import pytest
import torch

from engram_lm.hashing.polynomial import polynomial_ngram_ids, polynomial_weights
from engram_lm.models.overencoding import OverEncoding, OverEncodingConfig, OverEncodingHasher, overencoding_for_budget


def test_moduli_follow_the_m_plus_2_rule():
    cfg = OverEncodingConfig(slots=100, table_dim=4, max_ngram=3, num_splits=2)
    assert cfg.moduli() == [(2, 101), (2, 103), (3, 105), (3, 107)] and cfg.total_rows == 416


def test_polynomial_index_by_hand():
    V = 10
    moduli = [(2, 7), (3, 11)]
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    got = polynomial_ngram_ids(ids, polynomial_weights(V, moduli), torch.tensor([7, 11]))
    x = [3, 1, 4, 1, 5]
    for t in range(5):
        prev = lambda k: x[t - k] if t - k >= 0 else 0  # noqa: E731  zero padding before the row
        bigram = (prev(0) + prev(1) * V) % 7
        trigram = (prev(0) + prev(1) * V + prev(2) * V * V) % 11
        assert got[0, t].tolist() == [bigram, trigram]


def test_hasher_stops_at_document_ends_and_offsets_tables():
    cfg = OverEncodingConfig(slots=5, table_dim=2, max_ngram=3, num_splits=1)  # moduli 6, 8
    h = OverEncodingHasher(cfg, vocab_size=10)
    rows = h.hash_all(torch.tensor([[3, 9, 4]]), eod_id=9)
    # position 2 starts a new document: it reads 4 and zeros, like a row start
    assert rows[0, 2].tolist() == [4 % 6, 6 + 4 % 8]
    alone = h.hash_all(torch.tensor([[4]]))
    assert torch.equal(rows[0, 2], alone[0, 0])


def test_combination_is_token_plus_projected_rows_over_one_plus_tables():
    torch.manual_seed(0)
    cfg = OverEncodingConfig(slots=3, table_dim=2, max_ngram=3, num_splits=1)
    oe = OverEncoding(cfg, dim=3, init_std=1.0)
    x = torch.randn(1, 2, 3)
    rows = torch.tensor([[[0, 4], [1, 5]]])
    T, W = oe.memory.weight, [p.weight for p in oe.proj]
    want = torch.stack([(x[0, t] + W[0] @ T[rows[0, t, 0]] + W[1] @ T[rows[0, t, 1]]) / 3 for t in range(2)])
    assert torch.allclose(oe(x, rows)[0], want, atol=1e-6)
    oe.config = cfg.with_(combine="add_mean")  # the diagnostic form keeps the token embedding at full scale
    want = torch.stack([x[0, t] + (W[0] @ T[rows[0, t, 0]] + W[1] @ T[rows[0, t, 1]]) / 2 for t in range(2)])
    assert torch.allclose(oe(x, rows)[0], want, atol=1e-6)


def test_decoding_step_equals_full_hashing():
    cfg = OverEncodingConfig(slots=50, table_dim=2, max_ngram=3, num_splits=2)
    h = OverEncodingHasher(cfg, vocab_size=20)
    ids = torch.randint(0, 20, (3, 9))
    ids[1, 4] = 7
    full = h.hash_all(ids, eod_id=7)
    history, parts = h.init_history(3), []
    for s in (2, 1, 3, 3):
        start = sum(p.shape[1] for p in parts)
        rows, history = h.step(history, ids[:, start : start + s], eod_id=7)
        parts.append(rows)
    assert torch.equal(torch.cat(parts, dim=1), full)


def test_budget_helper_and_validation():
    cfg = overencoding_for_budget(1_000_000, dim=128)
    assert cfg.table_dim == 16 and abs(cfg.total_rows * cfg.table_dim / 1_000_000 - 1) < 0.01
    with pytest.raises(ValueError, match="OverEncodingConfig.slots"):
        OverEncodingConfig(slots=1, table_dim=4)
