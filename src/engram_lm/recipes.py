"""Named training recipes: (ModelConfig, TrainConfig) pairs, as functions.

- tiny:               smoke test, 20 steps in seconds.
- quickstart-moe:     the MoE baseline of `engram quickstart`.
- quickstart-engram:  iso-parameter MoE+Engram (same P_tot and P_act as the baseline):
                      part of the routed experts' sparse budget moved into Engram slots.
The vocabulary size, end-of-document id and the tokenizer path of the Engram config are
filled in from the tokenizer when a run starts (`resolve_model_config`).
"""

from __future__ import annotations

from typing import Callable

from engram_lm.config import EngramConfig
from engram_lm.models.config import ModelConfig
from engram_lm.training.config import TrainConfig

Recipe = tuple[ModelConfig, TrainConfig]


def tiny() -> Recipe:
    engram = EngramConfig(tokenizer="identity:4096", table_sizes=(3001, 3001), max_ngram=3, num_heads=2,
                          layer_ids=(1,), pad_id=0, embed_per_ngram=32, zero_init_output=True)  # fmt: skip
    model = ModelConfig(vocab_size=4096, dim=64, num_layers=2, num_heads=4, max_seq_len=256, ffn_hidden=128,
                        num_routed_experts=4, num_shared_experts=1, top_k=2, expert_hidden=64, engram=engram)  # fmt: skip
    train = TrainConfig(steps=20, batch_size=8, seq_len=64, warmup_steps=5, log_every=1, eval_every=10,
                        eval_batches=2)  # fmt: skip
    return model, train


def quickstart_moe() -> Recipe:
    model = ModelConfig(vocab_size=4096, dim=128, num_layers=4, num_heads=4, max_seq_len=256, ffn_hidden=512,
                        num_routed_experts=16, num_shared_experts=1, top_k=2, expert_hidden=128)  # fmt: skip
    train = TrainConfig(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30, log_every=10,
                        eval_every=100, eval_batches=16)  # fmt: skip
    return model, train


def paper_optimiser(train: TrainConfig) -> TrainConfig:
    """`train` with the paper's optimiser: table rows are not decayed. The experiments that
    test the paper's claims train this way (and the study's finished runs were trained so);
    the default decays them (TrainConfig.table_weight_decay), which the regularisation
    experiments measure against this."""
    return train.with_(table_weight_decay=0.0)


QUICKSTART_RHO = 0.75


def quickstart_engram_template() -> EngramConfig:
    """The Engram module of the quickstart models; table sizes come from `allocate`."""
    return EngramConfig(tokenizer="identity:4096", table_sizes=(2, 2), max_ngram=3, num_heads=4,
                        layer_ids=(1,), pad_id=0, embed_per_ngram=128, zero_init_output=True)  # fmt: skip


def quickstart_engram() -> Recipe:
    from engram_lm.models.accounting import allocate  # builds models to count: imports torch

    base, train = quickstart_moe()
    return allocate(base, QUICKSTART_RHO, quickstart_engram_template()), train


RECIPES: dict[str, Callable[[], Recipe]] = {
    "tiny": tiny,
    "quickstart-moe": quickstart_moe,
    "quickstart-engram": quickstart_engram,
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()
