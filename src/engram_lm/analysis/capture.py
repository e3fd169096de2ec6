"""Forward hooks that record what a model computes, without editing the model.

`capture(model)` records, for one forward pass, the residual stream after every block
(summed over branches, as the head reads it) and every Engram gate value (B, T, M).
Hooks only read: outputs are unchanged (tested).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engram_lm.engram.gate import ContextGate


@dataclass
class Captured:
    block_outputs: list[torch.Tensor] = field(default_factory=list)  # per block: (B, T, D)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # Engram layer -> (B, T, M)


@contextmanager
def capture(model):
    captured = Captured()
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_hook(lambda m, a, out: captured.block_outputs.append(out.detach().sum(2))))
        if block.engram is not None and isinstance(block.engram.gate, ContextGate):
            handles.append(block.engram.gate.register_forward_hook(
                lambda m, a, out, layer=i: captured.gates.__setitem__(layer, out.detach())))  # fmt: skip
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def engram_zeroed(model):
    """Every Engram layer adds 0 (its output is replaced by zeros): the sensitivity probe."""
    handles = [block.engram.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
               for block in model.blocks if block.engram is not None]  # fmt: skip
    try:
        yield
    finally:
        for h in handles:
            h.remove()
