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
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

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


def all_reduce_dense_grads(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum gradients of replicated parameters across ranks, flattened into one buffer."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_moe_loads(model: nn.Module, ctx: DistContext) -> None:
    """Balance on the global load, so every rank's routing biases stay identical."""
    if not ctx.enabled:
        return
    for module in model.modules():
        if isinstance(module, MoE):
            dist.all_reduce(module.load)
