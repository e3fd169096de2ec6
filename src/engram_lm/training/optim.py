"""Optimizers routed by explicit parameter role, and the learning-rate schedule.

Roles (every parameter gets exactly one, by `param_roles`):
- "table":      memory-table rows (Engram, OverEncoding) -> SparseRowAdam at
                table_lr_mult x lr (paper: 5x), touched rows only, with decoupled decay
                table_weight_decay (by default chosen by how often the run reads its
                data, training/regime.py: 10 at most once; the paper has none: 0);
- "matrix":     2-D weights inside blocks (attention, FFN, experts, Engram key/value)
                -> Muon (torch's update, batched fp32 Newton-Schulz on CPU: training/muon.py)
                with Moonshot's RMS matching, so one lr serves all;
- "decay":      embedding, output head, MoE routers -> AdamW with weight decay;
- "no_decay":   norms (also the Engram gate's and conv's per-branch RMSNorm weights, stored
                (M, D) but vectors, not matrices), biases, conv kernels, hyper-connection
                parameters -> AdamW without weight decay.
Schedule: linear warmup, then constant, then step decay by `decay_factor` at each
fraction in `decay_at` of the run (the paper's step decay).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engram_lm.engram.conv import ShortConv
from engram_lm.engram.gate import ContextGate
from engram_lm.layers.hyper import HyperConnection
from engram_lm.layers.moe import MoE
from engram_lm.memory.table import MemoryTable
from engram_lm.training.muon import Muon

ROLES = ("table", "matrix", "decay", "no_decay")


class SparseRowAdam(torch.optim.Optimizer):
    """Lazy Adam for tables: only rows present in the (sparse or dense) gradient move, and
    only their moments change; bias correction uses the parameter's global step count.
    Cost is proportional to the rows touched, not to the table size."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):  # fmt: skip
        """weight_decay: decoupled (AdamW-style), applied to the touched rows only."""
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad_rows = _touched_rows(p.grad)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(grad_rows, alpha=1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad_rows, grad_rows, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                if group["weight_decay"]:
                    p.index_copy_(0, rows, p.index_select(0, rows) * (1 - group["lr"] * group["weight_decay"]))
                p.index_add_(0, rows, m / denom, alpha=-group["lr"] / (1 - beta1**t))
        return None


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if grad.is_sparse:
        grad = grad.coalesce()  # duplicate rows (a row read twice) are summed
        return grad.indices()[0], grad.values()
    rows = grad.abs().sum(dim=tuple(range(1, grad.dim()))).nonzero().flatten()
    return rows, grad.index_select(0, rows)


def param_roles(model: nn.Module) -> dict[str, str]:
    """name -> role for every parameter (see module docstring)."""
    roles: dict[str, str] = {}
    special: dict[int, str] = {id(model.embed.weight): "decay", id(model.head.weight): "decay"}
    for module in model.modules():
        if isinstance(module, MemoryTable):  # device-resident or sharded table rows
            for p in module.parameters(recurse=False):
                special[id(p)] = "table"
        elif isinstance(module, MoE):
            special[id(module.router.weight)] = "decay"
        elif isinstance(module, (HyperConnection, ContextGate, ShortConv)):
            # the gate's and the conv's RMSNorm weights are (M, D): one norm vector per branch,
            # stacked, not a matrix, so the 2-D rule below must not send them to Muon
            for p in module.parameters():
                special[id(p)] = "no_decay"
    for name, p in model.named_parameters():
        if id(p) in special:
            roles[name] = special[id(p)]
        elif p.dim() == 2:
            roles[name] = "matrix"
        else:
            roles[name] = "no_decay"
    return roles


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    lr: float
    table_lr_mult: float = 5.0
    weight_decay: float = 0.1
    table_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    matrix_optimizer: str = "muon"  # "adamw": plain AdamW for the matrices too (no bf16 step)


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per role that has parameters; each param group remembers its base lr."""
    roles = param_roles(model)
    params = dict(model.named_parameters())
    by_role = {role: [params[n] for n, r in roles.items() if r == role] for role in ROLES}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if by_role["table"]:
        optimizers["table"] = SparseRowAdam(by_role["table"], lr=cfg.lr * cfg.table_lr_mult, betas=cfg.betas,
                                           weight_decay=cfg.table_weight_decay)  # fmt: skip
    if by_role["matrix"] and cfg.matrix_optimizer == "adamw":
        optimizers["matrix"] = torch.optim.AdamW(by_role["matrix"], lr=cfg.lr, betas=cfg.betas,
                                                 weight_decay=cfg.weight_decay)  # fmt: skip
    elif by_role["matrix"]:
        optimizers["matrix"] = Muon(
            by_role["matrix"], lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
        )
    adamw_groups = [
        {"params": by_role["decay"], "weight_decay": cfg.weight_decay},
        {"params": by_role["no_decay"], "weight_decay": 0.0},
    ]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    if adamw_groups:
        optimizers["adamw"] = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=cfg.betas)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay_at: tuple[float, ...], decay_factor: float) -> float:
    """Warmup (linear from 1/warmup), constant, then x decay_factor at each decay point."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    drops = sum(step >= int(frac * total_steps) for frac in decay_at)
    return decay_factor**drops


def set_lr(optimizers: dict[str, torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier
