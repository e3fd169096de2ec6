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
    """A `transformers` model at a released configuration, its table served by engram-lm's tiers."""

    name: str
    kwargs: dict[str, Any]  # the released text configuration
    source: str
    chosen: str
    config_class: Callable[[], type]  # imported on use: transformers is an extra
    model_class: Callable[[], type]
    dtype: torch.dtype = torch.bfloat16
    table_dtype: str = "bf16"  # the rows' encoding on file

    def config(self, **overrides: Any):
        return self.config_class()(**{**self.kwargs, **overrides})

    @property
    def table_shape(self) -> tuple[int, int]:
        k = self.kwargs
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


HF_SHAPES = {"gemma4-e2b": gemma4_e2b}


def hf_scaled_down(shape: HFShape) -> HFShape:
    """The same class at a size a test builds in a second: 4 layers (2 sharing), hidden 64, vocab 512."""
    small = dict(shape.kwargs, hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4, head_dim=16,
                 global_head_dim=32, vocab_size=512, vocab_size_per_layer_input=512, hidden_size_per_layer_input=8,
                 num_kv_shared_layers=2, sliding_window=16, max_position_embeddings=1024,
                 layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    return HFShape(shape.name + " (scaled down)", small, shape.source, shape.chosen, shape.config_class,
                   shape.model_class, torch.float32, shape.table_dtype)  # fmt: skip
