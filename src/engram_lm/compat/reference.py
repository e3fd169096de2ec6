"""Load weights saved by the reference demo (engram_demo_v1.py) into our Engram module.

`from_reference(state_dict, config)` returns a callable with the demo's signature
`(hidden_states (B,T,M,D), raw input_ids (B,T)) -> Y (B,T,M,D)` that reproduces
`Engram.forward` of the demo. Parameter names are the demo's (ENGRAM_SPEC s.5); the
M key projections and the value projection are fused into one matrix here.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from engram_lm.config import EngramConfig
from engram_lm.engram.module import Engram
from engram_lm.hashing.hasher import NgramHasher

REFERENCE_CONFIG_FIELDS = (
    "engram_vocab_size", "max_ngram_size", "n_embed_per_ngram", "n_head_per_ngram", "layer_ids",
    "layer_id", "pad_id", "seed", "kernel_size", "hidden_size", "hc_mult", "tokenizer",
)  # fmt: skip


def config_from_reference(ref: Mapping[str, Any]) -> EngramConfig:
    """Our EngramConfig from the demo's EngramConfig + BackBoneConfig field names."""
    missing = [f for f in REFERENCE_CONFIG_FIELDS if f not in ref]
    if missing:
        raise ValueError(f"reference config lacks {missing}; it needs all of {list(REFERENCE_CONFIG_FIELDS)}")
    return EngramConfig(
        tokenizer=str(ref["tokenizer"]),
        table_sizes=tuple(ref["engram_vocab_size"]),
        max_ngram=int(ref["max_ngram_size"]),
        num_heads=int(ref["n_head_per_ngram"]),
        layer_ids=tuple(ref["layer_ids"]),
        pad_id=int(ref["pad_id"]),
        seed=int(ref["seed"]),
        embed_per_ngram=int(ref["n_embed_per_ngram"]),
        hidden_size=int(ref["hidden_size"]),
        num_branches=int(ref["hc_mult"]),
        kernel_size=int(ref["kernel_size"]),
        use_short_conv=True,
        projection_bias=True,
        gate_eps=None,
        conv_eps=1e-5,
    )


class ReferenceEngram:
    """The demo's Engram layer `layer_id`, backed by our hasher and module."""

    def __init__(self, module: Engram, hasher: NgramHasher, layer_id: int) -> None:
        self.module, self.hasher, self.layer_id = module, hasher, layer_id

    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor, input_ids: Any) -> torch.Tensor:
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.from_numpy(np.asarray(input_ids))
        rows = self.hasher(ids.to(hidden_states.device), global_rows=True)[self.layer_id]
        return self.module(hidden_states, rows)


def from_reference(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> ReferenceEngram:
    cfg = config_from_reference(config)
    layer_id = int(config["layer_id"])
    if layer_id not in cfg.layer_ids:
        raise ValueError(f"layer_id {layer_id} is not one of layer_ids {list(cfg.layer_ids)}")
    hasher = NgramHasher.from_config(cfg)
    layer = hasher.layout.layer(layer_id)
    sd = _strip_prefix(state_dict)
    module = Engram(cfg, layer.rows)
    _check_offsets(sd, layer.offsets)
    module.load_state_dict(_convert(sd, cfg), strict=True)
    dtype = sd["multi_head_embedding.embedding.weight"].dtype
    return ReferenceEngram(module.to(dtype).eval(), hasher, layer_id)


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    anchor = "multi_head_embedding.embedding.weight"
    hits = [k for k in sd if k.endswith(anchor)]
    if len(hits) != 1:
        raise ValueError(
            f"state dict must hold exactly one '{anchor}' (the demo's Engram layer), found {len(hits)}; "
            "pass the state_dict of one reference Engram module"
        )
    prefix = hits[0][: -len(anchor)]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _check_offsets(sd: dict[str, torch.Tensor], offsets: tuple[int, ...]) -> None:
    if "multi_head_embedding.offsets" in sd:
        got = sd["multi_head_embedding.offsets"].tolist()
        if got != list(offsets):
            raise ValueError(
                f"reference head offsets {got[:4]}... differ from this config's layout {list(offsets[:4])}...; "
                "the weights were trained with a different hash configuration or tokenizer"
            )


def _take(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"reference state dict lacks '{key}'")
    return sd[key]


def _convert(sd: dict[str, torch.Tensor], cfg: EngramConfig) -> dict[str, torch.Tensor]:
    M = cfg.num_branches
    out = {
        "memory.weight": _take(sd, "multi_head_embedding.embedding.weight"),
        "key_value.weight": torch.cat(
            [_take(sd, f"key_projs.{m}.weight") for m in range(M)] + [_take(sd, "value_proj.weight")]
        ),
        "key_value.bias": torch.cat([_take(sd, f"key_projs.{m}.bias") for m in range(M)] + [_take(sd, "value_proj.bias")]),
        "gate.key_weight": torch.stack([_take(sd, f"norm1.{m}.weight") for m in range(M)]),
        "gate.query_weight": torch.stack([_take(sd, f"norm2.{m}.weight") for m in range(M)]),
        "short_conv.weight": _take(sd, "short_conv.conv.weight"),
        "short_conv.norm_weight": torch.stack([_take(sd, f"short_conv.norms.{m}.weight") for m in range(M)]),
    }
    return out
