"""Model shapes for `engram bench penalty`: what an Engram table costs a model of a real size.

Each shape is a named function returning a `Shape`: an engram-lm backbone (random weights:
throughput does not depend on their values) with Engram where the paper puts it, and where
its numbers come from. The paper's system test (ENGRAM_SPEC s.7: a 100B-parameter table in host
memory, 4B and 8B dense backbones, nano-vLLM on an H800) names no backbone shape; nano-vLLM
serves Qwen3 models, so `paper-4b` and `paper-8b` take Qwen3-4B's and Qwen3-8B's published
config.json (hidden, layers, 32 query and 8 key/value heads of 128, SwiGLU width, vocabulary,
rope theta; restated identically in many public repositories, e.g. the Qwen3 model-shape tables
found with the search tool). Choices where the paper is silent, said in `chosen`: engram-lm's
blocks (Qwen3's q/k norms left out, the head not tied), one Engram layer at block 2 (index 1:
the paper's best single placement, and
"prefetched during block 1"), orders {2, 3} with 8 heads each and d_mem 1280 (the paper's
27B module), the table's rows set by the run's --table-gb (the paper's 100B parameters do not
fit this machine: the size is said in every result).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engram_lm.config import EngramConfig
from engram_lm.models.config import ModelConfig

PAPER_ENGRAM = dict(max_ngram=3, num_heads=8, layer_ids=(1,), pad_id=0, embed_per_ngram=640, zero_init_conv=False)


@dataclass(frozen=True)
class Shape:
    name: str
    model: ModelConfig  # the backbone with its Engram (table sizes filled in by `with_table`)
    source: str
    chosen: str

    def with_table(self, rows_per_head: int) -> "Shape":
        """The shape with every hash head's table at about `rows_per_head` rows (a prime above it)."""
        e = self.model.engram
        return replace(self, model=self.model.with_(engram=e.with_(table_sizes=(rows_per_head,) * (e.max_ngram - 1))))


def _qwen3(vocab: int, dim: int, layers: int, heads: int, ffn: int, max_len: int = 8192) -> ModelConfig:
    engram = EngramConfig(tokenizer=f"identity:{vocab}", table_sizes=(1009, 1009), **PAPER_ENGRAM)
    return ModelConfig(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=heads, num_kv_heads=8,
                       attention_head_dim=128, max_seq_len=max_len, ffn_hidden=ffn, num_dense_layers=layers,
                       rope_theta=1_000_000.0, engram=engram)  # fmt: skip


def paper_4b() -> Shape:
    return Shape("paper-4b", _qwen3(151_936, 2560, 36, 32, 9728),
                 "Qwen/Qwen3-4B config.json: hidden 2560, 36 layers, 32 heads and 8 KV heads of 128, SwiGLU 9728, "
                 "vocab 151,936, rope theta 1e6",
                 "dense Qwen3-4B-sized backbone (the paper's 4B, served by nano-vLLM); " + _CHOSEN)  # fmt: skip


def paper_8b() -> Shape:
    return Shape("paper-8b", _qwen3(151_936, 4096, 36, 32, 12288),
                 "Qwen/Qwen3-8B config.json: hidden 4096, 36 layers, 32 heads and 8 KV heads of 128, SwiGLU 12288, "
                 "vocab 151,936, rope theta 1e6",
                 "dense Qwen3-8B-sized backbone (the paper's 8B, served by nano-vLLM); " + _CHOSEN)  # fmt: skip


def quickstart() -> Shape:
    from engram_lm.recipes import quickstart_moe

    base, _ = quickstart_moe()
    engram = EngramConfig(tokenizer="identity:4096", table_sizes=(1009, 1009), max_ngram=3, num_heads=4, layer_ids=(1,),
                          pad_id=0, embed_per_ngram=128, zero_init_conv=False)  # fmt: skip
    return Shape("quickstart", base.with_(engram=engram, max_seq_len=8192), "engram-lm's quickstart MoE (recipes.py)",
                 "today's `engram bench offload` model, for continuity")  # fmt: skip


_CHOSEN = ("engram-lm's blocks (no q/k norms, untied head: the parameter count is Qwen3's plus its head), Engram at "
           "block 2 (index 1), orders 2-3 x 8 heads, d_mem 1280, the table sized by --table-gb")
SHAPES = {"quickstart": quickstart, "paper-4b": paper_4b, "paper-8b": paper_8b}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        from engram_lm.bench.hf_shapes import HF_SHAPES

        raise ValueError(f"unknown --shape {name!r}; choose one of {sorted(SHAPES) + sorted(HF_SHAPES)}")
    return SHAPES[name]()


def scaled_down(shape: Shape) -> Shape:
    """The same kind of model at a size a test builds in a second: 2 blocks, hidden 64, vocab 512."""
    m = shape.model
    e = m.engram.with_(tokenizer="identity:512", embed_per_ngram=m.engram.num_heads * 4)
    small = m.with_(vocab_size=512, dim=64, num_layers=2, num_heads=4, ffn_hidden=128, engram=e,
                    num_kv_heads=2 if m.num_kv_heads else None, attention_head_dim=16 if m.attention_head_dim else None,
                    num_dense_layers=min(m.num_dense_layers, 2), expert_hidden=min(m.expert_hidden, 32) if m.expert_hidden else 0,
                    max_seq_len=512)  # fmt: skip
    return replace(shape, name=shape.name + " (scaled down)", model=small)
