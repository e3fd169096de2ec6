"""Linear CKA between layers of two models, and the paper's soft alignment index.

CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) for feature matrices X (N, Dx),
Y (N, Dy) over the same N tokens, with columns centred (Kornblith et al., 2019). It is 1
for X with itself and invariant to orthogonal transforms and isotropic scaling.
Soft alignment index of layer j of model A: the CKA-weighted mean index of the k layers of
model B most similar to it (k = 5 in the paper); above j means A's layer j already looks
like a deeper layer of B.
"""

from __future__ import annotations

import torch


def linear_cka(x_ND: torch.Tensor, y_ND: torch.Tensor) -> float:
    x = x_ND.double() - x_ND.double().mean(0, keepdim=True)
    y = y_ND.double() - y_ND.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def cka_matrix(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
    """(layers of A, layers of B) matrix of linear CKA."""
    return torch.tensor([[linear_cka(a, b) for b in feats_b] for a in feats_a])


def soft_alignment_index(cka_AB: torch.Tensor, top_k: int = 5) -> torch.Tensor:
    k = min(top_k, cka_AB.shape[1])
    values, index = torch.topk(cka_AB, k, dim=1)
    return (values * index.double()).sum(1) / values.sum(1).clamp_min(1e-12)
