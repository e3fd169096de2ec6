"""Probe documents mixed into a corpus, named in `--data`: `bios:PEOPLE:SEED+CORPUS` (synthetic
biographies, probes/biographies.py; `bios-qa:` adds question-answer documents for half the people), `recall:DOCS:SEED+CORPUS` (in-context recall documents,
probes/recall.py); they compose (`bios:600:0+recall:3000:0+bible`).

Every mix of a spec is placed in one pass over the corpus under them. The held-out split
(training/data.py::is_val_document, every 20th index) keeps exactly the corpus's own held-out
text, the documents it holds without any mix, cut at spaces into as many pieces as the split
has places once the probe documents are in; the probe documents and the corpus's training
documents fill the other places. So held-out loss is measured on the same text with or
without probes, and every probe document is trained on.
"""

from __future__ import annotations

import random
from typing import Callable

MIXES = {"bios": ("PEOPLE", "bios:600:0+bible (600 people, seed 0, mixed into the Bible)"),
         "bios-qa": ("PEOPLE", "bios-qa:600:0+bible (600 people and question-answer documents for half of them)"),
         "recall": ("DOCS", "recall:3000:0+bible (3,000 recall documents, seed 0, mixed into the Bible)")}  # fmt: skip


def is_mix(spec: str) -> bool:
    return spec.split(":", 1)[0] in MIXES and ":" in spec


def parse_mix(spec: str) -> tuple[str, int, int, str]:
    """`KIND:COUNT:SEED+CORPUS` -> (kind, count, seed, corpus)."""
    head, plus, inner = spec.partition("+")
    parts = head.split(":")
    kind = parts[0]
    if kind not in MIXES:
        raise ValueError(f"corpus {spec!r}: unknown mix {kind!r}; known: {sorted(MIXES)}")
    if not plus or not inner or len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
        count, example = MIXES[kind]
        raise ValueError(f"corpus {spec!r}: write {kind}:{count}:SEED+CORPUS, e.g. {example}")
    return kind, int(parts[1]), int(parts[2]), inner


def parse_mixes(spec: str) -> tuple[list[tuple[str, int, int]], str]:
    """Every (kind, count, seed) of a composed spec, outermost first, and the corpus under them."""
    mixes = []
    while is_mix(spec):
        kind, count, seed, spec = parse_mix(spec)
        if any(k == kind for k, _, _ in mixes):
            raise ValueError(f"corpus: two {kind}: mixes in one --data; give each kind once")
        mixes.append((kind, count, seed))
    return mixes, spec


def find_mix(spec: str, kind: str) -> tuple[int, int] | None:
    """(count, seed) of the `kind` mix anywhere in a composed spec, or None."""
    return next(((c, s) for k, c, s in parse_mixes(spec)[0] if k == kind), None)


def base_corpus(spec: str) -> str:
    """The corpus under every mix."""
    return parse_mixes(spec)[1]


def mixed_corpus(spec: str, load: Callable[[str], list[str]], is_val: Callable[[int], bool]) -> list[str]:
    """The documents of a composed spec: the base corpus (`load`) with every mix's documents
    between its training documents (probes/mixes.py's module doc). Recall needles are cut from
    the corpus's training text, never from held-out text."""
    from engram_lm.probes.biographies import biography_documents, people, qa_documents
    from engram_lm.probes.recall import recall_documents

    mixes, inner = parse_mixes(spec)
    bios = [d for kind, count, seed in mixes if kind in ("bios", "bios-qa") for d in biography_documents(people(count, seed), seed)]
    bios += [d for kind, count, seed in mixes if kind == "bios-qa" for d in qa_documents(people(count, seed), seed)]
    if sum(kind.startswith("bios") for kind, _, _ in mixes) > 1:
        raise ValueError(f"corpus {spec!r}: bios and bios-qa in one --data; give one of them")
    recall = next(((count, seed) for kind, count, seed in mixes if kind == "recall"), None)
    train, held = split_for_mix(load(inner), len(bios) + (recall[0] if recall else 0), is_val)
    extra = bios + (recall_documents(recall[0], recall[1], train) if recall else [])
    random.Random(sum(s for _, _, s in mixes) + len(extra)).shuffle(extra)  # the kinds interleave
    return arrange(train, held, extra, is_val)


def split_for_mix(documents: list[str], extra: int, is_val: Callable[[int], bool]) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the corpus's own split (`is_val` over its own
    indices), the held-out documents cut in pieces at spaces until they fill every place the
    split takes once `extra` more documents are in: the held-out text stays what it is without
    the mix."""
    train = [d for j, d in enumerate(documents) if not is_val(j)]
    held = [d for j, d in enumerate(documents) if is_val(j)]
    if not held:
        raise ValueError(f"the corpus has {len(documents)} document(s), none held out (every 20th is): give a larger corpus")
    while sum(is_val(i) for i in range(len(train) + extra + len(held))) > len(held):
        longest = max(range(len(held)), key=lambda i: len(held[i]))
        text = held[longest]
        cut = text.find(" ", len(text) // 2)
        if cut <= 0:
            raise ValueError(f"{extra:,} probe documents need more held-out text to cut into the validation split's "
                             "places: use fewer or a larger corpus")  # fmt: skip
        held[longest : longest + 1] = [text[:cut], text[cut + 1 :]]
    return train, held


def arrange(train: list[str], held: list[str], extra: list[str], is_val: Callable[[int], bool]) -> list[str]:
    """`held` at the validation split's places, `extra` spread evenly over the other places,
    `train` (in order) in the rest."""
    total = len(train) + len(held) + len(extra)
    train_at = [i for i in range(total) if not is_val(i)]
    step = len(train_at) / max(1, len(extra))
    extra_at = {train_at[int(k * step)] for k in range(len(extra))}
    docs, more, out = iter(train), iter(extra), iter(held)
    return [next(out) if is_val(i) else next(more) if i in extra_at else next(docs) for i in range(total)]


def mix_documents(documents: list[str], extra: list[str], is_val: Callable[[int], bool]) -> list[str]:
    """`documents` with `extra` between their training documents, none where `is_val` looks."""
    return arrange(*split_for_mix(documents, len(extra), is_val), extra, is_val)
