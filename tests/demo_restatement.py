"""An independent restatement of the reference demo's Engram layer, for tests only.

Written from ENGRAM_SPEC s.3-5 with the demo's module and parameter names, per-branch
loops and stock torch.nn layers, so its state_dict is what the demo would save.
"""

import math

import numpy as np
import torch
from torch import nn

from engram_lm.hashing.reference import reference_hash


class DemoShortConv(nn.Module):
    def __init__(self, hidden, kernel, dilation, hc_mult):
        super().__init__()
        channels = hidden * hc_mult
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=False,
                              padding=(kernel - 1) * dilation, dilation=dilation)  # fmt: skip
        self.norms = nn.ModuleList([nn.RMSNorm(hidden, eps=1e-5) for _ in range(hc_mult)])

    def forward(self, x):
        B, T, G, C = x.shape
        xn = torch.cat([self.norms[i](x[:, :, i, :]) for i in range(G)], dim=-1)
        y = self.conv(xn.transpose(1, 2))[..., :T]
        return nn.functional.silu(y).transpose(1, 2).reshape(B, T, G, C)


class DemoMultiHeadEmbedding(nn.Module):
    def __init__(self, sizes, dim):
        super().__init__()
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(sizes[:-1]).tolist()], dtype=torch.long))
        self.embedding = nn.Embedding(sum(sizes), dim)

    def forward(self, ids):
        return self.embedding(ids + self.offsets)


class DemoEngram(nn.Module):
    def __init__(self, layout, projection, layer_id, n_embed_per_ngram, hidden, hc_mult, kernel):
        super().__init__()
        self.layout, self.projection, self.layer_id = layout, projection, layer_id
        self.hidden, self.hc_mult = hidden, hc_mult
        layer = layout.layer(layer_id)
        d_mem = (layout.max_ngram - 1) * n_embed_per_ngram
        self.multi_head_embedding = DemoMultiHeadEmbedding(list(layer.head_sizes), n_embed_per_ngram // layout.num_heads)
        self.short_conv = DemoShortConv(hidden, kernel, layout.max_ngram, hc_mult)
        self.value_proj = nn.Linear(d_mem, hidden)
        self.key_projs = nn.ModuleList([nn.Linear(d_mem, hidden) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden) for _ in range(hc_mult)])

    def forward(self, hidden_states, input_ids):
        hashes = reference_hash(np.asarray(input_ids), self.layout, self.projection)[self.layer_id]
        e = self.multi_head_embedding(torch.from_numpy(hashes)).flatten(start_dim=-2)
        gates = []
        for m in range(self.hc_mult):
            k = self.norm1[m](self.key_projs[m](e))
            q = self.norm2[m](hidden_states[:, :, m, :])
            s = (k * q).sum(-1) / math.sqrt(self.hidden)
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
            gates.append(s.sigmoid().unsqueeze(-1))
        value = torch.stack(gates, dim=2) * self.value_proj(e).unsqueeze(2)
        return value + self.short_conv(value)
