"""Where each supported transformers family keeps its decoder layers and hidden size.

One small entry per family, not a fork of its modeling code: Engram attaches to the
decoder layers with forward hooks, so all we need is the list of layers and the width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    layers_path: str  # attribute path from the *ForCausalLM model to its decoder-layer ModuleList

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = causal_lm(model)
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj


FAMILIES = {
    "llama": Family("llama", "model.layers"),
    "mistral": Family("mistral", "model.layers"),
    "qwen2": Family("qwen2", "model.layers"),
    "qwen3": Family("qwen3", "model.layers"),
    "gpt2": Family("gpt2", "transformer.h"),
}


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a wrapper (a `peft` model: its base model), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model type {model_type!r} is not supported yet; supported: {sorted(FAMILIES)} "
            "(a family needs one entry in engram_lm/hf/families.py: where its decoder layers live)"
        )
    return FAMILIES[model_type]


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
