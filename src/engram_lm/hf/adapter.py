"""The Engram adapter format: only the Engram parameters, bound to one base model and tokenizer.

    adapter_config.json   format, Engram config, layers, hash-layout fingerprint, base model
                          name, base config hash, tokenizer hash, end-of-document id
    adapter.safetensors   every parameter of model.engram (tables included)
    tokenizer.json        the tokenizer the hashing was built from (a copy)

`load_engram` refuses a different base model (config hash) or tokenizer (file hash) with
a message naming both, and can put the tables in host RAM or in a memory-mapped file
(`memory="ram"|"mmap"`) so a retrofitted model can serve a table larger than its GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engram_lm.config import EngramConfig
from engram_lm.hf.retrofit import EngramRetrofit, tokenizer_spec

FORMAT = "engram-lm-adapter/1"
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"}


def base_config_hash(model: nn.Module) -> str:
    """sha256 of the base model's architecture config (names, dtype and versions left out)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if not path.startswith("identity:") else path


def save_engram(model: nn.Module, out_dir: str | Path) -> Path:
    retrofit = _retrofit(model)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in retrofit.state_dict().items()}
    save_file(tensors, str(tmp / "adapter.safetensors"))
    spec = retrofit.config.tokenizer
    if not spec.startswith("identity:"):
        shutil.copyfile(spec, tmp / "tokenizer.json")
    meta = {"format": FORMAT, "engram": retrofit.config.to_dict(), "fingerprint": retrofit.fingerprint,
            "base_model": getattr(model.config, "_name_or_path", ""), "base_config_sha256": base_config_hash(model),
            "tokenizer_sha256": _file_hash(spec), "eod_id": retrofit.eod_id}  # fmt: skip
    (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        raise ValueError(f"{adapter_dir} is not an Engram adapter (no adapter_config.json); save one with save_engram")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged ({err.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} has format {found!r}, expected {FORMAT!r}: not an Engram adapter")
    return meta


def load_engram(model: nn.Module, adapter_dir: str | Path, *, tokenizer: Any = None, memory: str = "device") -> EngramRetrofit:
    """Attach a saved adapter to `model` (which must not have Engram yet)."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    if meta["base_config_sha256"] != base_config_hash(model):
        raise ValueError(f"adapter {adapter_dir} was trained on base {meta['base_model']!r} (config "
                         f"{meta['base_config_sha256'][:12]}), this model is {getattr(model.config, '_name_or_path', '?')!r} "
                         f"(config {base_config_hash(model)[:12]}); load it onto the model it was trained on")  # fmt: skip
    cfg = EngramConfig.from_dict(meta["engram"])
    spec = cfg.tokenizer if cfg.tokenizer.startswith("identity:") else str(adapter_dir / "tokenizer.json")
    if tokenizer is not None:
        given = tokenizer_spec(tokenizer)[0]
        if _file_hash(given) != meta["tokenizer_sha256"]:
            raise ValueError(f"adapter {adapter_dir} was built for another tokenizer (sha256 "
                             f"{meta['tokenizer_sha256'][:12]}) than the one given ({_file_hash(given)[:12]}); "
                             "use the base model's own tokenizer")  # fmt: skip
    if getattr(model, "engram", None) is not None:
        raise ValueError("this model already has Engram; load the adapter onto a fresh base model")
    retrofit = EngramRetrofit(cfg.with_(tokenizer=spec), meta["eod_id"])
    if retrofit.fingerprint != meta["fingerprint"]:
        raise ValueError(f"adapter {adapter_dir}: hash layout {retrofit.fingerprint} differs from the saved "
                         f"{meta['fingerprint']}; the tokenizer copy or the config was changed")  # fmt: skip
    tensors = load_file(str(adapter_dir / "adapter.safetensors"))
    retrofit.load_state_dict(tensors, strict=True)
    device = next(model.parameters()).device
    retrofit.to(device)
    if memory != "device":
        _move_tables(retrofit, adapter_dir, memory, device)
    model.engram = retrofit
    retrofit.attach(model)
    return retrofit


def _move_tables(retrofit: EngramRetrofit, adapter_dir: Path, memory: str, device: torch.device) -> None:
    from engram_lm.memory.codec import encode_rows
    from engram_lm.memory.host import HostTable, MmapTable

    for key, engram in retrofit.engrams.items():
        weight = engram.memory.weight.detach().cpu()
        if memory == "ram":
            engram.memory = HostTable(weight, device=device)
        elif memory == "mmap":
            path = adapter_dir / f"table-layer-{key}.fp32.bin"
            if not path.exists():
                encode_rows(weight, "fp32").tofile(path)
            engram.memory = MmapTable(path, weight.shape[0], weight.shape[1], "fp32", device=device)
        else:
            raise ValueError(f"unknown memory tier {memory!r}; choose device, ram or mmap")


def _retrofit(model: nn.Module) -> EngramRetrofit:
    retrofit = getattr(model, "engram", None)
    if not isinstance(retrofit, EngramRetrofit):
        raise ValueError("this model has no Engram; add one with add_engram(model, tokenizer)")
    return retrofit
