"""engram-lm: Engram conditional memory (hashed N-gram lookup) for PyTorch language models."""

from engram_lm.config import EngramConfig
from engram_lm.engram.module import Engram
from engram_lm.hashing.hasher import NgramHasher, NgramHistory
from engram_lm.hashing.layout import HashLayout, build_layout
from engram_lm.presets import get_preset
from engram_lm.tokenizer.cache import load_projection
from engram_lm.tokenizer.compression import VocabProjection

__version__ = "0.1.0"

__all__ = [
    "Engram",
    "EngramConfig",
    "HashLayout",
    "NgramHasher",
    "NgramHistory",
    "VocabProjection",
    "build_layout",
    "get_preset",
    "load_projection",
]
