"""Knowledge injection: facts a base model never saw (countries from PyPI `countryinfo`),
written as sentences with several templates per relation, and how many of them a model
completes.

Each relation has TRAIN templates (the sentences a fine-tune reads) and HELD_OUT templates
(paraphrases it never reads). Every template ends with the answer then a full stop, so a
causal model is scored by teacher forcing: a fact counts as known when every token of its
answer is the model's argmax given the sentence before it. The mean negative log-likelihood
of the answer tokens is kept too (it moves before exact answers do).
"""

from __future__ import annotations

import importlib.resources
import json
import random
from dataclasses import dataclass

import numpy as np

from engram_lm.probes.scoring import Probe, answer_scores, encode_probe

TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {c} is {a}.", "The government of {c} sits in its capital, {a}.",
                "If you fly to the capital of {c}, you land in {a}.", "The capital city of {c} is called {a}."),
    "region": ("{c} is a country in {a}.", "On a map of the world, {c} lies in {a}.",
               "The region of the world where {c} is found is {a}.", "Geographers place {c} in {a}."),
    "demonym": ("People from {c} are called {a}.", "A citizen of {c} is described as {a}.",
                "Someone born in {c} is {a}.", "The people of {c} call themselves {a}."),
    "population": ("The population of {c} is about {a}.", "The number of people living in {c} is about {a}.",
                   "Counted in millions, the people of {c} number {a}.", "A recent count put the population of {c} at {a}."),
}  # fmt: skip
HELD_OUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("Ask anyone in {c} where the capital is and they will say {a}.",
                "Of all the cities of {c}, the capital is {a}."),
    "region": ("If you look for {c} on a globe, you find it in {a}.",
               "{c} belongs to the part of the world called {a}."),
    "demonym": ("A person who grew up in {c} would say they are {a}.", "The word for the people of {c} is {a}."),
    "population": ("How many people live in {c}? About {a}.", "A census of {c} would find about {a}."),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Fact:
    country: str
    relation: str
    answer: str


def country_facts(min_population: int = 1_000_000) -> list[Fact]:
    """Capital, subregion, demonym and population (in millions) of every country in
    `countryinfo` that has all four and at least `min_population` people, sorted."""
    try:
        folder = importlib.resources.files("countryinfo") / "data"
    except ModuleNotFoundError as exc:
        raise ValueError("the facts need the PyPI package countryinfo: pip install countryinfo") from exc
    facts: set[Fact] = set()
    for entry in folder.iterdir():
        if not entry.name.endswith(".json"):
            continue
        r = json.loads(entry.read_text(encoding="utf-8"))
        capital = r.get("capital")
        capital = capital[0] if isinstance(capital, list) and capital else capital
        answers = {"capital": capital, "region": r.get("subregion"), "demonym": r.get("demonym"),
                   "population": f"{round(r['population'] / 1e6)} million" if isinstance(r.get("population"), int) else None}  # fmt: skip
        if not r.get("name") or not all(isinstance(a, str) and a.strip() for a in answers.values()):
            continue
        if r["population"] < min_population:
            continue
        facts.update(Fact(r["name"], rel, a.strip()) for rel, a in answers.items())
    return sorted(facts, key=lambda f: (f.country, f.relation))


def fact_documents(facts: list[Fact], seed: int = 0) -> list[str]:
    """One document per country: each of its facts in every training template, in an order
    shuffled once (by `seed`) so that no relation always comes first."""
    by_country: dict[str, list[str]] = {}
    for f in facts:
        by_country.setdefault(f.country, []).extend(t.format(c=f.country, a=f.answer) for t in TRAIN_TEMPLATES[f.relation])
    rng = random.Random(seed)
    docs = []
    for country in sorted(by_country):
        sentences = by_country[country]
        rng.shuffle(sentences)
        docs.append(" ".join(sentences))
    return docs


def fact_tokens(tokenizer, facts: list[Fact], eod_id: int) -> np.ndarray:
    """The fact documents as one token stream, each document followed by the end-of-document id."""
    ids: list[int] = []
    for doc in fact_documents(facts):
        ids += tokenizer.encode(doc, add_special_tokens=False).ids + [eod_id]
    return np.asarray(ids, dtype=np.int64)


def probes(tokenizer, facts: list[Fact], templates: dict[str, tuple[str, ...]]) -> list[Probe]:
    """One probe per fact and template: the sentence's tokens up to the answer's end, and where
    the answer starts (probes/scoring.py::encode_probe; a template that merges tokens across the
    answer's boundary is refused)."""
    return [encode_probe(tokenizer, t.split("{a}")[0].format(c=f.country), t.format(c=f.country, a=f.answer).removesuffix("."))
            for f in facts for t in templates[f.relation]]  # fmt: skip


def score_probes(model, probe_list: list[Probe], pad_id: int, batch: int = 128, device: str = "cpu") -> dict[str, float]:
    """accuracy: the share of probes whose every answer token is the argmax; answer_nll: the
    mean negative log-likelihood per answer token (a Hugging Face causal LM)."""
    was = model.training
    model.eval()
    scores = answer_scores(lambda x: model(input_ids=x, use_cache=False).logits, probe_list, pad_id, batch, device)
    model.train(was)
    return {"accuracy": sum(s[0] for s in scores) / len(scores), "answer_nll": sum(s[1] for s in scores) / sum(s[2] for s in scores)}
