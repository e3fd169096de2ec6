"""Qwen3.8-Flash-Next's n-gram addressing (transformers `qwen4_exp`, `Qwen4ExpTextNGramEmbedding`):
the row ids of its per-layer n-gram table, bit-exact with the official code, as pure integer code.

Differences from the reference Engram (hashing/ngram.py):
- raw token ids (no tokenizer compression);
- per PLE layer, one multiplier per n-gram position from splitmix64 (seed + 10007 x the
  layer's index among the PLE layers), odd and below int64_max / vocab so no product wraps;
- an n-gram of order n mixes positions 0..n-1 by XOR of id x multiplier;
- head h of order n is row (mix mod size_h) + offset_h of one table per layer; the sizes are
  the consecutive primes after `ngram_vocab_size_base` - 1, counted over a global head index
  (layer index x heads + head), so every layer has its own primes; the table's rows are
  padded to a multiple of `make_ngram_vocab_size_divisible_by`;
- a context position before the sequence or across an EOS reads the EOS id (a document
  ends at its EOS, which belongs to the document it ends).
Incremental decoding keeps the last ngram_size - 1 raw ids (EOS-filled at a sequence's
start), as the official cache does, and equals full-sequence hashing at every position.

Shapes: B batch, T positions, H heads (all orders), K = ngram_size - 1 ids of history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engram_lm.hashing.primes import is_prime

MASK64 = (1 << 64) - 1
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_M1 = 0xBF58476D1CE4E5B9
SPLITMIX_M2 = 0x94D049BB133111EB
LAYER_PRIME = 10007


def splitmix64(value: int) -> int:
    value = (value + SPLITMIX_GAMMA) & MASK64
    value = ((value ^ (value >> 30)) * SPLITMIX_M1) & MASK64
    value = ((value ^ (value >> 27)) * SPLITMIX_M2) & MASK64
    return (value ^ (value >> 31)) & MASK64


def layer_multipliers(vocab_size: int, ngram_size: int, ple_layer_index: int, seed: int) -> tuple[int, ...]:
    """One odd multiplier per n-gram position, each below int64_max / vocab_size."""
    half_bound = max(1, ((1 << 63) - 1) // max(vocab_size, 1) // 2)
    base_seed = seed + LAYER_PRIME * ple_layer_index
    return tuple(2 * (splitmix64((base_seed + SPLITMIX_GAMMA * (i + 1)) & MASK64) % half_bound) + 1
                 for i in range(ngram_size))  # fmt: skip


def primes_after(start: int, first: int, count: int) -> tuple[int, ...]:
    """The primes number first+1 .. first+count after `start` (1-based: the 1st is the smallest prime > start)."""
    out, p, seen = [], start, 0
    while len(out) < count:
        p += 1
        while not is_prime(p):
            p += 1
        seen += 1
        if seen > first:
            out.append(p)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Qwen4NgramLayout:
    """The addressing of one PLE layer's n-gram table."""

    vocab_size: int
    ngram_size: int
    heads_per_ngram: int
    eos_id: int
    multipliers: tuple[int, ...]  # per n-gram position 0..ngram_size-1
    head_sizes: tuple[int, ...]  # per head, orders 2..ngram_size in turn
    head_offsets: tuple[int, ...]
    padded_rows: int  # the table's rows: the heads' sum rounded up to the divisor

    @property
    def num_heads(self) -> int:
        return (self.ngram_size - 1) * self.heads_per_ngram

    @property
    def total_rows(self) -> int:
        return self.head_offsets[-1] + self.head_sizes[-1]

    @property
    def context_len(self) -> int:
        return self.ngram_size - 1

    @property
    def fingerprint(self) -> str:
        """What decides every row id, hashed: a table exported for another layout is refused by it."""
        import hashlib
        import json

        fields = [self.vocab_size, self.ngram_size, self.heads_per_ngram, self.eos_id, list(self.multipliers),
                  list(self.head_sizes), self.padded_rows]  # fmt: skip
        return "qwen4-" + hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def qwen4_layout(*, vocab_size: int, eos_id: int, ngram_size: int = 3, heads_per_ngram: int = 8,
                 ngram_vocab_size_base: int = 20_000_000, seed: int = 1234, ple_layer_index: int = 0,
                 divisible_by: int = 128) -> Qwen4NgramLayout:  # fmt: skip
    """The layout of the PLE layer `ple_layer_index` (its position among the config's
    `ple_layer_ids`); the defaults are Qwen4ExpTextConfig's."""
    if ngram_size < 2 or heads_per_ngram < 1 or ngram_vocab_size_base < 2 or divisible_by < 1 or vocab_size < 1:
        raise ValueError(f"invalid Qwen4 n-gram layout: ngram_size {ngram_size} (>= 2), heads_per_ngram {heads_per_ngram} "
                         f"(>= 1), ngram_vocab_size_base {ngram_vocab_size_base} (>= 2), divisible_by {divisible_by}, "
                         f"vocab_size {vocab_size}")  # fmt: skip
    heads = (ngram_size - 1) * heads_per_ngram
    sizes = primes_after(ngram_vocab_size_base - 1, ple_layer_index * heads, heads)
    offsets = tuple(sum(sizes[:h]) for h in range(heads))
    padded = math.ceil(sum(sizes) / divisible_by) * divisible_by
    return Qwen4NgramLayout(vocab_size, ngram_size, heads_per_ngram, eos_id,
                            layer_multipliers(vocab_size, ngram_size, ple_layer_index, seed), sizes, offsets, padded)  # fmt: skip


