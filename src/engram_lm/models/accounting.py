"""Parameter accounting as the paper defines it, and iso-parameter allocation.

- P_tot: all parameters except the vocabulary embedding and the output head.
- P_act: parameters used per token: everything dense, the shared experts, top_k / E of
  the routed experts, and of each memory table only the rows a token reads
  ((N-1) * K rows of head_dim: d_mem per Engram layer; one row of each OverEncoding table).
- P_sparse = P_tot - P_act; P_engram = memory-table parameters.

`allocate(base, rho, engram)` keeps a fraction rho of the base MoE's sparse (inactive
routed-expert) budget in routed experts and turns the rest into Engram slots, at the same
P_tot and P_act. At small scale the Engram module's own dense parameters (projections,
gate and conv weights, rows read) are not negligible, so the dense FFN of the first
block(s) gives up exactly that many active parameters, and the table absorbs the
difference in P_tot. Counting builds the model on the meta device: no memory is touched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from engram_lm.config import EngramConfig
from engram_lm.hashing.layout import build_layout
from engram_lm.layers.moe import MoE
from engram_lm.memory.table import MemoryTable
from engram_lm.models.config import ModelConfig
from engram_lm.tokenizer.compression import VocabProjection


@dataclass(frozen=True, slots=True)
class ParamCounts:
    total: int
    active: int
    engram: int  # memory-table parameters (Engram + OverEncoding)
    vocab: int  # embedding + head, excluded from the three above

    @property
    def sparse(self) -> int:
        return self.total - self.active

    def to_dict(self) -> dict[str, int]:
        return {"params_total": self.total, "params_active": self.active, "params_sparse": self.sparse,
                "params_engram": self.engram, "params_vocab": self.vocab}  # fmt: skip


def count_params(model: torch.nn.Module) -> ParamCounts:
    total = active = table = vocab = 0
    vocab_params = {id(model.embed.weight), id(model.head.weight)}
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        n = sum(p.numel() for p in own)
        if not own:
            continue
        if any(id(p) in vocab_params for p in own):
            vocab += n
        elif isinstance(module, MemoryTable):  # the whole table, also when this rank holds a shard
            table += module.num_rows * module.dim
            total += module.num_rows * module.dim
        else:
            total += n
            active += n
    for module in model.modules():
        if isinstance(module, MoE):  # only top_k of the routed experts run per token
            routed = sum(p.numel() for p in module.experts.parameters())
            active -= routed - routed * module.top_k // module.num_routed
    for block in model.blocks:
        if block.engram is not None:
            active += block.engram.config.memory_dim
    if model.overencoding is not None:  # rows read per token: one of each table
        active += model.overencoding.num_tables * model.overencoding.config.table_dim
    return ParamCounts(total=total, active=active, engram=table, vocab=vocab)


def count_config(config: ModelConfig, projection: VocabProjection | None = None) -> ParamCounts:
    from engram_lm.models.transformer import EngramLM

    with torch.device("meta"):
        return count_params(EngramLM(config, projection))


def allocate(base: ModelConfig, rho: float, engram: EngramConfig, projection: VocabProjection | None = None) -> ModelConfig:
    """An iso-P_tot, iso-P_act variant of the MoE `base` keeping `rho` of its sparse budget
    in routed experts (rho = 1: the base itself). `engram` gives the layers, N, heads and
    head dim; its table sizes are derived here. Pure, so cached (it builds models to count)."""
    if projection is None:
        return _allocate_cached(base, rho, engram)
    return _allocate(base, rho, engram, projection)


@functools.lru_cache(maxsize=256)
def _allocate_cached(base: ModelConfig, rho: float, engram: EngramConfig) -> ModelConfig:
    return _allocate(base, rho, engram, None)


def _allocate(base: ModelConfig, rho: float, engram: EngramConfig, projection: VocabProjection | None) -> ModelConfig:
    if not base.is_moe:
        raise ValueError("allocate() needs an MoE base config (num_routed_experts > 0)")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    E, k = base.num_routed_experts, base.top_k
    num_routed = k + round(rho * (E - k))
    if num_routed == E:
        return base
    target = count_config(base, projection)
    shrunk = base.with_(num_routed_experts=num_routed)
    probe = shrunk.with_(engram=engram.with_(table_sizes=(2,) * (engram.max_ngram - 1)))
    probe_counts = count_config(probe, projection)
    # give back the Engram module's active parameters by narrowing the dense FFN
    per_unit = 3 * base.dim * min(base.num_dense_layers, base.num_layers)
    cut = max(0, round((probe_counts.active - target.active) / per_unit))
    if cut >= base.ffn_hidden:
        raise ValueError("the Engram module's dense parameters exceed the dense FFN; use a smaller d_mem")
    probe = probe.with_(ffn_hidden=base.ffn_hidden - cut)
    probe_counts = count_config(probe, projection)
    slots = (target.total - (probe_counts.total - probe_counts.engram)) // engram.head_dim
    columns = len(engram.layer_ids) * engram.num_hash_columns
    per_head = slots // columns
    if per_head < 2:
        raise ValueError(f"rho={rho} frees too few parameters for an Engram table ({slots} slots)")
    return probe.with_(engram=engram_with_rows(engram, slots, per_head))


def engram_with_rows(engram: EngramConfig, target_rows: int, per_head: int) -> EngramConfig:
    """Table sizes whose primes add up to ~target_rows (primes land a little above each base)."""
    columns = len(engram.layer_ids) * engram.num_hash_columns
    size = per_head
    for _ in range(6):
        candidate = engram.with_(table_sizes=(size,) * (engram.max_ngram - 1))
        rows = build_layout(candidate, 1, 0).total_rows
        if abs(target_rows - rows) < columns or size <= 2:
            break
        size = max(2, size + (target_rows - rows) // columns)
    return candidate
