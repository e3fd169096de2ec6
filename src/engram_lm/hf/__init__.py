"""Engram for Hugging Face causal LMs (optional extra: pip install engram-lm[hf])."""

from engram_lm.hf.retrofit import EngramRetrofit, add_engram

__all__ = ["EngramRetrofit", "add_engram"]
