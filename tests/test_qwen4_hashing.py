"""Qwen3.8-Flash-Next's n-gram row ids (hashing/qwen4.py) against the official transformers class
`Qwen4ExpTextNGramEmbedding` itself: random ids, EOS inside sequences, batches, cached decoding
step by step, and the real configuration's layout (without allocating its table)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.qwen4_exp.modeling_qwen4_exp")

from engram_lm.hashing.qwen4 import init_history, qwen4_layout, qwen4_layout_from_config, qwen4_row_ids  # noqa: E402

EOS = 7


class RowIdEcho(torch.nn.Module):
    """Stands in for the n-gram table (never allocated): returns the row ids it is asked for."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        self.num_rows = num_rows
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        assert int(ids.max()) < self.num_rows  # every id inside the official table
        return ids.unsqueeze(-1)


def official(config, ple_layer_index: int, monkeypatch):
    monkeypatch.setattr(modeling.nn, "Embedding", RowIdEcho)
    heads = (config.ngram_size - 1) * config.heads_per_ngram
    return modeling.Qwen4ExpTextNGramEmbedding(config, heads, layer_idx=0, ple_layer_index=ple_layer_index)


def _call(theirs, ids, cache):
    """The official layer's forward with its cache, under the keyword this transformers names it
    (`cache` from 5.24, `past_key_values` before)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(type(theirs).forward).parameters else "past_key_values"
    return theirs(ids, **{name: cache})


def small_config(**kw):
    cfg = dict(vocab_size=97, hidden_size=16, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
               ple_layer_ids=[1], ple_embed_dim=24, ngram_size=3, heads_per_ngram=2, ngram_vocab_size_base=1000,
               eos_token_id=EOS, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8)  # fmt: skip
    return modeling.Qwen4ExpTextConfig(**{**cfg, **kw})


@pytest.mark.parametrize("ple_layer_index, ngram_size", [(0, 3), (2, 3), (1, 4)])
def test_row_ids_equal_the_official_class_on_random_ids_with_eos_inside_a_batch(monkeypatch, ple_layer_index, ngram_size):
    config = small_config(ngram_size=ngram_size)
    theirs = official(config, ple_layer_index, monkeypatch)
    ours = qwen4_layout_from_config(config, ple_layer_index)
    assert list(ours.head_sizes) == theirs.head_vocab_sizes and list(ours.head_offsets) == theirs.head_offsets
    assert list(ours.multipliers) == theirs.layer_multipliers.tolist()
    assert ours.padded_rows == theirs.ngram_embedding.num_rows
    g = torch.Generator().manual_seed(ple_layer_index)
    ids = torch.randint(0, 97, (3, 40), generator=g)
    ids[0, 5] = ids[0, 6] = ids[1, 0] = ids[1, 39] = ids[2, 20] = EOS  # EOS mid-sequence, twice in a row, at both ends
    want = _call(theirs, ids, None)
    got, history = qwen4_row_ids(ours, ids)
    assert torch.equal(got, want) and torch.equal(history, ids[:, -(ngram_size - 1):])


def test_cached_decoding_step_by_step_equals_the_official_cache_and_full_hashing(monkeypatch):
    config = small_config()
    theirs = official(config, 0, monkeypatch)
    ours = qwen4_layout_from_config(config, 0)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    ids[0, 9] = ids[1, 15] = EOS
    full, _ = qwen4_row_ids(ours, ids)
    cache = transformers.DynamicCache(config=config)
    history = init_history(ours, 2)
    for start, end in ((0, 1), (1, 10), *((t, t + 1) for t in range(10, 24))):  # a 1-token prompt, a prefill, steps
        want = _call(theirs, ids[:, start:end], cache)
        got, history = qwen4_row_ids(ours, ids[:, start:end], history)
        assert torch.equal(got, want) and torch.equal(got, full[:, start:end]), (start, end)


def test_the_real_configuration_addresses_320001536_rows_as_the_official_class(monkeypatch):
    config = modeling.Qwen4ExpTextConfig(eos_token_id=248044)  # the defaults: vocab 248,320, base 20,000,000, 2 x 8 heads
    theirs = official(config, 0, monkeypatch)  # the table is the echo: nothing of 320M rows is allocated
    ours = qwen4_layout_from_config(config, 0)
    assert ours.num_heads == 16 and ours.padded_rows == theirs.ngram_embedding.num_rows == 320_001_536
    assert list(ours.head_sizes) == theirs.head_vocab_sizes and ours.head_sizes[0] > 20_000_000
    ids = torch.randint(0, 248_320, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[1, 30] = 248044
    assert torch.equal(qwen4_row_ids(ours, ids)[0], _call(theirs, ids, None))
    second = qwen4_layout_from_config(config, 1)  # the next PLE layer: its own multipliers and primes
    assert second.head_sizes[0] > ours.head_sizes[-1] and second.multipliers != ours.multipliers


def test_ids_outside_the_vocabulary_are_refused():
    layout = qwen4_layout(vocab_size=97, eos_id=EOS, ngram_vocab_size_base=1000, heads_per_ngram=2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\), got 0..97"):
        qwen4_row_ids(layout, torch.tensor([[0, 97]]))
