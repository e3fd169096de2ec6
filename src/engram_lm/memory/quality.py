"""What a row format costs a model, measured before an export keeps it: the quality gate.

A lossy format (bf16, fp8, int8, int4; memory/codec.py) changes the rows a model reads. The
gate runs the checkpoint's model on held-out text twice, with its tables as trained and with
every table encoded and decoded in the format, and compares: the held-out loss (its increase)
and the next-token distribution's KL divergence, KL(p_trained || p_format) averaged over the
tokens. An export above either threshold is refused (nothing written), one within both is kept,
and the numbers go into its manifest; without text to measure on, the export says so and
records "unchecked" (never a silent keep). Defaults (DEFAULT_MAX_*): measured on this project's
trained models, docs/memory.md ("Compact rows").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engram_lm.memory.codec import decode_rows, encode_rows

DEFAULT_MAX_KL = 0.01  # nats per token
DEFAULT_MAX_LOSS_INCREASE = 0.01  # nats per token
CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class FormatCost:
    dtype: str
    tokens: int
    loss: float  # held-out loss with the tables as trained
    loss_format: float  # the same with every table through the format
    kl: float  # mean KL(p_trained || p_format) per token, nats

    @property
    def loss_increase(self) -> float:
        return self.loss_format - self.loss

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_increase": self.loss_increase}


def through_format(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """The rows a tier serves from a `dtype` export of `weight` (encoded and decoded, chunk by chunk)."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for a in range(0, weight.shape[0], CHUNK_ROWS):
        chunk = weight[a : a + CHUNK_ROWS].detach().float().cpu()
        out[a : a + CHUNK_ROWS] = decode_rows(encode_rows(chunk, dtype), dtype, weight.shape[1])
    return out


@torch.no_grad()
def format_cost(model, windows: list[tuple[torch.Tensor, torch.Tensor]], dtype: str) -> FormatCost:
    """An engram-lm model's held-out loss and next-token KL with its Engram tables as trained and through `dtype`."""
    model.eval()
    tables = [b.engram.memory for b in model.blocks if b.engram is not None]
    return tables_cost(tables, lambda x: model(x)[0], windows, dtype)


@torch.no_grad()
def tables_cost(tables: list, logits_of, windows: list[tuple[torch.Tensor, torch.Tensor]], dtype: str) -> FormatCost:
    """The cost of serving `tables` (modules with a `weight`) through `dtype`, for any model: `logits_of(x)`
    gives its logits (B, T, V) with the tables as they are at the time of the call."""
    trained = [t.weight.data for t in tables]
    formatted = [through_format(w, dtype) for w in trained]
    loss = loss_format = kl = 0.0
    tokens = 0
    try:
        for x, y in windows:
            for t, w in zip(tables, trained):
                t.weight.data = w
            logp = F.log_softmax(logits_of(x).float(), -1)
            for t, w in zip(tables, formatted):
                t.weight.data = w.to(t.weight.dtype)
            logq = F.log_softmax(logits_of(x).float(), -1)
            loss += float(F.nll_loss(logp.flatten(0, 1), y.flatten(), reduction="sum"))
            loss_format += float(F.nll_loss(logq.flatten(0, 1), y.flatten(), reduction="sum"))
            kl += float((logp.exp() * (logp - logq)).sum())
            tokens += y.numel()
    finally:
        for t, w in zip(tables, trained):
            t.weight.data = w
    return FormatCost(dtype, tokens, loss / tokens, loss_format / tokens, kl / tokens)


def check_gate(cost: FormatCost, max_kl: float, max_loss_increase: float) -> None:
    """Refuse a format above either threshold, in one line with the numbers and the fix."""
    if cost.kl > max_kl or cost.loss_increase > max_loss_increase:
        raise ValueError(f"{cost.dtype} rows cost this model {cost.loss_increase:+.4f} nats of held-out loss and a KL of "
                         f"{cost.kl:.4f} nats a token ({cost.tokens:,} tokens), above the gate ({max_loss_increase} and "
                         f"{max_kl}): nothing was written; export a wider format (int8, fp8, bf16) or raise "
                         "--max-loss-increase / --max-kl to keep it")  # fmt: skip


def unchecked(dtype: str, reason: str) -> dict[str, Any]:
    """A lossy export nothing measured: said once on stderr and recorded in the manifest (fp32 is lossless)."""
    import sys

    if dtype == "fp32":
        return {"checked": True, "dtype": dtype, "lossless": True}
    print(f"note: the {dtype} export's quality is unchecked ({reason}); the manifest records it so", file=sys.stderr)
    return {"checked": False, "dtype": dtype, "reason": reason}


def measure_export(state: dict[str, Any], dtype: str, *, text: str | None = None, batches: int = 8,
                   max_kl: float = DEFAULT_MAX_KL, max_loss_increase: float = DEFAULT_MAX_LOSS_INCREASE) -> dict[str, Any]:  # fmt: skip
    """The gate for exporting a checkpoint's tables as `dtype`: its manifest entry; raises above the gate.
    `text`: a corpus (built-in name or path) to measure on, default the run's own (its held-out split)."""
    import sys
    from pathlib import Path

    if dtype == "fp32":
        return {"checked": True, "dtype": dtype, "lossless": True}
    from engram_lm.inference.loading import load_trained
    from engram_lm.training.config import TrainConfig
    from engram_lm.training.data import eval_windows, prepare_data

    corpus = text or state.get("corpus")
    try:
        data = prepare_data(corpus, str(Path(state["path"]) / "tokenizer.json"))
    except (ValueError, OSError) as exc:
        print(f"note: the {dtype} export's quality is unchecked: no text to measure it on ({exc}); the manifest says "
              "so. Pass --check-text a corpus to check it", file=sys.stderr)  # fmt: skip
        return {"checked": False, "dtype": dtype, "reason": str(exc)}
    model, _ = load_trained(state["path"])
    train = TrainConfig.from_dict(state["train_config"])
    cost = format_cost(model, eval_windows(data.val, train.batch_size, train.seq_len, batches), dtype)
    check_gate(cost, max_kl, max_loss_increase)
    return {"checked": True, **cost.to_dict(), "text": str(data.corpus), "max_kl": max_kl,
            "max_loss_increase": max_loss_increase}  # fmt: skip
