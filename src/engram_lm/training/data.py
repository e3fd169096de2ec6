"""Tokenised training data: memory-mapped token streams, a fixed validation split, batches.

A corpus is tokenised once into `train.bin` / `val.bin` (uint16 or uint32) under
$ENGRAM_CACHE_DIR/tokens/<corpus digest>-<tokenizer digest>/, every document followed by
the end-of-document token (which Engram hashing respects). Document i goes to validation
when i % 20 == 10: a fixed ~5% held out across the whole corpus. Training batches are
random windows drawn from a generator seeded by (seed, step, micro-batch, rank), so the
data order is deterministic and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from engram_lm.tokenizer.bpe import EOD_TOKEN, cached_bpe
from engram_lm.tokenizer.cache import default_cache_dir
from engram_lm.tokenizer.sources import load_tokenizer, resolve_tokenizer
from engram_lm.training.corpus import corpus_digest, load_corpus

VAL_EVERY, VAL_OFFSET = 20, 10
_EOD_CANDIDATES = (EOD_TOKEN, "<｜end▁of▁sentence｜>", "</s>", "<eos>")


@dataclass(frozen=True)
class TokenData:
    train: np.ndarray
    val: np.ndarray
    tokenizer_path: Path
    vocab_size: int
    eod_id: int
    corpus: str
    corpus_digest: str = ""  # sha256 over the corpus documents (training/corpus.py)

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))


def is_val_document(index: int) -> bool:
    return index % VAL_EVERY == VAL_OFFSET


def tokenizer_for(tokenizer_spec: str, train_docs: list[str], digest: str) -> Path:
    """'bpe:V' trains (or reuses) a byte-level BPE on the training documents; anything
    else is a built-in tokenizer name or a tokenizer.json path."""
    if tokenizer_spec.startswith("bpe:"):
        size = tokenizer_spec[4:]
        if not size.isdigit():
            raise ValueError(f"bad tokenizer {tokenizer_spec!r}: write bpe:V with V the vocabulary size")
        return cached_bpe(train_docs, int(size), digest)
    return resolve_tokenizer(tokenizer_spec).path


def eod_id_of(tokenizer: Tokenizer) -> int:
    for token in _EOD_CANDIDATES:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return tid
    raise ValueError(f"the tokenizer has no end-of-document token (looked for {list(_EOD_CANDIDATES)})")


def prepare_data(corpus: str, tokenizer_spec: str, cache_dir: Path | None = None) -> TokenData:
    docs = load_corpus(corpus)
    digest = corpus_digest(docs)
    train_docs = [d for i, d in enumerate(docs) if not is_val_document(i)]
    val_docs = [d for i, d in enumerate(docs) if is_val_document(i)]
    if not val_docs:
        raise ValueError(
            f"corpus {corpus!r} has {len(docs)} document(s); the validation split takes every "
            f"{VAL_EVERY}th, so give at least {VAL_OFFSET + 1} documents (separate them by blank lines in a .txt file, one per .txt file in a folder, or one per .jsonl line)"
        )
    tok_path = tokenizer_for(tokenizer_spec, train_docs, digest)
    tokenizer = load_tokenizer(resolve_tokenizer(str(tok_path)))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    eod = eod_id_of(tokenizer)
    tok_digest = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    folder = (cache_dir or default_cache_dir()) / "tokens" / f"{digest[:16]}-{tok_digest[:16]}"
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    if not (folder / "meta.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        print(f"tokenizing {corpus!r} ({len(docs):,} documents) once; cached in {folder}", file=sys.stderr, flush=True)
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            _write_tokens(folder / f"{split}.bin", tokenizer, split_docs, eod, dtype)
        print(f"tokenized in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        _write_json(folder / "meta.json", {"corpus": corpus, "corpus_digest": digest, "tokenizer": str(tok_path),
                                           "vocab_size": vocab, "eod_id": eod, "dtype": np.dtype(dtype).name})  # fmt: skip
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return TokenData(train=train, val=val, tokenizer_path=tok_path, vocab_size=vocab, eod_id=eod, corpus=corpus,
                     corpus_digest=digest)  # fmt: skip


def _write_tokens(path: Path, tokenizer: Tokenizer, docs: list[str], eod: int, dtype) -> None:
    chunks = []
    for start in range(0, len(docs), 256):
        for enc in tokenizer.encode_batch(docs[start : start + 256], add_special_tokens=False):
            chunks.append(np.asarray(enc.ids + [eod], dtype=dtype))
    tmp = path.with_suffix(".tmp")
    np.concatenate(chunks).tofile(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def sample_batch(
    tokens: np.ndarray, batch: int, seq_len: int, *, seed: int, step: int, micro: int = 0, rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len + 1 tokens: (inputs, next-token targets), int64 (B, T).
    `batch` is global: rank r of P reads only its rows [r*B/P, (r+1)*B/P) of it."""
    if len(tokens) < seq_len + 2:
        raise ValueError(f"the training split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    if batch % world_size:
        raise ValueError(f"batch_size {batch} does not divide over {world_size} ranks; use a multiple of {world_size}")
    rng = np.random.default_rng([seed, step, micro, 0])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    per_rank = batch // world_size
    starts = starts[rank * per_rank : (rank + 1) * per_rank]
    windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed torch's global generator for one training step (dropout masks), from the run's seed,
    the step and the rank alone, as sample_batch draws its windows: a run killed and resumed draws
    the masks an unbroken run draws, and no step's masks depend on what ran before it."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank, 1]).generate_state(1)[0]))


def eval_windows(tokens: np.ndarray, batch: int, seq_len: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows from the start of the split (the same every call)."""
    count = min(max_batches * batch, (len(tokens) - 1) // seq_len)
    if count < 1:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    arr = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)]).astype(np.int64)
    windows = torch.from_numpy(arr)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch)]
