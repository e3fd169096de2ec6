"""Sensitivity to Engram (paper section 6): zero Engram's output at inference and see what
is kept. Two probes, scored with and without Engram:
- factual recall: "The capital of {country} is" -> " {capital}" (countryinfo facts, which
  the `bible+facts` corpus mixes into training);
- in-context copying: a made-up code word stated in the prompt and asked for at the end,
  so the answer is in the context and memory cannot know it.
Scores: accuracy of the greedy first answer token, and mean log-probability of the answer
tokens. `retained` = score without Engram / score with it (paper: 29-44% of factual
knowledge but 81-93% of reading comprehension kept).

A laptop-scale model recalls almost none of those facts, so `class_sensitivity` asks the
same question of running text: on held-out windows, the next tokens it could copy from
the context vs those only the training data's n-gram statistics give (token_classes.py).
"""

from __future__ import annotations

import contextlib
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


@torch.no_grad()
def class_sensitivity(model, windows: list[torch.Tensor], stats, **class_options: Any) -> dict[str, dict[str, float]]:
    """Top-1 accuracy and mean loss per token class ("copyable", "recallable", "all") with
    Engram and with its output zeroed; windows are (B, T+1) id tensors. `retained_accuracy`
    = accuracy zeroed / accuracy with Engram."""
    from engram_lm.analysis.token_classes import token_classes

    was_training = model.training
    model.eval()
    device = model.head.weight.device
    sums: dict[str, dict[str, float]] = {}
    for w_BT1 in windows:
        masks = [token_classes(w, stats, **class_options) for w in w_BT1]
        scored = {}
        for mode in ("with_engram", "engram_zeroed"):
            ctx = engram_zeroed(model) if mode == "engram_zeroed" else contextlib.nullcontext()
            with ctx:
                logits, _ = model(w_BT1[:, :-1].to(device))
            logp = F.log_softmax(logits.double(), dim=-1).cpu()
            target = w_BT1[:, 1:]
            scored[mode] = (logp.argmax(-1) == target, logp.gather(-1, target[..., None])[..., 0])
        for name in ("copyable", "recallable", "all"):
            mask = torch.stack([m[name] for m in masks]) if name != "all" else torch.ones_like(target, dtype=torch.bool)
            acc = sums.setdefault(name, {"tokens": 0.0, "with_engram": 0.0, "engram_zeroed": 0.0,
                                         "loss_with_engram": 0.0, "loss_engram_zeroed": 0.0})  # fmt: skip
            acc["tokens"] += float(mask.sum())
            for mode, (correct, lp) in scored.items():
                acc[mode] += float(correct[mask].sum())
                acc[f"loss_{mode}"] -= float(lp[mask].sum())
    model.train(was_training)
    out = {}
    for name, acc in sums.items():
        n = max(acc["tokens"], 1.0)
        with_e, zeroed = acc["with_engram"] / n, acc["engram_zeroed"] / n
        out[name] = {"tokens": int(acc["tokens"]), "accuracy_with_engram": with_e, "accuracy_engram_zeroed": zeroed,
                     "retained_accuracy": zeroed / with_e if with_e > 0 else float("nan"),
                     "loss_with_engram": acc["loss_with_engram"] / n, "loss_engram_zeroed": acc["loss_engram_zeroed"] / n}  # fmt: skip
    return out
