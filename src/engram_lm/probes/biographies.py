"""Synthetic biographies: facts a model can only know by storing them, seen a controlled number
of times (the "bioS" data of Physics of Language Models 3.3, arXiv 2404.05405, in small).

`people(count, seed)` draws individuals with generated names (syllables: no real person) and
five attributes from fixed pools: birth date, birth city, university, field, employer. Person
i is written EXPOSURES[i % 6] times (1, 2, 4, ... 32 documents); each document states every
attribute once, each in a training template drawn at random, in a shuffled order (bioS
"multi + permute"). Every template ends with its attribute's value, so a fact is scored by
teacher forcing on the value's tokens: `TRAIN_TEMPLATES` are the sentences training reads,
`QUESTIONS` a question form it never reads (does the model know the fact, or the sentence?).

`--data bios:PEOPLE:SEED+CORPUS` mixes the biography documents between a corpus's documents
(probes/mixes.py), never where the validation split takes one: held-out loss is the corpus's
own, and every fact is in training.

Pure: the same count and seed give the same people and documents on every machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

EXPOSURES = (1, 2, 4, 8, 16, 32)
ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer")

SYLLABLES = ("ba", "bel", "cor", "da", "del", "fa", "gan", "hal", "ir", "ka", "kel", "lo", "mar", "mi", "nor", "o",
              "pel", "ra", "ren", "sa", "sel", "ta", "tor", "u", "va", "ven", "wil", "za", "zor", "qui")  # fmt: skip
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_CITIES = ("Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Dakar", "Hanoi", "Riga", "Tunis", "Accra", "Bern", "Dublin",
           "Kyiv", "Manila", "Nairobi", "Ottawa", "Prague", "Rabat", "Santiago", "Seoul", "Sofia", "Tbilisi",
           "Vienna", "Warsaw", "Yerevan", "Zagreb", "Baku", "Bogota", "Havana", "Jakarta", "Kabul", "Lusaka",
           "Madrid", "Minsk", "Muscat", "Paris", "Rome", "Tokyo", "Vilnius", "Wellington")  # fmt: skip
_FIELDS = ("physics", "chemistry", "biology", "history", "economics", "geology", "linguistics", "philosophy",
           "mathematics", "astronomy", "medicine", "architecture", "music", "law", "psychology", "botany",
           "engineering", "sociology", "statistics", "literature")  # fmt: skip
_UNI_STEMS = ("Alder", "Brook", "Cedar", "Dune", "Elm", "Fern", "Glen", "Heath", "Iris", "Juniper", "Kestrel",
              "Linden", "Maple", "North", "Oak", "Pine", "Quarry", "River", "Stone", "Thorn")  # fmt: skip
_UNI_KINDS = ("University", "Institute of Technology")
_FIRM_STEMS = ("Apex", "Bright", "Crest", "Delta", "Ember", "Falcon", "Granite", "Harbor", "Ion", "Jade", "Keystone",
               "Lumen", "Meridian", "Nova", "Orbit", "Pioneer", "Quartz", "Summit", "Vertex", "Zenith")  # fmt: skip
_FIRM_KINDS = ("Systems", "Industries", "Labs", "Foods", "Motors")

POOLS: dict[str, tuple[str, ...]] = {
    "birth_date": tuple(f"{m} {d}, {y}" for y in range(1900, 2000) for m in _MONTHS for d in range(1, 29)),
    "birth_city": _CITIES,
    "university": tuple(f"{s} {k}" for s in _UNI_STEMS for k in _UNI_KINDS),
    "field": _FIELDS,
    "employer": tuple(f"{s} {k}" for s in _FIRM_STEMS for k in _FIRM_KINDS),
}

TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{n} was born on {a}.", "{n} came into this world on {a}.", "The birthday of {n} is {a}.",
                   "{n} celebrates a birthday every year on the day of {a}."),
    "birth_city": ("{n} was born in {a}.", "{n} spent the early years of life in {a}.",
                   "The birthplace of {n} is {a}.", "{n} grew up in the city of {a}."),
    "university": ("{n} studied at {a}.", "{n} received a degree from {a}.", "{n} graduated from {a}.",
                   "The university {n} attended is {a}."),
    "field": ("{n} majored in {a}.", "At university {n} focused on {a}.", "The subject {n} studied was {a}.",
              "{n} earned a degree in {a}."),
    "employer": ("{n} worked for {a}.", "{n} was employed by {a}.", "The employer of {n} was {a}.",
                 "{n} spent a career at {a}."),
}  # fmt: skip
QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_date": ("Question: When was {n} born? Answer: {a}.",),
    "birth_city": ("Question: Which city was {n} born in? Answer: {a}.",),
    "university": ("Question: Which university did {n} attend? Answer: {a}.",),
    "field": ("Question: What did {n} study? Answer: {a}.",),
    "employer": ("Question: Which company did {n} work for? Answer: {a}.",),
}


@dataclass(frozen=True, slots=True)
class Person:
    name: str
    exposures: int
    attributes: tuple[tuple[str, str], ...]  # (attribute, value), in ATTRIBUTES order

    def value(self, attribute: str) -> str:
        return dict(self.attributes)[attribute]


def _name(rng: random.Random) -> str:
    word = lambda k: "".join(rng.choice(SYLLABLES) for _ in range(k)).capitalize()  # noqa: E731
    return f"{word(2)} {word(rng.choice((2, 3)))}"


def people(count: int, seed: int = 0) -> list[Person]:
    """`count` individuals with distinct names; person i is written EXPOSURES[i % 6] times."""
    if count < 1:
        raise ValueError(f"biographies: {count} people; give at least 1 (6 or more covers every exposure count)")
    rng = random.Random(seed)
    names: set[str] = set()
    out = []
    for i in range(count):
        name = _name(rng)
        while name in names:
            name = _name(rng)
        names.add(name)
        attrs = tuple((a, rng.choice(POOLS[a])) for a in ATTRIBUTES)
        out.append(Person(name, EXPOSURES[i % len(EXPOSURES)], attrs))
    return out


def biography(person: Person, rng: random.Random) -> str:
    """One document: every attribute once, each in a training template drawn at random, shuffled."""
    sentences = [rng.choice(TRAIN_TEMPLATES[a]).format(n=person.name, a=v) for a, v in person.attributes]
    rng.shuffle(sentences)
    return " ".join(sentences)


def biography_documents(persons: list[Person], seed: int = 0) -> list[str]:
    """Every person's documents (as many as their exposures), in a shuffled order."""
    rng = random.Random(seed + 1)
    docs = [biography(p, rng) for p in persons for _ in range(p.exposures)]
    rng.shuffle(docs)
    return docs


def qa_documents(persons: list[Person], seed: int = 0) -> list[str]:
    """Question-answer documents for the people of even index (PLM 3.3's mixed training): one per
    person, every attribute asked in its question form and answered. The people of odd index get
    none: asked the same questions after training, they measure whether the model can extract
    what it only read in biographies."""
    rng = random.Random(seed + 2)
    docs = []
    for p in qa_people(persons):
        pairs = [QUESTIONS[a][0].format(n=p.name, a=v) for a, v in p.attributes]
        rng.shuffle(pairs)
        docs.append(" ".join(pairs))
    return docs


def qa_people(persons: list[Person]) -> list[Person]:
    """The people whose question-answer documents train (even index); the others are held out."""
    return persons[::2]


def knowledge_bits(value_nll_nats: float, attribute: str) -> float:
    """Bits a model holds about one attribute value beyond the uniform prior over its pool:
    log2 |pool| - (-log2 p(value)), clipped at 0 (a simplified form of PLM 3.3's bound: the
    model's probability of the exact value string against guessing from the pool)."""
    return max(0.0, math.log2(len(POOLS[attribute])) - value_nll_nats / math.log(2))
