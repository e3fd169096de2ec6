"""Engram for a pretrained Hugging Face causal LM: `add_engram(model, tokenizer, layers=(1,))`.

The Engram modules live in `model.engram` (an `EngramRetrofit`); two kinds of forward hook
wire them in without touching the family's modeling code:
- on the model: hash `input_ids` once per forward (incrementally while a KV cache grows,
  so `model.generate` hashes only the new tokens, from an (N-1)-token history);
- on each chosen decoder layer: `h <- h + Engram(h, rows)` on the layer's input, as in our
  own model's blocks (the short conv streams its window while decoding).
The value projection starts at zero, so a freshly retrofitted model computes exactly what
the base model computes (tested per family) until the memory is trained.
Limits: hashing needs `input_ids` (not `inputs_embeds`); batched generation should use
prompts of equal length (padding tokens would be hashed like text).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engram_lm.config import EngramConfig
from engram_lm.engram.conv import ConvState
from engram_lm.engram.module import Engram
from engram_lm.hashing.hasher import NgramHasher, NgramHistory
from engram_lm.hf.families import causal_lm, family_of, hidden_size
from engram_lm.memory.dense import DenseTable
from engram_lm.tokenizer.cache import default_cache_dir

TABLE_INIT_STD = 0.02


@dataclass
class _Stream:
    """Per-sequence decoding state, reset when a forward starts a new sequence."""

    history: NgramHistory | None = None
    conv: dict[str, ConvState | None] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # this forward's rows per layer


class EngramRetrofit(nn.Module):
    def __init__(self, config: EngramConfig, eod_id: int | None) -> None:
        super().__init__()
        self.config = config
        self.eod_id = eod_id
        self.hasher = NgramHasher.from_config(config)
        self.engrams = nn.ModuleDict()
        for layer in self.hasher.layout.layers:
            table = DenseTable(layer.rows, config.head_dim, init_std=TABLE_INIT_STD, sparse_grad=True)
            self.engrams[str(layer.layer_id)] = Engram(config, layer.rows, memory=table)
        self._stream = _Stream()
        self._handles: list[Any] = []

    @property
    def fingerprint(self) -> str:
        return self.hasher.layout.fingerprint

    # ---- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        layers = family_of(model).layers(model)
        # on the *ForCausalLM itself: a peft wrapper calls it with the same input_ids
        self._handles.append(causal_lm(model).register_forward_pre_hook(self._hash_inputs, with_kwargs=True))
        for key in self.engrams:
            self._handles.append(layers[int(key)].register_forward_pre_hook(self._layer_hook(key), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hash_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("a model with Engram needs input_ids (the memory is addressed by token ids), not inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        # a cache will follow when one is passed, or when the model makes one (use_cache, or its config's default):
        # a prefill without past_key_values must still keep the conv's window for the next cached step
        use_cache = kwargs.get("use_cache")
        streams = cache is not None or bool(use_cache if use_cache is not None else getattr(module.config, "use_cache", False))
        s = self._stream
        if cached == 0:  # a new sequence: fresh history, and a conv stream when a cache will follow
            s.history = self.hasher.init_history(ids.shape[0], ids.device)
            s.conv = {k: (e.short_conv.init_state(ids.shape[0], ids.device, self._dtype()) if streams
                          and e.short_conv is not None else None) for k, e in self.engrams.items()}  # fmt: skip
        elif s.history is None or s.history.ids_BK.shape[0] != ids.shape[0]:
            raise ValueError("Engram's decoding state does not match this cache; start generation from the prompt")
        rows_LBTH, s.history = self.hasher.step(s.history, ids, eod_id=self.eod_id, global_rows=True)
        s.rows = {str(layer): rows for layer, rows in zip(self.hasher.layout.layer_ids, rows_LBTH.unbind(0))}

    def _layer_hook(self, key: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            engram = self.engrams[key]
            y = engram(hidden.to(self._dtype()), self._stream.rows[key], conv_state=self._stream.conv.get(key))
            hidden = hidden + y.to(hidden.dtype)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        return hook

    def _dtype(self) -> torch.dtype:
        return next(self.engrams.parameters()).dtype


def add_engram(
    model: nn.Module,
    tokenizer: Any,
    *,
    layers: tuple[int, ...] = (1,),
    table_size: int = 50_000,
    max_ngram: int = 3,
    num_heads: int = 4,
    embed_per_ngram: int | None = None,
    kernel_size: int = 4,
    seed: int = 0,
    compress_tokens: bool = True,
    eod_id: int | None = None,
    pad_id: int | None = None,
    init_seed: int | None = 0,
) -> EngramRetrofit:
    """Insert Engram before the given decoder layers of a transformers causal LM.

    tokenizer: the model's tokenizer (a transformers fast tokenizer, a tokenizer.json path,
    or "identity:V" for no compression); its compression projection is built and cached.
    table_size: base rows per n-gram order and head (primes land just above it).
    init_seed: the module's initial weights are drawn from it, whatever the global generator did
    before (pass the run's seed; two runs then start alike), and the global generator is left as
    it was; None draws from the global generator (the caller seeded it).
    Returns the EngramRetrofit, also reachable as `model.engram`."""
    if getattr(model, "engram", None) is not None:
        raise ValueError("this model already has Engram; load or train that one instead of adding another")
    family_of(model)  # refuses unsupported families with the fix
    D = hidden_size(model)
    num_layers = len(family_of(model).layers(model))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has decoder layers 0..{num_layers - 1}")
    spec, eos, pad = tokenizer_spec(tokenizer)
    width = embed_per_ngram or max(num_heads, (min(D, 512) // num_heads) * num_heads)
    cfg = EngramConfig(tokenizer=spec, compress_tokens=compress_tokens, table_sizes=(table_size,) * (max_ngram - 1),
                       max_ngram=max_ngram, num_heads=num_heads, layer_ids=tuple(layers),
                       pad_id=pad_id if pad_id is not None else (pad if pad is not None else (eos or 0)),
                       seed=seed, embed_per_ngram=width, hidden_size=D, num_branches=1, kernel_size=kernel_size,
                       zero_init_output=True)  # fmt: skip
    with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        retrofit = EngramRetrofit(cfg, eod_id if eod_id is not None else eos)
    param = next(model.parameters())
    retrofit.to(device=param.device)
    causal_lm(model).engram = retrofit  # a peft wrapper reaches it by attribute, and saves it with the base
    retrofit.attach(model)
    return retrofit


def tokenizer_spec(tokenizer: Any) -> tuple[str, int | None, int | None]:
    """(tokenizer spec for EngramConfig, eos id, pad id) from a tokenizer object or path."""
    if isinstance(tokenizer, (str, Path)):
        text = str(tokenizer)
        if text.startswith("identity:"):
            return text, None, None
        path = Path(text)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"no tokenizer file at {path}; pass the model's tokenizer.json or its folder")
        return str(path), None, None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("pass a fast tokenizer (with a tokenizer.json), its path, or identity:V")
    blob = backend.to_str().encode()
    path = default_cache_dir() / "hf-tokenizers" / f"{hashlib.sha256(blob).hexdigest()[:24]}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
    return str(path), getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)
