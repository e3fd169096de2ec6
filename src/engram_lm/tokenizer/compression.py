"""Tokenizer compression: the surjective vocabulary projection P: V -> V' (ENGRAM_SPEC s.2).

Raw ids whose single-token text normalises to the same key share one canonical id.
Canonical ids are numbered by first occurrence in raw-id order; negative ids (padding
markers) pass through unchanged, exactly as the reference demo does.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers

REPLACEMENT_CHAR = "\ufffd"  # a decoded token that is an incomplete UTF-8 sequence
_SENTINEL = "\ue000"  # protects a string that is exactly one space from Strip()


@lru_cache(maxsize=1)
def reference_normalizer() -> normalizers.Normalizer:
    """NFKC, NFD, strip accents, lowercase, collapse whitespace, strip (but keep a lone ' ')."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def canonical_key(text: str, raw_token: str) -> str:
    """The key one raw token maps to: its raw token string if its text is a partial UTF-8
    sequence, else its normalised text (or the text itself when that normalises to '')."""
    if REPLACEMENT_CHAR in text:
        return raw_token
    norm = reference_normalizer().normalize_str(text)
    return norm if norm else text


def build_lookup(keys_by_raw_id: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Number distinct keys by first occurrence. Returns (lookup int64[V], canonical keys)."""
    key_to_id: dict[str, int] = {}
    lookup = np.empty(len(keys_by_raw_id), dtype=np.int64)
    for raw_id, key in enumerate(keys_by_raw_id):
        lookup[raw_id] = key_to_id.setdefault(key, len(key_to_id))
    return lookup, list(key_to_id)


def tokenizer_keys(tokenizer: Tokenizer) -> list[str]:
    """The canonical key of every raw id in [0, vocab size incl. added tokens)."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    return [canonical_key(text, tokenizer.id_to_token(i) or "") for i, text in enumerate(texts)]


@dataclass(frozen=True, eq=False)
class VocabProjection:
    """The projection P as a lookup array, with the canonical key of every canonical id."""

    lookup: np.ndarray  # int64[raw_size], values in [0, compressed_size)
    keys: tuple[str, ...]  # keys[c] = normalised text of canonical id c
    source: str = "identity"
    _device_lookups: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, source: str) -> "VocabProjection":
        lookup, keys = build_lookup(tokenizer_keys(tokenizer))
        return cls(lookup=lookup, keys=tuple(keys), source=source)

    @classmethod
    def identity(cls, vocab_size: int) -> "VocabProjection":
        """No compression (ablation): every raw id is its own canonical id."""
        if vocab_size < 1:
            raise ValueError(f"identity vocabulary size must be >= 1, got {vocab_size}")
        keys = tuple(str(i) for i in range(vocab_size))
        return cls(lookup=np.arange(vocab_size, dtype=np.int64), keys=keys, source=f"identity:{vocab_size}")

    @property
    def raw_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def compressed_size(self) -> int:
        return len(self.keys)

    @property
    def reduction(self) -> float:
        """Fraction of ids removed: 1 - |V'| / |V|."""
        return 1.0 - self.compressed_size / self.raw_size

    @property
    def digest(self) -> str:
        """sha256 of the lookup array: part of the hash-layout fingerprint."""
        return hashlib.sha256(np.ascontiguousarray(self.lookup, dtype="<i8").tobytes()).hexdigest()

    def map_id(self, raw_id: int) -> int:
        self._check_range_numpy(np.asarray([raw_id]))
        return int(self.lookup[raw_id]) if raw_id >= 0 else raw_id

    def compress_numpy(self, ids: np.ndarray) -> np.ndarray:
        """The reference's `CompressedTokenizer.__call__`: negatives pass through."""
        arr = np.asarray(ids, dtype=np.int64)
        self._check_range_numpy(arr)
        out = arr.copy()
        mask = arr >= 0
        out[mask] = self.lookup[arr[mask]]
        return out

    def compress(self, ids: torch.Tensor) -> torch.Tensor:
        """Torch version on any device; ids must already be range-checked (see NgramHasher)."""
        table = self.lookup_tensor(ids.device)
        return torch.where(ids >= 0, table[ids.clamp_min(0)], ids)

    def lookup_tensor(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._device_lookups:
            self._device_lookups[key] = torch.from_numpy(self.lookup).to(device)
        return self._device_lookups[key]

    def top_merges(self, k: int = 10, num_examples: int = 5) -> list[tuple[int, str, int, list[int]]]:
        """The k canonical ids with the most raw ids: (canonical id, key, count, example raw ids)."""
        counts = Counter(self.lookup.tolist())
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        out = []
        for cid, count in top:
            examples = np.flatnonzero(self.lookup == cid)[:num_examples].tolist()
            out.append((cid, self.keys[cid], count, examples))
        return out

    def _check_range_numpy(self, arr: np.ndarray) -> None:
        if arr.size and int(arr.max()) >= self.raw_size:
            bad = int(arr.max())
            raise ValueError(
                f"token id {bad} is outside the raw vocabulary [0, {self.raw_size}) of tokenizer "
                f"{self.source!r}; tokenize with the same tokenizer the Engram layout was built for"
            )
