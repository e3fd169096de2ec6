"""Which next tokens running text lets a model copy from its context, and which it can only
recall from its training data: the token-level form of the paper's sensitivity analysis
(section 6: with Engram's output zeroed, factual knowledge drops to 29-44% while reading
comprehension keeps 81-93%). Pure functions of token ids; no model.

For a window s_0..s_T (inputs s_0..s_{T-1}, target of position t is s_{t+1}):
- copyable: the last `n` tokens s_{t-n+1..t} occurred earlier in the window, ending at
  j < t, and were followed there by the target (s_{j+1} = s_{t+1}): an induction copy, the
  answer is in the context.
- recallable: in the training tokens the pair (s_{t-1}, s_t) occurs at least `min_count`
  times and is followed by the target in at least `min_share` of them: the answer is a
  statistic of the training data, what a memory table can hold.
A token that is both belongs to neither class, so each class has its answer in one place.
"""

from __future__ import annotations

import numpy as np
import torch


def copyable_mask(window_T1: torch.Tensor, n: int = 2) -> torch.Tensor:
    """(T+1,) ids -> (T,) bool: position t's target continues an earlier copy of its last n tokens."""
    s = window_T1
    T = s.numel() - 1
    same = torch.ones(T, T, dtype=torch.bool)  # same[t, j]: s[t-k] == s[j-k] for k < n
    for k in range(n):
        a = torch.full((T,), -1, dtype=s.dtype)
        a[k:] = s[: T - k]  # a[t] = s[t-k], -1 before the window starts
        same &= (a[:, None] == a[None, :]) & (a[:, None] >= 0)
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)  # j < t
    continues = s[1:][:, None] == s[1:][None, :]  # s[t+1] == s[j+1]
    return (same & earlier & continues).any(dim=1)


class BigramContinuations:
    """Counts of (a, b) and (a, b, c) in a token stream, for "is c the usual continuation of a, b?"."""

    def __init__(self, tokens: np.ndarray, vocab_size: int) -> None:
        t = np.asarray(tokens, dtype=np.int64)
        if t.size and (t.min() < 0 or t.max() >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size}); got {t.min()}..{t.max()}")
        self.vocab_size = vocab_size
        pairs = t[:-2] * vocab_size + t[1:-1]
        self._pairs, self._pair_counts = np.unique(pairs, return_counts=True)
        self._triples, self._triple_counts = np.unique(pairs * vocab_size + t[2:], return_counts=True)

    def counts(self, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count of (a, b) followed by anything, count of (a, b, c)), elementwise."""
        pair = np.asarray(a, dtype=np.int64) * self.vocab_size + np.asarray(b, dtype=np.int64)
        return _lookup(self._pairs, self._pair_counts, pair), _lookup(self._triples, self._triple_counts,
                                                                      pair * self.vocab_size + np.asarray(c, dtype=np.int64))  # fmt: skip


def _lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
    if keys.size == 0:
        return np.zeros(query.shape, dtype=np.int64)
    i = np.clip(np.searchsorted(keys, query), 0, keys.size - 1)
    return np.where(keys[i] == query, counts[i], 0)


def recallable_mask(window_T1: torch.Tensor, stats: BigramContinuations, *, min_count: int = 5,
                    min_share: float = 0.5) -> torch.Tensor:  # fmt: skip
    """(T+1,) ids -> (T,) bool: the training data usually continues (s_{t-1}, s_t) with the
    target. Position 0 has no pair and is never recallable."""
    s = window_T1.cpu().numpy().astype(np.int64)
    pair, triple = stats.counts(s[:-2], s[1:-1], s[2:])  # positions 1..T-1
    usual = (pair >= min_count) & (triple >= min_share * pair)
    return torch.from_numpy(np.concatenate([[False], usual]))


def token_classes(window_T1: torch.Tensor, stats: BigramContinuations, *, n: int = 2, min_count: int = 5,
                  min_share: float = 0.5) -> dict[str, torch.Tensor]:  # fmt: skip
    """(T,) bool masks "copyable" and "recallable", disjoint: a token both copyable and usual
    in training belongs to neither, so one class's answer is only in the context and the
    other's only in the training data."""
    copy = copyable_mask(window_T1, n)
    usual = recallable_mask(window_T1, stats, min_count=min_count, min_share=min_share)
    return {"copyable": copy & ~usual, "recallable": usual & ~copy}
