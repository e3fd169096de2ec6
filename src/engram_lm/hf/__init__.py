"""Engram for Hugging Face causal LMs (optional extra: pip install engram-lm[hf])."""

from engram_lm.hf.retrofit import EngramRetrofit, add_engram

_LAZY = {  # imported on first use: each pulls in transformers (or peft) itself
    "offload_tables": "engram_lm.hf.offload",
    "from_pretrained_offloaded": "engram_lm.hf.load",
    "EngramTrainer": "engram_lm.hf.trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engram_lm.hf' has no attribute {name!r}")


__all__ = ["EngramRetrofit", "EngramTrainer", "add_engram", "from_pretrained_offloaded", "offload_tables"]
