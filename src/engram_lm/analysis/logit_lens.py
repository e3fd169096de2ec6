"""LogitLens: how close each layer's early-exit prediction is to the final one.

Each block's output goes through the model's own final norm and head; the KL divergence
KL(p_final || p_layer) per token, averaged, measures how "finished" the prediction is at
that depth. A model whose early layers already predict well (Engram, per the paper) has a
curve that falls faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram_lm.analysis.capture import capture


def kl_to_final(logits_final: torch.Tensor, logits_layer: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(final) || softmax(layer)), in nats."""
    p_log = F.log_softmax(logits_final.double(), dim=-1)
    q_log = F.log_softmax(logits_layer.double(), dim=-1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


@torch.no_grad()
def logit_lens(model, ids_BT: torch.Tensor) -> list[float]:
    """KL to the final distribution after every block (the last one is 0)."""
    with capture(model) as cap:
        final, _ = model(ids_BT)
    return [kl_to_final(final, model.head(model.norm(h))) for h in cap.block_outputs]
