"""Sensitivity to Engram (paper section 6): zero Engram's output at inference and see what
is kept. Two probes, scored with and without Engram:
- factual recall: "The capital of {country} is" -> " {capital}" (countryinfo facts, which
  the `bible+facts` corpus mixes into training);
- in-context copying: a made-up code word stated in the prompt and asked for at the end,
  so the answer is in the context and memory cannot know it.
Scores: accuracy of the greedy first answer token, and mean log-probability of the answer
tokens. `retained` = score without Engram / score with it (paper: 29-44% of factual
knowledge but 81-93% of reading comprehension kept).
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from engram_lm.analysis.capture import engram_zeroed
from engram_lm.training.corpus import country_capitals

COPY_WORDS = ("amber", "falcon", "cedar", "harbor", "lantern", "meadow", "pebble", "quartz", "saffron", "thistle",
              "velvet", "willow", "cobalt", "ember", "juniper", "marble")  # fmt: skip


def factual_probe() -> list[tuple[str, str]]:
    return [(f"The capital of {country} is", f" {capital}") for country, capital in country_capitals()]


def copy_probe(count: int = 64, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        word = rng.choice(COPY_WORDS)
        name = rng.choice(("Miriam", "Jonah", "Ruth", "Caleb", "Tamar", "Silas"))
        items.append((f"{name} said the secret word is {word}. Then {name} went home. The secret word is", f" {word}"))
    return items


@torch.no_grad()
def score(model, tokenizer, items: list[tuple[str, str]]) -> dict[str, float]:
    correct, logprob, tokens = 0, 0.0, 0
    device = model.head.weight.device
    for prompt, answer in items:
        p = tokenizer.encode(prompt, add_special_tokens=False).ids
        a = tokenizer.encode(prompt + answer, add_special_tokens=False).ids[len(p) :]
        if not a:
            continue
        ids = torch.tensor([p + a], device=device)
        logits, _ = model(ids)
        logp = F.log_softmax(logits[0, len(p) - 1 : -1].double(), dim=-1)
        correct += int(logp[0].argmax() == a[0])
        logprob += float(logp[torch.arange(len(a)), torch.tensor(a)].sum())
        tokens += len(a)
    return {"accuracy": correct / len(items), "mean_logprob": logprob / max(tokens, 1)}


def sensitivity(model, tokenizer) -> dict[str, Any]:
    probes = {"factual": factual_probe(), "copy": copy_probe()}
    out: dict[str, Any] = {}
    for name, items in probes.items():
        full = score(model, tokenizer, items)
        with engram_zeroed(model):
            zeroed = score(model, tokenizer, items)
        retained = zeroed["accuracy"] / full["accuracy"] if full["accuracy"] > 0 else float("nan")
        out[name] = {"items": len(items), "with_engram": full, "engram_zeroed": zeroed, "retained_accuracy": retained}
    return out
