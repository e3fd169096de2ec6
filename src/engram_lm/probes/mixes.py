"""Probe documents mixed into a corpus, named in `--data`: `bios:PEOPLE:SEED+CORPUS` (synthetic
biographies, probes/biographies.py), `recall:DOCS:SEED+CORPUS` (in-context recall documents,
probes/recall.py); they compose (`bios:600:0+recall:4000:0+bible`)."""

from __future__ import annotations

MIXES = {"bios": ("PEOPLE", "bios:600:0+bible (600 people, seed 0, mixed into the Bible)"),
         "recall": ("DOCS", "recall:4000:0+bible (4,000 recall documents, seed 0, mixed into the Bible)")}  # fmt: skip


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


def find_mix(spec: str, kind: str) -> tuple[int, int] | None:
    """(count, seed) of the `kind` mix anywhere in a composed spec, or None."""
    while is_mix(spec):
        found, count, seed, spec = parse_mix(spec)
        if found == kind:
            return count, seed
    return None


def base_corpus(spec: str) -> str:
    """The corpus under every mix."""
    while is_mix(spec):
        spec = parse_mix(spec)[3]
    return spec


def mix_documents(documents: list[str], extra: list[str], is_val) -> list[str]:
    """The corpus's documents in their order with `extra` (biographies, recall documents) spread
    evenly between them, each at an index the validation split does not take (`is_val(index)`):
    the held-out split holds corpus documents only, and every probe document is in training."""
    total = len(documents) + len(extra)
    train_at = [i for i in range(total) if not is_val(i)]
    if len(train_at) < len(extra) or total - len(train_at) > len(documents):
        raise ValueError(f"{len(extra):,} probe documents need more than {len(documents):,} corpus documents to sit "
                         "between (the validation split must take corpus documents only): use fewer or a larger corpus")  # fmt: skip
    step = len(train_at) / max(1, len(extra))
    extra_at = {train_at[int(k * step)]: k for k in range(len(extra))}
    docs = iter(documents)
    return [extra[extra_at[i]] if i in extra_at else next(docs) for i in range(total)]
