"""ModelConfig: one frozen config for every variant (dense, MoE, MoE+Engram, OverEncoding).

- dense:        num_routed_experts = 0
- MoE:          num_routed_experts > 0 (the first num_dense_layers blocks stay dense)
- +Engram:      engram = EngramConfig(...) (its hidden_size/num_branches follow the model)
- OverEncoding: overencoding = OverEncodingConfig(...): the input-side n-gram baseline as
                its paper defines it (models/overencoding.py)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from engram_lm.config import EngramConfig, OverEncodingConfig, check_field_types, checked_fields


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    max_seq_len: int
    ffn_hidden: int  # hidden size of dense SwiGLU blocks
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    num_routed_experts: int = 0
    num_shared_experts: int = 0
    top_k: int = 0
    expert_hidden: int = 0
    num_dense_layers: int = 1  # DeepSeekMoE keeps the first block(s) dense
    route_scale: float = 1.0
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step size
    num_branches: int = 1  # residual copies (mHC expansion); 1 = plain residual
    sinkhorn_iters: int = 20
    engram: EngramConfig | None = None
    overencoding: OverEncodingConfig | None = None
    eod_id: int | None = None  # n-grams never cross this token (packed documents)
    init_std: float = 0.02
    table_init_std: float = 0.02
    num_kv_heads: int | None = None  # grouped-query attention: fewer key/value heads (None: num_heads)
    attention_head_dim: int | None = None  # per head (None: dim / num_heads); Qwen3-4B: 32 x 128 over hidden 2560

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len", "ffn_hidden"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        if self.attention_head_dim is None:
            _check(self.dim % self.num_heads == 0, "dim", self.dim, f"must be divisible by num_heads={self.num_heads}")
        _check(self.head_dim >= 2 and self.head_dim % 2 == 0, "attention_head_dim", self.head_dim, "must be even (RoPE)")
        _check(self.kv_heads >= 1 and self.num_heads % self.kv_heads == 0, "num_kv_heads", self.kv_heads,
               f"must divide num_heads={self.num_heads}")  # fmt: skip
        _check(self.num_branches >= 1, "num_branches", self.num_branches, "use 1 for a plain residual")
        if self.num_routed_experts:
            _check(
                1 <= self.top_k <= self.num_routed_experts,
                "top_k",
                self.top_k,
                f"choose 1..num_routed_experts={self.num_routed_experts}",
            )
            _check(self.expert_hidden >= 1, "expert_hidden", self.expert_hidden, "must be >= 1 for MoE")
        _check(self.num_routed_experts >= 0, "num_routed_experts", self.num_routed_experts, "must be >= 0")
        _check(self.num_shared_experts >= 0, "num_shared_experts", self.num_shared_experts, "must be >= 0")
        if self.engram is not None:
            engram = replace(self.engram, hidden_size=self.dim, num_branches=self.num_branches)
            object.__setattr__(self, "engram", engram)
            bad = [i for i in engram.layer_ids if i >= self.num_layers]
            _check(not bad, "engram.layer_ids", engram.layer_ids, f"must be < num_layers={self.num_layers}")
        if self.overencoding is not None and not isinstance(self.overencoding, OverEncodingConfig):
            _check(False, "overencoding", type(self.overencoding).__name__, "use an OverEncodingConfig")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_routed_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.num_dense_layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("engram", "overencoding"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(checked_fields(cls, d))
        if d.get("engram") is not None:
            d["engram"] = EngramConfig.from_dict(d["engram"])
        if d.get("overencoding") is not None:
            d["overencoding"] = OverEncodingConfig.from_dict(d["overencoding"])
        return cls(**d)

    def with_(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


def _check(ok: bool, field: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"invalid ModelConfig.{field}={value!r}: {fix}")
