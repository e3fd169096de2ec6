"""Byte-level BPE tokenizers trained on a corpus with HF `tokenizers`, cached by content.

CPU presets use a small vocabulary (e.g. 4096) so the softmax stays cheap. Id 0 is the
end-of-document token `<|endoftext|>`. The trained file is cached under
$ENGRAM_CACHE_DIR/bpe/<corpus digest>-<vocab>.json, so the same corpus and size always
give the same tokenizer (training is deterministic).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_lm.tokenizer.cache import default_cache_dir

EOD_TOKEN = "<|endoftext|>"


def train_bpe(documents: Sequence[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 300:
        raise ValueError(f"BPE vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
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
