"""Scoring a stated fact by teacher forcing: a sentence ends with its answer, and the model is
right when every token of the answer is its argmax given the sentence before it.

Model-agnostic: `logits_of(ids (B, T)) -> logits (B, T, V)` is any causal model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class Probe:
    ids: list[int]  # the sentence up to and including its answer
    answer_start: int  # index in ids of the answer's first token


def encode_probe(tokenizer, head: str, sentence: str) -> Probe:
    """`head`: the sentence before its answer; `sentence`: the whole of it, answer last. A head
    whose tokens are not a prefix of the sentence's (a merge across the answer's boundary)
    cannot be scored this way and is refused."""
    prefix = tokenizer.encode(head.rstrip(" "), add_special_tokens=False).ids
    full = tokenizer.encode(sentence, add_special_tokens=False).ids
    if full[: len(prefix)] != prefix or len(full) == len(prefix):
        raise ValueError(f"{sentence!r}: its answer does not tokenize apart from the words before it")
    return Probe(full, len(prefix))


@torch.no_grad()
def answer_scores(logits_of: Callable[[torch.Tensor], torch.Tensor], probes: list[Probe], pad_id: int,
                  batch: int = 128, device: str | torch.device = "cpu") -> list[tuple[bool, float, int]]:  # fmt: skip
    """Per probe: (every answer token is the argmax, the answer's summed negative log-likelihood in
    nats, its token count). Right padding leaves a causal model's real positions unchanged."""
    out = []
    for i in range(0, len(probes), batch):
        chunk = probes[i : i + batch]
        x = torch.full((len(chunk), max(len(p.ids) for p in chunk)), pad_id, dtype=torch.long)
        for row, p in enumerate(chunk):
            x[row, : len(p.ids)] = torch.tensor(p.ids)
        logp = F.log_softmax(logits_of(x.to(device)).float(), dim=-1).cpu()
        for row, p in enumerate(chunk):
            pos = torch.arange(p.answer_start, len(p.ids))
            target, pred = x[row, pos], logp[row, pos - 1]
            out.append((bool((pred.argmax(-1) == target).all()), -float(pred.gather(1, target[:, None]).sum()), len(pos)))
    return out
