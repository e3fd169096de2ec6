"""Released models' shapes for `engram bench penalty`, built from `transformers`' own classes.

`gemma4-e2b`: `Gemma4ForCausalLM` (the text model) at Gemma 4 E2B's released text configuration,
its per-layer embedding table (262,144 token ids x 35 layers x 256 = 8,960 values a row) served by
engram-lm's tiers exactly as `offload_tables` serves it (`TierEmbedding`, the same scale, the same
prefetch hook). The values are google/gemma-4-E2B's config.json `text_config`, as transcribed
identically in several public repositories found with the search tool (a Swift port's
configuration tests, a Rust port's E2B detection test and a JAX port's `e2b_text_config`):
hidden 1536, 35 layers (every fifth full attention, the rest sliding over 512), 8 query heads and
1 key/value head of 256 (512 on full attention, a quarter of it rotated), the last 20 layers
sharing earlier layers' keys and values, MLP 6144 (doubled on the shared layers), vocabulary
262,144 tied, final logit soft-cap 30. Released in bf16: the weights and the table are bf16 here.
Without the table (the reference) is the same model with its per-layer path switched off (the
official forward's own `hidden_size_per_layer_input` test): no table read, no per-layer
projection or gates, every other weight shared.

`qwen3.8-slice`: `Qwen4ExpForCausalLM` (`qwen4_exp`) at Qwen3.8-Flash-Next's released text
configuration (a serving deployment's published `text_config` override, found with the search
tool: hidden 2560, 24 query and 2 key/value heads of 256, gated-delta-net heads 16 / 48 of 128,
512 routed experts of 640 with top-10 and a shared one of 640, hyper-connections 4 x 320, the
PLE n-gram module at layer 2 with ple_embed_dim 2560, orders 2-3 x 8 heads, n-gram base
20,000,000 divisible by 128, vocabulary 248,320, eos 248,044, 48 layers, every fourth full
attention) with its full n-gram table: 320,001,536 rows of 160 values, addressed by the official
module's own hashing, read from `engram bench real-table`'s fp8 file. Cut so that it fits: 4
layers instead of 48 (the PLE layer and the first full-attention layer kept) and 16 experts
instead of 512 (top-10 kept): 1.92B parameters besides the table, against 125.7B released.
Without the table is the same model with its PLE layer's module removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

GEMMA4_E2B_TEXT = dict(
    hidden_size=1536, num_hidden_layers=35, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1,
    head_dim=256, global_head_dim=512, vocab_size=262_144, vocab_size_per_layer_input=262_144,
    hidden_size_per_layer_input=256, num_kv_shared_layers=20, sliding_window=512, max_position_embeddings=131_072,
    final_logit_softcapping=30.0, rms_norm_eps=1e-6, attention_bias=False, attention_k_eq_v=False,
    use_double_wide_mlp=True, enable_moe_block=False, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7,
    rope_parameters={"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
                     "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}},
)  # fmt: skip
GEMMA4_E2B_SOURCE = ("google/gemma-4-E2B config.json text_config (transcribed identically in several public repositories, "
                     "found with the search tool): hidden 1536, 35 layers, 8 heads / 1 KV head of 256 (512 global), 20 "
                     "KV-shared layers, MLP 6144 (double-wide), vocab 262,144, per-layer input 256 x 35 = 8,960")  # fmt: skip


@dataclass(frozen=True)
class HFShape:
    """A `transformers` model at a released configuration, its table served by engram-lm's tiers.
    `table`: "per-layer" (Gemma's per-layer embedding) or "ngram" (qwen4_exp's PLE n-gram table)."""

    name: str
    kwargs: dict[str, Any]  # the configuration built (the released one, cut where `chosen` says)
    source: str
    chosen: str
    config_class: Callable[[], type]  # imported on use: transformers is an extra
    model_class: Callable[[], type]
    dtype: torch.dtype = torch.bfloat16
    table_dtype: str = "bf16"  # the rows' encoding on file
    table: str = "per-layer"
    table_file: str | None = None  # a file name in --workdir reused when it is there (and kept)

    def config(self, **overrides: Any):
        return self.config_class()(**{**self.kwargs, **overrides})

    @property
    def table_shape(self) -> tuple[int, int]:
        k = self.kwargs
        if self.table == "ngram":
            from engram_lm.hashing.qwen4 import qwen4_layout

            layout = qwen4_layout(vocab_size=k["vocab_size"], eos_id=k["eos_token_id"], ngram_size=k["ngram_size"],
                                  heads_per_ngram=k["heads_per_ngram"], ngram_vocab_size_base=k["ngram_vocab_size_base"],
                                  divisible_by=k["make_ngram_vocab_size_divisible_by"])  # fmt: skip
            return layout.padded_rows, k["ple_embed_dim"] // (k["heads_per_ngram"] * (k["ngram_size"] - 1))
        return k["vocab_size_per_layer_input"], k["num_hidden_layers"] * k["hidden_size_per_layer_input"]


def _gemma4_config():
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig


def _gemma4_model():
    from transformers import Gemma4ForCausalLM

    return Gemma4ForCausalLM


def gemma4_e2b() -> HFShape:
    return HFShape("gemma4-e2b", GEMMA4_E2B_TEXT, GEMMA4_E2B_SOURCE,
                   "the text model only (no vision or audio towers); random bf16 weights; the per-layer table bf16 on "
                   "file, served through TierEmbedding as offload_tables serves it", _gemma4_config, _gemma4_model)  # fmt: skip


QWEN38_TEXT = dict(
    vocab_size=248_320, hidden_size=2560, num_attention_heads=24, num_key_value_heads=2, head_dim=256,
    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
    linear_num_value_heads=48, moe_intermediate_size=640, shared_expert_intermediate_size=640, num_experts_per_tok=10,
    num_experts=512, hc_count=4, hc_lowrank=320, ple_layer_ids=[2], ple_embed_dim=2560, ple_conv_kernel_size=4,
    ngram_size=3, heads_per_ngram=8, ngram_vocab_size_base=20_000_000, make_ngram_vocab_size_divisible_by=128,
    split_ngram_parts=128, output_gate_type="sigmoid", indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=128,
    indexer_budget=2048, indexer_compress_ratio=4, bos_token_id=248_044, eos_token_id=248_044, tie_word_embeddings=False,
    num_hidden_layers=48, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 12, max_position_embeddings=524_288,
    rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 262_144,
                     "rope_theta": 10_000_000, "partial_rotary_factor": 0.25},
)  # fmt: skip
QWEN38_SOURCE = ("Qwen3.8-Flash-Next's text_config as a serving deployment publishes it (found with the search tool): "
                 "hidden 2560, 48 layers, 24 / 2 heads of 256, 512 experts of 640 (top-10), PLE n-gram at layer 2, "
                 "ple_embed_dim 2560, orders 2-3 x 8 heads, base 20M: 320,001,536 rows x 160")  # fmt: skip
SLICE_LAYERS, SLICE_EXPERTS = 4, 16


def _qwen4_config():
    from transformers.models.qwen4_exp import Qwen4ExpTextConfig

    return Qwen4ExpTextConfig


def _qwen4_model():
    from transformers.models.qwen4_exp import Qwen4ExpForCausalLM

    return Qwen4ExpForCausalLM


def qwen38_slice() -> HFShape:
    cut = dict(QWEN38_TEXT, num_hidden_layers=SLICE_LAYERS, layer_types=QWEN38_TEXT["layer_types"][:SLICE_LAYERS],
               num_experts=SLICE_EXPERTS)  # fmt: skip
    return HFShape("qwen3.8-slice", cut, QWEN38_SOURCE,
                   f"cut to fit: {SLICE_LAYERS} of 48 layers (the PLE layer and the first full attention kept), "
                   f"{SLICE_EXPERTS} of 512 experts (top-10 kept); the text model only; random bf16 weights; the full "
                   "n-gram table as `engram bench real-table` writes it (fp8, 52.8 GB), served through TierEmbedding "
                   "as offload_tables serves it", _qwen4_config, _qwen4_model, table_dtype="fp8", table="ngram",
                   table_file="qwen3.8-ngram-table-fp8.bin")  # fmt: skip


HF_SHAPES = {"gemma4-e2b": gemma4_e2b, "qwen3.8-slice": qwen38_slice}


def hf_scaled_down(shape: HFShape) -> HFShape:
    """The same class at a size a test builds in a second (fp32, a table file of its own)."""
    if shape.table == "ngram":  # 2 layers, hidden 32, vocab 97, a 2,000-row-base table
        small = dict(shape.kwargs, vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2,
                     linear_key_head_dim=16, linear_value_head_dim=16, moe_intermediate_size=16,
                     shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, hc_lowrank=8, ple_layer_ids=[1],
                     ple_embed_dim=32, heads_per_ngram=2, ngram_vocab_size_base=1000, indexer_n_heads=2, indexer_head_dim=8,
                     indexer_budget=8, eos_token_id=7, bos_token_id=7, max_position_embeddings=1024,
                     layer_types=["linear_attention", "full_attention"])  # fmt: skip
        return HFShape(shape.name + " (scaled down)", small, shape.source, shape.chosen, shape.config_class,
                       shape.model_class, torch.float32, shape.table_dtype, shape.table)  # fmt: skip
    small = dict(shape.kwargs, hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4, head_dim=16,
                 global_head_dim=32, vocab_size=512, vocab_size_per_layer_input=512, hidden_size_per_layer_input=8,
                 num_kv_shared_layers=2, sliding_window=16, max_position_embeddings=1024,
                 layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    return HFShape(shape.name + " (scaled down)", small, shape.source, shape.chosen, shape.config_class,
                   shape.model_class, torch.float32, shape.table_dtype, shape.table)  # fmt: skip
