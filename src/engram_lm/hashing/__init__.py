from engram_lm.hashing.hasher import NgramHasher, NgramHistory
from engram_lm.hashing.layout import HashLayout, LayerLayout, build_layout
from engram_lm.hashing.ngram import hash_ngrams, ngram_window_start, suffix_ngram_ids

__all__ = [
    "HashLayout",
    "LayerLayout",
    "NgramHasher",
    "NgramHistory",
    "build_layout",
    "hash_ngrams",
    "ngram_window_start",
    "suffix_ngram_ids",
]
