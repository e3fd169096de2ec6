"""Test helpers shared by the concurrency tests of the memory tiers."""

import numpy as np
import torch


def hammer(table, reference, calls: int, seed: int, rows: int) -> int:
    """Random calls (Zipf-like ids below `rows`, repeats inside a call); the number whose rows differ from the reference's."""
    rng, wrong = np.random.default_rng(seed), 0
    for _ in range(calls):
        ids = torch.from_numpy(np.minimum(rng.zipf(1.2, size=int(rng.integers(1, 80))), rows) - 1)
        wrong += not torch.equal(table(ids), reference(ids))
    return wrong
