"""Layer-wise comparisons of two checkpoints on the same held-out tokens (LogitLens, CKA)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from engram_lm.analysis.capture import capture
from engram_lm.analysis.cka import cka_matrix, soft_alignment_index
from engram_lm.analysis.logit_lens import logit_lens
from engram_lm.plotting import saved_figure
from engram_lm.training.data import eval_windows, prepare_data
from engram_lm.inference.loading import load_trained


def _held_out(state: dict[str, Any], batches: int, seq: int = 128) -> torch.Tensor:
    data = prepare_data(state["corpus"], str(Path(state["path"]) / "tokenizer.json"))
    windows = eval_windows(data.val, 8, seq, batches)
    return torch.cat([x for x, _ in windows])


def logit_lens_compare(checkpoint: Path, baseline: Path, out: Path, batches: int = 2) -> dict[str, Any]:
    curves = {}
    for name, ckpt in (("engram", checkpoint), ("baseline", baseline)):
        model, state = load_trained(ckpt)
        curves[name] = logit_lens(model, _held_out(state, batches))
    out = Path(out)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "engram_kl", "baseline_kl"])
        for i in range(max(len(c) for c in curves.values())):
            writer.writerow([i] + [c[i] if i < len(c) else "" for c in curves.values()])
    _plot_lines(curves, out.with_suffix(".png"), "block", "KL(final || early exit) [nats]", "LogitLens")
    return {"curves": curves, "csv": str(out.with_suffix(".csv")), "png": str(out.with_suffix(".png"))}


def cka_compare(checkpoint: Path, baseline: Path, out: Path, batches: int = 2, top_k: int = 5) -> dict[str, Any]:
    feats = []
    for ckpt in (checkpoint, baseline):
        model, state = load_trained(ckpt)
        with torch.no_grad(), capture(model) as cap:
            model(_held_out(state, batches))
        feats.append([h.reshape(-1, h.shape[-1]) for h in cap.block_outputs])
    matrix = cka_matrix(feats[0], feats[1])
    index = soft_alignment_index(matrix, top_k=top_k)
    out = Path(out)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["engram_layer"] + [f"baseline_{j}" for j in range(matrix.shape[1])] + ["soft_alignment_index"])
        for i, row in enumerate(matrix.tolist()):
            writer.writerow([i] + [f"{v:.4f}" for v in row] + [f"{index[i]:.3f}"])
    _plot_matrix(matrix, out.with_suffix(".png"))
    return {"cka": matrix.tolist(), "soft_alignment_index": index.tolist(), "csv": str(out.with_suffix(".csv"))}


def _plot_lines(curves: dict[str, list[float]], path: Path, xlabel: str, ylabel: str, title: str) -> None:
    with saved_figure(path, (6, 4)) as (fig, ax):
        for name, values in curves.items():
            ax.plot(range(len(values)), values, marker="o", label=name)
        ax.set_xticks(range(max(len(v) for v in curves.values())))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()


def _plot_matrix(matrix: torch.Tensor, path: Path) -> None:
    with saved_figure(path, (5, 4)) as (fig, ax):
        im = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=1, origin="lower")
        ax.set_xlabel("baseline layer")
        ax.set_ylabel("Engram model layer")
        fig.colorbar(im, ax=ax, label="linear CKA")
