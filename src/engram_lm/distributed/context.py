"""The process group of a run, and the few collective steps training needs.

Launched with torchrun, WORLD_SIZE/RANK/LOCAL_RANK are set: the group starts with gloo on
CPU and NCCL on CUDA. Parallelism is applied to a built model (`shard_tables`), never in
model code: Engram tables become row-sharded (each rank keeps 1/P of the rows), everything
else stays replicated and its gradients are summed across ranks (`all_reduce_dense_grads`,
tables excluded: their gradients already went to their owners in the lookup's backward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engram_lm.distributed.sharded_table import ShardedTable
from engram_lm.layers.moe import MoE
from engram_lm.memory.dense import DenseTable


def init_process_group(backend: str, **kwargs) -> None:
    """`dist.init_process_group`, with torch._dynamo imported first. Imported after the group
    exists (any torch.optim optimizer's constructor imports it), dynamo keeps references to the
    group that outlive `destroy_process_group`, so gloo's worker threads stay alive and may free
    the last collective's tensors while the interpreter finalises: SIGABRT ("terminate called
    without an active exception") at exit, in about 1 of 10 two-rank runs (torch 2.13; seen
    with gdb: ~AsyncBarrierWork -> decref_pyobject -> take_gil during Py_FinalizeEx)."""
    import torch._dynamo  # noqa: F401  (before the group; see above)

    dist.init_process_group(backend, **kwargs)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a collective: call it on all ranks)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        """The mean over ranks of a Python number (identical on every rank afterwards)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size


def shard_tables(model: nn.Module, ctx: DistContext) -> None:
    """Replace every Engram DenseTable by this rank's ShardedTable slice of it. All ranks
    built the model from the same seed, so the shards together are the 1-process table."""
    if not ctx.enabled:
        return
    for block in model.blocks:
        if block.engram is not None and isinstance(block.engram.memory, DenseTable):
            full = block.engram.memory.weight.detach()
            table = ShardedTable(full.shape[0], full.shape[1], shard=None)
            table.weight.data.copy_(full[table.start : table.end])
            block.engram.memory = table


def replicated_params(model: nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter each rank holds in full (all but sharded table rows), in a fixed order."""
    sharded = {id(p) for m in model.modules() if isinstance(m, ShardedTable) for p in m.parameters(recurse=False)}
    return [p for p in model.parameters() if id(p) not in sharded]


def all_reduce_dense_grads(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum the gradients of replicated parameters across ranks, in one flat buffer.

    Every parameter takes part on every rank, in the given (fixed) order: a parameter
    without a gradient here (an expert that got no token of this rank's batch) contributes
    zeros, so the buffers line up element for element on all ranks. A presence count rides
    along: a parameter that no rank produced a gradient for keeps grad None, as in a
    1-process run (the optimizers skip it), and one that any rank did gets the sum.
    Sparse gradients (untouched tables such as OverEncoding's) are densified."""
    if not ctx.enabled or not params:
        return
    parts = [torch.zeros(len(params), dtype=params[0].dtype, device=params[0].device)]
    for i, p in enumerate(params):
        g = p.grad
        if g is not None:
            parts[0][i] = 1
            parts.append((g.to_dense() if g.is_sparse else g).reshape(-1).to(parts[0].dtype))
        else:
            parts.append(torch.zeros(p.numel(), dtype=parts[0].dtype, device=p.device))
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    present, offset = flat[: len(params)], len(params)
    for i, p in enumerate(params):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone() if present[i] > 0 else None
        offset += n


def all_reduce_moe_loads(model: nn.Module, ctx: DistContext) -> None:
    """Balance on the global load, so every rank's routing biases stay identical."""
    if not ctx.enabled:
        return
    for module in model.modules():
        if isinstance(module, MoE):
            dist.all_reduce(module.load)
