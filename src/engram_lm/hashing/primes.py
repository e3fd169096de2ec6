"""Primality and the reference's "next unused prime" search (pure integer code)."""

from __future__ import annotations

# Deterministic Miller-Rabin bases for every n < 3.3e24 (covers all int64 table sizes).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_unused_prime(start: int, used: set[int]) -> int:
    """The smallest prime > start that is not in `used` (the demo's find_next_prime)."""
    candidate = start + 1
    while not is_prime(candidate) or candidate in used:
        candidate += 1
    return candidate