def qwen4_layout_from_config(config, ple_layer_index: int) -> Qwen4NgramLayout:
    """The layout from a transformers Qwen4ExpTextConfig (or any object with its fields; one
    that leaves a field out, as a saved config.json may, gets Qwen4ExpTextConfig's default)."""
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    given = {name: getattr(config, field) for name, field in _CONFIG_FIELDS.items() if hasattr(config, field)}
    return qwen4_layout(vocab_size=config.vocab_size, eos_id=eos, ple_layer_index=ple_layer_index, **given)


# qwen4_layout's argument -> Qwen4ExpTextConfig's field
_CONFIG_FIELDS = {"ngram_size": "ngram_size", "heads_per_ngram": "heads_per_ngram",
                  "ngram_vocab_size_base": "ngram_vocab_size_base", "seed": "seed",
                  "divisible_by": "make_ngram_vocab_size_divisible_by"}  # fmt: skip


def init_history(layout: Qwen4NgramLayout, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The history of a new sequence: ngram_size - 1 EOS ids, (B, K)."""
    return torch.full((batch, layout.context_len), layout.eos_id, dtype=torch.long, device=device)


def shifted_context(ids_BT: torch.Tensor, shift: int, eos_id: int) -> torch.Tensor:
    """ids shifted right by `shift` within each EOS-delimited document; a position whose
    context would leave its document (or the sequence) reads `eos_id`."""
    if shift == 0:
        return ids_BT
    B, T = ids_BT.shape
    pos_T = torch.arange(T, device=ids_BT.device)
    eos_at_BT = torch.where(ids_BT == eos_id, pos_T, -1)
    last_eos_BT = torch.cummax(eos_at_BT, dim=1).values  # the latest EOS at or before t
    before_BT = torch.cat([eos_at_BT.new_full((B, 1), -1), last_eos_BT[:, :-1]], dim=1)  # ... strictly before t
    source_T = pos_T - shift
    shifted_BT = ids_BT.gather(1, source_T.clamp_min(0).expand(B, T))
    inside_BT = (pos_T - (before_BT + 1) >= shift) & (source_T >= 0)  # no EOS in [t - shift, t - 1]
    return torch.where(inside_BT, shifted_BT, ids_BT.new_full((), eos_id))


def qwen4_row_ids(layout: Qwen4NgramLayout, ids_BT: torch.Tensor,
                  history_BK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Row ids (B, T, H) of the new `ids_BT` given the last K ids before them (a new sequence
    when None), and the history after them. Any device; int64 arithmetic never overflows
    (multipliers < int64_max / vocab, ids < vocab)."""
    ids_BT = ids_BT.long()
    if ids_BT.numel() and (int(ids_BT.min()) < 0 or int(ids_BT.max()) >= layout.vocab_size):
        raise ValueError(f"token ids must lie in [0, {layout.vocab_size}), got {int(ids_BT.min())}..{int(ids_BT.max())}")
    if history_BK is None:
        history_BK = init_history(layout, ids_BT.shape[0], ids_BT.device)
    window_BT = torch.cat([history_BK, ids_BT], dim=1)
    shifted = [shifted_context(window_BT, s, layout.eos_id) for s in range(layout.ngram_size)]
    sizes_H = torch.tensor(layout.head_sizes, dtype=torch.long, device=ids_BT.device)
    offsets_H = torch.tensor(layout.head_offsets, dtype=torch.long, device=ids_BT.device)
    blocks, H = [], layout.heads_per_ngram
    for n in range(2, layout.ngram_size + 1):
        mix_BT = shifted[0] * layout.multipliers[0]
        for p in range(1, n):
            mix_BT = torch.bitwise_xor(mix_BT, shifted[p] * layout.multipliers[p])
        heads = slice((n - 2) * H, (n - 1) * H)
        blocks.append(torch.remainder(mix_BT.unsqueeze(-1), sizes_H[heads]) + offsets_H[heads])
    rows_BTH = torch.cat(blocks, dim=-1)[:, -ids_BT.shape[1] :] if ids_BT.shape[1] else torch.cat(blocks, -1)[:, :0]
    return rows_BTH, window_BT[:, -layout.context_len :]
