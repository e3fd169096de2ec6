"""Byte-level BPE tokenizers trained on a corpus with HF `tokenizers`, cached by content.

CPU presets use a small vocabulary (e.g. 4096) so the softmax stays cheap. Id 0 is the
end-of-document token `<|endoftext|>`. The trained file is cached under
$ENGRAM_CACHE_DIR/bpe/<corpus digest>-<vocab>.json, so the same corpus and size always
give the same tokenizer (training is deterministic).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_lm.tokenizer.cache import default_cache_dir

EOD_TOKEN = "<|endoftext|>"
MAX_WORD_CHARS = 256  # longer runs without whitespace are cut into pieces of this length


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Byte-level pre-tokenization, with any run of MAX_WORD_CHARS non-space characters cut
    off first: BPE training is quadratic in the length of a "word", and one 5 MB line
    without whitespace would otherwise take an hour. Text without such runs (every natural
    corpus we ship) pre-tokenizes exactly as plain ByteLevel does."""
    cut = pre_tokenizers.Split(Regex(rf"\S{{{MAX_WORD_CHARS}}}"), behavior="isolated")
    return pre_tokenizers.Sequence([cut, pre_tokenizers.ByteLevel(add_prefix_space=False)])


def train_bpe(documents: Sequence[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 300:
        raise ValueError(f"BPE vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    t0 = time.time()
    megabytes = sum(len(d) for d in documents) / 1e6
    print(f"training a {vocab_size}-token BPE on {len(documents):,} documents ({megabytes:,.1f} MB)...",
          file=sys.stderr, flush=True)  # fmt: skip
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    print(f"BPE trained in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return tok


def cached_bpe(documents: Sequence[str], vocab_size: int, corpus_digest: str, cache_dir: Path | None = None) -> Path:
    """Path of a BPE tokenizer.json for this corpus and size, training it on first use."""
    path = (cache_dir or default_cache_dir()) / "bpe" / f"{corpus_digest[:24]}-{vocab_size}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tok = train_bpe(documents, vocab_size)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, path)
    return path
