"""engram-lm: Engram conditional memory (hashed N-gram lookup) for PyTorch language models.

The names below are imported on first use (PEP 562), so `import engram_lm` and the
`engram` command's --help do not pay for importing PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EngramConfig": "engram_lm.config",
    "Engram": "engram_lm.engram.module",
    "NgramHasher": "engram_lm.hashing.hasher",
    "NgramHistory": "engram_lm.hashing.hasher",
    "HashLayout": "engram_lm.hashing.layout",
    "build_layout": "engram_lm.hashing.layout",
    "get_preset": "engram_lm.presets",
    "load_projection": "engram_lm.tokenizer.cache",
    "VocabProjection": "engram_lm.tokenizer.compression",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engram_lm' has no attribute {name!r}")
