"""A memory table whose rows are sharded across the ranks of a process group.

Each rank owns a contiguous range of rows (distributed/plan.py). A lookup deduplicates
its ids, asks every owner for its rows and receives them, with `all_to_all_single`
(variable split sizes): three exchanges (counts, ids, rows). Backward sends the row
gradients back to their owners in one more exchange; the owner gets a sparse gradient of
its shard (rows asked for by several ranks are summed by the optimizer's coalesce), so
SparseRowAdam updates only touched rows, locally. Every rank must call forward (and
backward) the same number of times: the exchanges are collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engram_lm.distributed.plan import plan_lookup, shard_bounds
from engram_lm.memory.table import MemoryTable


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight_LD, unique_U, send_counts, table):
        group = table.group
        send = torch.tensor(send_counts, dtype=torch.int64)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        recv_counts = recv.tolist()
        requested = torch.empty(sum(recv_counts), dtype=torch.int64)
        dist.all_to_all_single(requested, unique_U, recv_counts, send_counts, group=group)
        local = requested - table.start
        values = weight_LD.detach().index_select(0, local)
        got_UD = torch.empty(len(unique_U), weight_LD.shape[1], dtype=weight_LD.dtype)
        dist.all_to_all_single(got_UD, values, send_counts, recv_counts, group=group)
        me = table.rank  # bytes to other ranks only: what crosses the network
        remote_ids = len(unique_U) - send_counts[me]
        remote_rows = len(local) - recv_counts[me]
        table.bytes_sent += 8 * (len(send_counts) - 1 + remote_ids) + remote_rows * values.shape[1] * values.element_size()
        ctx.save_for_backward(local)
        ctx.counts, ctx.table, ctx.shape = (send_counts, recv_counts), table, weight_LD.shape
        return got_UD

    @staticmethod
    def backward(ctx, grad_UD):
        (local,) = ctx.saved_tensors
        send_counts, recv_counts = ctx.counts
        grad_in = torch.empty(len(local), ctx.shape[1], dtype=grad_UD.dtype)
        dist.all_to_all_single(grad_in, grad_UD.contiguous(), recv_counts, send_counts, group=ctx.table.group)
        me = ctx.table.rank
        ctx.table.bytes_sent += (grad_UD.shape[0] - send_counts[me]) * grad_UD.shape[1] * grad_UD.element_size()
        grad_weight = torch.sparse_coo_tensor(local.unsqueeze(0), grad_in, ctx.shape, check_invariants=False)
        return grad_weight, None, None, None


class ShardedTable(MemoryTable):
    tier = "sharded"

    def __init__(self, num_rows: int, dim: int, shard: torch.Tensor | None = None, group=None) -> None:
        """`shard`: this rank's rows [start, end) (e.g. sliced from an identically seeded
        full table); zeros when omitted (to be loaded from a checkpoint)."""
        super().__init__()
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_rows, self.dim = num_rows, dim
        self.bounds = shard_bounds(num_rows, self.world_size)
        self.start, self.end = self.bounds[self.rank], self.bounds[self.rank + 1]
        if shard is None:
            shard = torch.zeros(self.end - self.start, dim)
        if tuple(shard.shape) != (self.end - self.start, dim):
            raise ValueError(f"rank {self.rank} shard has shape {tuple(shard.shape)}, expected {(self.end - self.start, dim)}")
        self.weight = torch.nn.Parameter(shard.contiguous())
        self.bytes_sent = 0

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        self.check_rows(rows)
        plan = plan_lookup(rows.cpu(), self.bounds)
        got_UD = _ShardedLookup.apply(self.weight, plan.unique_U, plan.send_counts, self)
        return got_UD[plan.inverse_N].view(*rows.shape, self.dim).to(rows.device)

    def placement(self) -> dict:
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "rank": self.rank,
                "world_size": self.world_size, "local_rows": self.end - self.start,
                "bytes": self.weight.numel() * self.weight.element_size()}  # fmt: skip
