from engram_lm.tokenizer.cache import load_projection
from engram_lm.tokenizer.compression import VocabProjection, canonical_key
from engram_lm.tokenizer.sources import BUILTIN_TOKENIZERS, TokenizerSource, load_tokenizer, resolve_tokenizer

__all__ = [
    "BUILTIN_TOKENIZERS",
    "TokenizerSource",
    "VocabProjection",
    "canonical_key",
    "load_projection",
    "load_tokenizer",
    "resolve_tokenizer",
]
