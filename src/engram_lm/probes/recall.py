"""In-context recall: answers that are only in the context, never in the weights.

- Multi-query associative recall (MQAR, Zoology, arXiv 2312.04927), in words: a list of
  key-value pairs ("Pairs: kelmar 42; tosa 17; ...") then every key again, shuffled, each to be
  completed with its value ("Recall: tosa 17; kelmar 42."). A fresh draw of keys and values per
  document, so nothing can be memorised; accuracy by the number of pairs and by the distance
  (tokens) from a pair to its query.
- Needle in a haystack: one sentence ("The code word of kelmar is 4821.") inside corpus text at
  a random depth, the question at the end ("The code word of kelmar is"); accuracy by distance.

`recall_documents(count, seed, filler)` writes training documents of both kinds (the model
learns the formats); `--data recall:DOCS:SEED+CORPUS` mixes them into a corpus like the
biographies (none in its validation split), and `score_recall` scores fresh instances drawn
from another seed, sized to the model's context.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from engram_lm.probes.biographies import SYLLABLES
from engram_lm.probes.mixes import find_mix
from engram_lm.probes.scoring import Probe, answer_scores

PAIRS = (2, 4, 8, 16)
DEPTHS = (0.1, 0.5, 0.9)
HELD_OUT_SEED = 1_000_003  # instances scored are drawn from this seed plus the run's: never trained on


def _key(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))


def mqar(rng: random.Random, pairs: int) -> tuple[str, list[tuple[str, str, str]]]:
    """(the text up to the recall list, [(query text before the value, value, key)] in query order)."""
    keys: list[str] = []
    while len(keys) < pairs:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    values = [str(rng.randrange(10, 100)) for _ in keys]
    text = "Pairs: " + "; ".join(f"{k} {v}" for k, v in zip(keys, values)) + ". Recall:"
    order = list(range(pairs))
    rng.shuffle(order)
    return text, [(keys[i], values[i], keys[i]) for i in order]


def mqar_text(rng: random.Random, pairs: int) -> str:
    head, queries = mqar(rng, pairs)
    return head + " " + "; ".join(f"{k} {v}" for k, v, _ in queries) + "."


def needle(rng: random.Random, filler: str, depth: float) -> tuple[str, str, str]:
    """(the text up to the question's end, the value, the key): the needle at `depth` of `filler`."""
    key, value = _key(rng), str(rng.randrange(1000, 10000))
    words = filler.split()
    at = int(depth * len(words))
    text = " ".join(words[:at] + [f"The code word of {key} is {value}."] + words[at:])
    return f"{text} The code word of {key} is", value, key


def recall_documents(count: int, seed: int, filler: list[str], max_words: int = 60) -> list[str]:
    """`count` training documents, alternately MQAR (2-16 pairs) and a needle in up to
    `max_words` words of `filler` text, each with its answers written out."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        if i % 2 == 0:
            docs.append(mqar_text(rng, rng.choice(PAIRS)))
        else:
            text, value, _ = needle(rng, _excerpt(rng, filler, max_words), rng.random())
            docs.append(f"{text} {value}.")
    return docs


def _excerpt(rng: random.Random, filler: list[str], max_words: int) -> str:
    words = rng.choice(filler).split() if filler else []
    start = rng.randrange(max(1, len(words) - max_words))
    return " ".join(words[start : start + rng.randrange(max_words // 4, max_words + 1)])


def recall_probes(tokenizer, seed: int, filler: list[str], max_tokens: int, per_cell: int = 32) -> list[tuple[dict[str, Any], Probe]]:
    """Held-out instances that fit `max_tokens`: each query of `per_cell` MQAR documents per
    number of pairs, and `per_cell` needles per depth (0.1, 0.5, 0.9) in a filler that fills the
    context; each with what it is ({"kind", "pairs" or "depth", "distance" in tokens})."""
    rng = random.Random(HELD_OUT_SEED + seed)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    out: list[tuple[dict[str, Any], Probe]] = []
    for pairs in PAIRS:
        for _ in range(per_cell):
            head, queries = mqar(rng, pairs)
            text = head
            for key, value, _ in queries:
                before = encode(text + " " + key)
                sentence = encode(text + " " + key + " " + value)
                pair_at = len(encode(head.split(f" {key} ")[0])) if f" {key} " in head else 0
                if len(sentence) <= max_tokens and sentence[: len(before)] == before:
                    out.append(({"kind": "mqar", "pairs": pairs, "distance": len(before) - pair_at},
                                Probe(sentence, len(before))))  # fmt: skip
                text += f" {key} {value};"
    for depth in DEPTHS:
        for _ in range(per_cell):
            words = max_tokens // 2
            text, value, key = needle(rng, _excerpt(rng, filler, words), depth)
            before, sentence = encode(text), encode(f"{text} {value}")
            while len(sentence) > max_tokens and words > 8:  # fill the context, no more
                words = int(words * 0.8)
                text, value, key = needle(rng, _excerpt(rng, filler, words), depth)
                before, sentence = encode(text), encode(f"{text} {value}")
            if len(sentence) <= max_tokens and sentence[: len(before)] == before:
                at = len(encode(text.split(f"The code word of {key} is {value}.")[0]))
                out.append(({"kind": "needle", "depth": depth, "distance": len(before) - at}, Probe(sentence, len(before))))
    return out


def score_recall(logits_of: Callable[[torch.Tensor], torch.Tensor], probes: list[tuple[dict[str, Any], Probe]],
                 pad_id: int, device: str | torch.device = "cpu") -> dict[str, Any]:  # fmt: skip
    """Accuracy (every value token the argmax) by kind, by pairs or depth, and by distance in tokens."""
    scores = answer_scores(logits_of, [p for _, p in probes], pad_id, batch=32, device=device)
    rows = [(meta, s[0]) for (meta, _), s in zip(probes, scores)]
    mqar_rows = [(m, ok) for m, ok in rows if m["kind"] == "mqar"]
    needle_rows = [(m, ok) for m, ok in rows if m["kind"] == "needle"]
    return {
        "mqar": {"accuracy": _mean(mqar_rows), "queries": len(mqar_rows), "by_distance": _by_distance(mqar_rows),
                 "by_pairs": {str(n): _mean([r for r in mqar_rows if r[0]["pairs"] == n]) for n in PAIRS}},
        "needle": {"accuracy": _mean(needle_rows), "probes": len(needle_rows), "by_distance": _by_distance(needle_rows),
                   "by_depth": {str(d): _mean([r for r in needle_rows if r[0]["depth"] == d]) for d in DEPTHS}},
    }  # fmt: skip


def _mean(rows: list[tuple[dict[str, Any], bool]]) -> float | None:
    return sum(ok for _, ok in rows) / len(rows) if rows else None


def _by_distance(rows: list[tuple[dict[str, Any], bool]]) -> dict[str, float | None]:
    """Accuracy in distance bins of tokens (0-16, 16-32, 32-64, ...), the bins that hold a probe."""
    edges = (0, 16, 32, 64, 128, 256, 512, 1 << 30)
    cells = {f"{lo}-{hi}": [r for r in rows if lo <= r[0]["distance"] < hi] for lo, hi in zip(edges, edges[1:])}
    return {k: _mean(v) for k, v in cells.items() if v}


def probe_recall(model, tokenizer, corpus: str, context: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """An engram-lm model's in-context recall on fresh instances of `context` tokens at most, its
    needles in held-out text of its own corpus; `trained_on_format` says whether its corpus held
    recall documents (without them a model has never seen the format: expect zero)."""
    from engram_lm.training.corpus import held_out_documents

    mix = find_mix(corpus, "recall")
    seed = mix[1] if mix else 0
    probes = recall_probes(tokenizer, seed, held_out_documents(corpus), context)
    pad = model.config.eod_id if model.config.eod_id is not None else 0
    with torch.no_grad():
        result = score_recall(lambda x: model(x)[0], probes, pad, device)
    return {"trained_on_format": mix is not None, "context": context, **result}
