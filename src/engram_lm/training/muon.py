"""Muon for the block matrices: torch.optim.Muon's update, with the Newton-Schulz iteration
batched over same-shaped matrices and run in a dtype the device multiplies fast.

torch.optim.Muon orthogonalises each matrix on its own in bfloat16. On CPUs without
bf16 matrix units (e.g. AMD EPYC without AVX512-BF16) a bf16 matmul is ~7x slower than
fp32, which made the optimizer step 93% of a quickstart training step (4.6 s of 4.9 s,
measured). Here the iteration runs in fp32 on CPU and bf16 on CUDA (torch's choice), and
the 100+ expert matrices of one shape go through it as one batch. The algorithm is
torch's: momentum (lerp), Nesterov, the quintic iteration with the same coefficients,
decoupled weight decay, `adjust_lr_fn`; the state layout is torch's ("momentum_buffer"),
so checkpoints move between the two. With ns_dtype=torch.bfloat16 the update equals
torch.optim.Muon's (tested).
"""

from __future__ import annotations

import math

import torch


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """torch.optim.Muon's learning-rate scaling by matrix shape."""
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, A / B))
    if adjust_lr_fn == "match_rms_adamw":  # Moonshot: RMS of the update matches AdamW's
        return lr * 0.2 * math.sqrt(max(A, B))
    return lr


def newton_schulz(update_GAB: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Approximate orthogonalisation of a batch of matrices (G, A, B), as torch's
    `_zeropower_via_newtonschulz` does for one."""
    a, b, c = coefficients
    x = update_GAB.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-2, -1)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.transpose(-2, -1) if tall else x


class Muon(torch.optim.Muon):
    def __init__(self, params, *, ns_dtype: torch.dtype | None = None, **kwargs) -> None:
        """ns_dtype: dtype of the Newton-Schulz iteration; None = bf16 on CUDA, fp32 elsewhere."""
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            by_shape: dict[tuple, list[int]] = {}
            for i, (p, g, buf) in enumerate(zip(params, grads, bufs)):
                buf.lerp_(g, 1 - group["momentum"])
                by_shape.setdefault((tuple(p.shape), p.device, p.dtype), []).append(i)
            for (shape, device, _), idx in by_shape.items():
                m = group["momentum"]
                updates = [grads[i].lerp(bufs[i], m) if group["nesterov"] else bufs[i] for i in idx]
                dtype = self.ns_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
                ortho = newton_schulz(torch.stack(updates), group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                lr = group["lr"]
                alpha = -adjust_lr(lr, group["adjust_lr_fn"], shape)
                for k, i in enumerate(idx):
                    params[i].mul_(1 - lr * group["weight_decay"])
                    params[i].add_(ortho[k], alpha=alpha)
        return None
