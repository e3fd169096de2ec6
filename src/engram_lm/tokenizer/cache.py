"""Load a vocabulary projection, building it once per tokenizer file and caching it.

Building P decodes and normalises every raw id (~1 s for a 128k vocabulary). The cache
key is the sha256 of the tokenizer file's bytes plus the versions of this algorithm and
of `tokenizers` (whose Unicode tables drive normalisation), so a changed file or library
never reuses a stale map. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import tokenizers

from engram_lm.tokenizer.compression import VocabProjection
from engram_lm.tokenizer.sources import load_tokenizer, resolve_tokenizer

ALGORITHM_VERSION = 1


def default_cache_dir() -> Path:
    if "ENGRAM_CACHE_DIR" in os.environ:
        return Path(os.environ["ENGRAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engram_lm"


def load_projection(tokenizer: str, cache_dir: Path | None = None) -> VocabProjection:
    """`tokenizer` is a built-in name, a tokenizer.json path, or 'identity:V' (no compression)."""
    if tokenizer.startswith("identity:"):
        size = tokenizer.split(":", 1)[1]
        if not size.isdigit():
            raise ValueError(f"bad tokenizer {tokenizer!r}: write identity:V with V the vocabulary size")
        return VocabProjection.identity(int(size))
    source = resolve_tokenizer(tokenizer)
    cache_file = (cache_dir or default_cache_dir()) / "compression" / f"{_cache_key(source.path)}.json"
    cached = _read(cache_file, source.name)
    if cached is not None:
        return cached
    projection = VocabProjection.from_tokenizer(load_tokenizer(source), source.name)
    _write(cache_file, projection)
    return projection


def _cache_key(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(f"|algo={ALGORITHM_VERSION}|tokenizers={tokenizers.__version__}".encode())
    return h.hexdigest()[:32]


def _read(cache_file: Path, source: str) -> VocabProjection | None:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        lookup = np.asarray(data["lookup"], dtype=np.int64)
        keys = tuple(data["keys"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged cache: rebuild
    if lookup.ndim != 1 or (lookup.size and (lookup.min() < 0 or lookup.max() >= len(keys))):
        return None
    return VocabProjection(lookup=lookup, keys=keys, source=source)


def _write(cache_file: Path, projection: VocabProjection) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"lookup": projection.lookup.tolist(), "keys": list(projection.keys)})
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache directory only costs the rebuild next time
