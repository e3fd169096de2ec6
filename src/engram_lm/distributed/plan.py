"""Pure planning for row-sharded tables: who owns which rows, and what to ask whom.

Rank r of P owns the contiguous rows [bounds[r], bounds[r+1]) of a table of R rows, with
bounds[r] = r * R // P. A lookup deduplicates its row ids (sorted), so the rows owned by
each rank form one contiguous run of the unique list: the request to rank r is the slice
unique[offsets[r]:offsets[r+1]]. No process group is involved here.

Shape legend: N requested ids, U unique ids, P ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def shard_bounds(num_rows: int, world_size: int) -> list[int]:
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    return [r * num_rows // world_size for r in range(world_size + 1)]


def owner_of(rows: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Rank owning each row id."""
    inner = torch.tensor(bounds[1:-1], dtype=rows.dtype, device=rows.device)
    return torch.bucketize(rows, inner, right=True)


@dataclass(frozen=True)
class LookupPlan:
    unique_U: torch.Tensor  # sorted distinct row ids requested
    inverse_N: torch.Tensor  # position in unique_U of every requested id
    send_counts: list[int]  # how many of unique_U each rank owns (requests sent to it)

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for c in self.send_counts:
            out.append(out[-1] + c)
        return out


def plan_lookup(rows_N: torch.Tensor, bounds: list[int]) -> LookupPlan:
    unique_U, inverse_N = torch.unique(rows_N.reshape(-1), sorted=True, return_inverse=True)
    owners = owner_of(unique_U, bounds)
    counts = torch.bincount(owners, minlength=len(bounds) - 1).tolist()
    return LookupPlan(unique_U, inverse_N, counts)
