"""Autoregressive generation with a KV cache, incremental hashing and conv streaming.

Prompts of equal length decode together as one batch; each step feeds only the new
tokens (the DecodeCache carries KV, the hash history and the short-conv window), which
is tested to equal recomputing the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram_lm.config import check_field_types
from engram_lm.models.transformer import EngramLM


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    stop_id: int | None = None  # stop a row at this token (e.g. end of document)

    def __post_init__(self) -> None:
        check_field_types(self)  # also refuses NaN: every comparison below would pass it
        for name, ok, rule in (("max_new_tokens", self.max_new_tokens >= 0, ">= 0"),
                               ("temperature", 0 <= self.temperature < float("inf"), "a finite number >= 0 (0: greedy)"),
                               ("top_k", self.top_k >= 0, ">= 0 (0: off)"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]")):  # fmt: skip
            if not ok:
                raise ValueError(f"invalid sampling {name}={getattr(self, name)!r}: use {rule}")


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    if cfg.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits_BV.device)


@torch.no_grad()
def generate(model: EngramLM, prompts: list[list[int]], cfg: SamplingConfig) -> list[list[int]]:
    """New token ids for each prompt (prompt not included)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.head.weight.device
    generator = torch.Generator().manual_seed(cfg.seed)
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in by_length.items():
        if length + cfg.max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"prompt of {length} tokens + {cfg.max_new_tokens} new exceeds max_seq_len={model.config.max_seq_len}")
        ids_BT = torch.tensor([prompts[i] for i in rows], dtype=torch.int64, device=device)
        cache = model.new_cache(len(rows), length + cfg.max_new_tokens)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(cfg.max_new_tokens):
            logits, _ = model(ids_BT, cache=cache)
            next_B = sample_next(logits[:, -1], cfg, generator)
            for j, r in enumerate(rows):
                if not done[j]:
                    out[r].append(int(next_B[j]))
            if cfg.stop_id is not None:
                done |= next_B == cfg.stop_id
                if bool(done.all()):
                    break
            ids_BT = next_B.unsqueeze(1)
    return out
