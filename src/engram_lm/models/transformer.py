"""The Engram language model: one assembly for dense, MoE, MoE+Engram and OverEncoding.

    x = Embed(ids)                      (OverEncoding: + projected n-gram rows, / (1 + H))
    x = copy x into M branches          (B, T, M, D)
    per block l:  x += Engram_l(x, rows_l)              (only at Engram layers)
                  x  = HC_attn(x, Attention(RMSNorm(.)))
                  x  = HC_ffn(x, FFN-or-MoE(RMSNorm(.)))
    logits = Head(RMSNorm(sum over branches of x))

Hash rows depend only on token ids, so `hash_rows` runs before the blocks (and can run
ahead of them; see issue "decouple memory from compute").

Shape legend: B batch, T positions, M branches, D model dim, V vocabulary, H hash columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engram_lm.engram.conv import ConvState
from engram_lm.engram.module import Engram
from engram_lm.hashing.hasher import NgramHasher, NgramHistory
from engram_lm.layers.attention import Attention, KVCache
from engram_lm.layers.hyper import HyperConnection
from engram_lm.layers.mlp import SwiGLU
from engram_lm.layers.moe import MoE
from engram_lm.layers.rope import rope_tables
from engram_lm.memory.dense import DenseTable
from engram_lm.models.config import ModelConfig
from engram_lm.models.overencoding import OverEncoding, OverEncodingHasher
from engram_lm.tokenizer.compression import VocabProjection


@dataclass
class LayerCache:
    kv: KVCache
    conv: ConvState | None = None


@dataclass
class DecodeCache:
    """Everything decoding carries between steps: KV caches, conv streams, hash histories."""

    layers: list[LayerCache]
    histories: dict[str, NgramHistory] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layers[0].kv.length


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, engram: Engram | None) -> None:
        super().__init__()
        D, M = config.dim, config.num_branches
        self.engram = engram
        self.attn_norm = nn.RMSNorm(D, eps=config.norm_eps)
        self.attn = Attention(D, config.num_heads, config.kv_heads, config.head_dim)
        self.ffn_norm = nn.RMSNorm(D, eps=config.norm_eps)
        if config.is_moe_layer(layer):
            self.ffn = MoE(D, config.num_routed_experts, config.num_shared_experts, config.top_k,
                           config.expert_hidden, config.route_scale)  # fmt: skip
        else:
            self.ffn = SwiGLU(D, config.ffn_hidden)
        self.attn_hc = HyperConnection(M, D, sinkhorn_iters=config.sinkhorn_iters, eps=config.norm_eps)
        self.ffn_hc = HyperConnection(M, D, sinkhorn_iters=config.sinkhorn_iters, eps=config.norm_eps)

    def forward(
        self,
        x_BTMD: torch.Tensor,
        cos_TK: torch.Tensor,
        sin_TK: torch.Tensor,
        rows_BTH: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        if self.engram is not None:
            x_BTMD = x_BTMD + self.engram(x_BTMD, rows_BTH, conv_state=cache.conv if cache else None)
        kv = cache.kv if cache is not None else None
        x_BTMD = self.attn_hc(x_BTMD, lambda h: self.attn(self.attn_norm(h), cos_TK, sin_TK, kv))
        return self.ffn_hc(x_BTMD, lambda h: self.ffn(self.ffn_norm(h)))


class EngramLM(nn.Module):
    def __init__(self, config: ModelConfig, projection: VocabProjection | None = None) -> None:
        """`projection` is the tokenizer's compression (loaded from config.engram.tokenizer
        when omitted). Tables are device-resident DenseTables with sparse row gradients."""
        super().__init__()
        self.config = config
        D = config.dim
        self.embed = nn.Embedding(config.vocab_size, D)
        self.hasher = self.oe_hasher = None
        engrams: dict[int, Engram] = {}
        if config.engram is not None:
            self.hasher = NgramHasher.from_config(config.engram, projection)
            for layer in self.hasher.layout.layers:
                # the capacity-1 control keeps one row per hash column: every n-gram reads it
                rows = config.engram.num_hash_columns if config.engram.single_slot else layer.rows
                table = DenseTable(rows, config.engram.head_dim, init_std=config.table_init_std, sparse_grad=True)
                engrams[layer.layer_id] = Engram(config.engram, rows, memory=table)
        self.overencoding = None
        if config.overencoding is not None:
            self.oe_hasher = OverEncodingHasher(config.overencoding, config.vocab_size)
            self.overencoding = OverEncoding(config.overencoding, D, config.init_std)
        self.blocks = nn.ModuleList(Block(config, i, engrams.get(i)) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(D, eps=config.norm_eps)
        self.head = nn.Linear(D, config.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()
        self._init_weights()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE tables; needed after construction on the meta device, where
        non-persistent buffers hold no data and no checkpoint restores them."""
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device or cos.device), sin.to(device or sin.device)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if block.engram is not None and block.engram.config.zero_init_output:
                block.engram.zero_output_()  # Engram adds 0 at init

    # ---- hashing: known before the forward pass -------------------------------------------
    def hash_rows(
        self, input_ids_BT: torch.Tensor, cache: DecodeCache | None = None
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Global table rows of every Engram layer and of OverEncoding for these tokens."""
        rows = self._rows(self.hasher, "engram", input_ids_BT, cache) if self.hasher else None
        oe = self._rows(self.oe_hasher, "overencoding", input_ids_BT, cache) if self.oe_hasher else None
        if rows is not None and self.config.engram.single_slot:  # capacity-1 control: column j reads row j
            rows = torch.arange(rows.shape[-1], device=rows.device).expand_as(rows)
        engram_rows = dict(zip(self.hasher.layout.layer_ids, rows.unbind(0))) if rows is not None else {}
        return engram_rows, oe

    def _rows(self, hasher, key: str, ids_BT: torch.Tensor, cache: DecodeCache | None) -> torch.Tensor:
        """Engram: (L, B, T, H) global rows; OverEncoding: (B, T, H)."""
        eod = self.config.eod_id
        engram = isinstance(hasher, NgramHasher)
        if cache is None:
            return hasher.hash_all(ids_BT, eod_id=eod, **({"global_rows": True} if engram else {}))
        history = cache.histories.get(key)
        # after the prompt, the ids are the model's own tokens, in range by construction: no range check (a sync)
        kwargs = {"global_rows": True, "check": history is None} if engram else {}
        if history is None:
            history = hasher.init_history(ids_BT.shape[0], ids_BT.device)
        rows, cache.histories[key] = hasher.step(history, ids_BT, eod_id=eod, **kwargs)
        return rows

    # ---- forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        cache: DecodeCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, T, V), mean cross-entropy over targets != -100, or None)."""
        if cache is None or cache.length == 0:  # decode steps feed the model's own tokens
            self._check_ids(input_ids_BT)
        B, T = input_ids_BT.shape
        engram_rows, oe_rows = self.hash_rows(input_ids_BT, cache)
        for layer, rows in engram_rows.items():  # start slow tiers now; layer l waits only for its rows
            self.blocks[layer].engram.memory.prefetch(rows)
        x_BTD = self.embed(input_ids_BT)
        if self.overencoding is not None:
            x_BTD = self.overencoding(x_BTD, oe_rows)
        x_BTMD = x_BTD.unsqueeze(2).expand(B, T, self.config.num_branches, self.config.dim)
        start = cache.length if cache is not None else 0
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        for i, block in enumerate(self.blocks):
            x_BTMD = block(x_BTMD, cos, sin, engram_rows.get(i), cache.layers[i] if cache else None)
        logits_BTV = self.head(self.norm(x_BTMD.sum(dim=2)))
        if targets_BT is None:
            return logits_BTV, None
        logits = logits_BTV if logits_BTV.dtype == torch.float64 else logits_BTV.float()  # fp32 or better
        loss = F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), ignore_index=-100)
        return logits_BTV, loss

    def new_cache(self, batch: int, max_len: int | None = None) -> DecodeCache:
        max_len = max_len or self.config.max_seq_len
        p = self.head.weight
        layers = []
        for block in self.blocks:
            kv = KVCache.empty(batch, self.config.kv_heads, max_len, self.config.head_dim, p.device, p.dtype)
            conv = None
            if block.engram is not None and block.engram.short_conv is not None:
                conv = block.engram.short_conv.init_state(batch, p.device, p.dtype)
            layers.append(LayerCache(kv, conv))
        return DecodeCache(layers)

    @torch.no_grad()
    def update_route_biases(self) -> None:
        for module in self.modules():
            if isinstance(module, MoE):
                module.update_route_bias(self.config.bias_update_rate)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input ids must be an int64 tensor of shape (B, T), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]; "
                "tokenize with the model's tokenizer"
            )
