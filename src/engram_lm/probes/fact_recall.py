"""What a model trained on a corpus with biographies (`--data bios:PEOPLE:SEED+CORPUS`) knows of
them: per person and attribute, the value's exact recall (every token the argmax) in the first
training template and in a question form training never read, against how many documents
stated it; and the knowledge in bits (probes/biographies.py::knowledge_bits), in all and per
parameter. With Engram, the same with its output zeroed: the share of facts that survive
(the paper: 29-44% of factual knowledge survives, 81-93% of reading comprehension).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from engram_lm.probes.biographies import (ATTRIBUTES, EXPOSURES, QUESTIONS, TRAIN_TEMPLATES, Person, knowledge_bits, people,
                                          qa_people)  # fmt: skip
from engram_lm.probes.mixes import find_mix
from engram_lm.probes.scoring import answer_scores, encode_probe


def fact_probes(tokenizer, persons: list[Person], form: str) -> list:
    """One probe per person and attribute: `form` 'template' (the first training template) or 'question'."""
    templates = {a: (TRAIN_TEMPLATES[a][0] if form == "template" else QUESTIONS[a][0]) for a in ATTRIBUTES}
    return [encode_probe(tokenizer, templates[a].split("{a}")[0].format(n=p.name),
                         templates[a].format(n=p.name, a=p.value(a)).removesuffix(".")) for p in persons for a in ATTRIBUTES]  # fmt: skip


def score_facts(logits_of: Callable[[torch.Tensor], torch.Tensor], tokenizer, persons: list[Person], pad_id: int,
                device: str | torch.device = "cpu", forms: tuple[str, ...] = ("template", "question")) -> dict[str, Any]:  # fmt: skip
    """Recall per form, per exposure count and per attribute; bits from the template form."""
    out: dict[str, Any] = {}
    for form in forms:
        scores = answer_scores(logits_of, fact_probes(tokenizer, persons, form), pad_id, device=device)
        rows = [(p.exposures, a, s) for (p, a), s in zip(((p, a) for p in persons for a in ATTRIBUTES), scores)]
        out[form] = {
            "recall": sum(s[0] for _, _, s in rows) / len(rows),
            "by_exposures": {str(e): _mean([s[0] for x, _, s in rows if x == e]) for e in EXPOSURES},
            "by_attribute": {a: _mean([s[0] for _, y, s in rows if y == a]) for a in ATTRIBUTES},
            "answer_nll": sum(s[1] for _, _, s in rows) / sum(s[2] for _, _, s in rows),
        }
        if form == "template":
            out["bits"] = sum(knowledge_bits(s[1], a) for _, a, s in rows)
            out["bits_by_exposures"] = {str(e): sum(knowledge_bits(s[1], a) for x, a, s in rows if x == e) for e in EXPOSURES}
    return out


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def probe_knowledge(model, tokenizer, corpus: str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """An engram-lm model trained on `corpus` (a bios: corpus): its facts, with Engram and zeroed."""
    from engram_lm.analysis.capture import engram_zeroed
    from engram_lm.models.accounting import count_params

    mix = find_mix(corpus, "bios") or find_mix(corpus, "bios-qa")
    with_qa = find_mix(corpus, "bios-qa") is not None
    if mix is None:
        raise ValueError(f"corpus {corpus!r} holds no biographies; train with --data bios:PEOPLE:SEED+CORPUS (e.g. "
                         "bios:600:0+bible)")  # fmt: skip
    count, seed = mix
    persons = people(count, seed)
    logits_of = lambda x: model(x)[0]  # noqa: E731
    pad = model.config.eod_id if model.config.eod_id is not None else 0
    with torch.no_grad():
        result = {"people": count, "seed": seed, "facts": count * len(ATTRIBUTES), **score_facts(logits_of, tokenizer, persons, pad, device)}
        if with_qa:  # the question form for the people whose answers training never asked: extraction
            asked = set(qa_people(persons))
            held_out = [p for p in persons if p not in asked]
            result["question_held_out_people"] = score_facts(logits_of, tokenizer, held_out, pad, device, ("question",))["question"]
        has_engram = any(b.engram is not None for b in model.blocks)
        if has_engram:
            with engram_zeroed(model):
                result["engram_zeroed"] = score_facts(logits_of, tokenizer, persons, pad, device)
    params = count_params(model)
    result["params"] = params.to_dict()
    result["bits_per_param"] = result["bits"] / params.total  # P_tot: embedding and head excluded, as everywhere here
    if has_engram:
        z = result["engram_zeroed"]["template"]["recall"]
        result["retained_recall"] = z / result["template"]["recall"] if result["template"]["recall"] else None
    return result
