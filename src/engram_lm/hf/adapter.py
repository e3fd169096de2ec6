"""The Engram adapter format: only the Engram parameters, bound to one base model and tokenizer.

    adapter_config.json   format, Engram config, layers, hash-layout fingerprint, base model
                          name, base config hash, tokenizer hash, end-of-document id, and
                          the sha256 of adapter.safetensors
    adapter.safetensors   every parameter of model.engram (tables included)
    tokenizer.json        the tokenizer the hashing was built from (a copy)

`load_engram` refuses a different base model (config hash) or tokenizer (file hash) with
a message naming both, and an adapter.safetensors that is not the one saved (checksum), and
can put the tables in host RAM or in a memory-mapped file (`memory="ram"|"mmap"`) so a
retrofitted model can serve a table larger than its GPU. The mmap cache
(`table-layer-<L>.fp32.bin`) records the checksum of the adapter it was made from and is
rebuilt when that changed or the file is short. A save goes to `<dir>.tmp` and swaps in
(`replace_dir`): a kill leaves the old adapter or the new one, and says where.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engram_lm.config import EngramConfig
from engram_lm.hf.families import causal_lm
from engram_lm.hf.retrofit import EngramRetrofit, tokenizer_spec
from engram_lm.memory.export import file_sha256

FORMAT = "engram-lm-adapter/1"
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"}


def base_config_hash(model: nn.Module) -> str:
    """sha256 of the base model's architecture config (names, dtype and versions left out)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if not path.startswith("identity:") else path


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`: the old one is moved aside first and removed
    last, so a kill at any point leaves `out` whole, or `out.old` and `tmp` whole beside it."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


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
            "tokenizer_sha256": _file_hash(spec), "eod_id": retrofit.eod_id,
            "adapter_sha256": file_sha256(tmp / "adapter.safetensors")}  # fmt: skip
    (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out)
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        left = [p for p in (Path(f"{adapter_dir}.old"), Path(f"{adapter_dir}.tmp")) if (p / "adapter_config.json").exists()]
        if left:
            raise ValueError(f"{adapter_dir} is missing: a save was interrupted and left {' and '.join(map(str, left))} "
                             "(.old: the adapter before it, .tmp: the new one); rerun the command that saved it "
                             "(engram retrofit resumes and republishes it), or use one of them")  # fmt: skip
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
    _check_base(model, adapter_dir, meta)
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
    weights = adapter_dir / "adapter.safetensors"
    if "adapter_sha256" in meta and file_sha256(weights) != meta["adapter_sha256"]:
        raise ValueError(f"{weights} is not the file saved with {adapter_dir / 'adapter_config.json'} (sha256 "
                         f"{file_sha256(weights)[:12]}, saved {meta['adapter_sha256'][:12]}): it was replaced or damaged; "
                         "restore the adapter folder as saved")  # fmt: skip
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {weights}: {exc}. The file is truncated or not a safetensors file") from None
    retrofit.load_state_dict(tensors, strict=True)
    device = next(model.parameters()).device
    retrofit.to(device)
    if memory != "device":
        _move_tables(retrofit, adapter_dir, memory, device, meta.get("adapter_sha256") or file_sha256(weights))
    causal_lm(model).engram = retrofit
    retrofit.attach(model)
    return retrofit


def restore_engram(model: nn.Module, adapter_dir: str | Path) -> EngramRetrofit:
    """Copy a saved adapter's weights into the Engram `model` already has, in place (its parameters,
    and so every optimizer holding them, stay the same objects): resuming a run."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    _check_base(model, adapter_dir, meta)
    retrofit = _retrofit(model)
    if retrofit.fingerprint != meta["fingerprint"]:
        raise ValueError(f"adapter {adapter_dir} has hash layout {meta['fingerprint']}, this model's Engram "
                         f"{retrofit.fingerprint}: it was saved from another Engram configuration")  # fmt: skip
    weights = adapter_dir / "adapter.safetensors"
    if file_sha256(weights) != meta["adapter_sha256"]:
        raise ValueError(f"{weights} is not the file saved with {adapter_dir / 'adapter_config.json'}: it was replaced or "
                         "damaged; resume from another checkpoint")  # fmt: skip
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {weights}: {exc}. The file is truncated or not a safetensors file") from None
    state = retrofit.state_dict()
    if set(tensors) != set(state):
        raise ValueError(f"{weights} holds {sorted(set(tensors) ^ set(state))[:3]}... where this model's Engram differs: "
                         "it was saved from another Engram configuration")  # fmt: skip
    with torch.no_grad():
        for name, value in state.items():
            value.copy_(tensors[name])
    return retrofit


def load_adapter(model: nn.Module, adapter_dir: str | Path, **kwargs: Any) -> nn.Module:
    """A retrofit's adapter folder onto a fresh base: its LoRA weights (`lora/`, peft's format)
    when it has them, then the memory (`load_engram`, which takes `kwargs`). Returns the model to
    use: the peft model with LoRA, else `model`. A different base is refused before anything loads."""
    adapter_dir = Path(adapter_dir)
    _check_base(model, adapter_dir, read_adapter_config(adapter_dir))
    if (adapter_dir / "lora").is_dir():
        try:
            from peft import PeftModel
        except ImportError as err:
            raise ValueError(f"{adapter_dir} holds LoRA weights: loading them needs peft ({err}); "
                             "pip install 'engram-lm[hf]'") from None  # fmt: skip
        model = PeftModel.from_pretrained(model, adapter_dir / "lora")
    load_engram(model, adapter_dir, **kwargs)
    return model


def _check_base(model: nn.Module, adapter_dir: Path, meta: dict[str, Any]) -> None:
    if meta["base_config_sha256"] != base_config_hash(model):
        raise ValueError(f"adapter {adapter_dir} was trained on base {meta['base_model']!r} (config "
                         f"{meta['base_config_sha256'][:12]}), this model is {getattr(model.config, '_name_or_path', '?')!r} "
                         f"(config {base_config_hash(model)[:12]}); load it onto the model it was trained on")  # fmt: skip


def _move_tables(retrofit: EngramRetrofit, adapter_dir: Path, memory: str, device: torch.device, source_sha256: str) -> None:
    from engram_lm.memory.host import HostTable, MmapTable

    for key, engram in retrofit.engrams.items():
        weight = engram.memory.weight.detach().cpu()
        if memory == "ram":
            engram.memory = HostTable(weight, device=device)
        elif memory == "mmap":
            path = _mmap_cache(adapter_dir / f"table-layer-{key}.fp32.bin", weight, source_sha256)
            engram.memory = MmapTable(path, weight.shape[0], weight.shape[1], "fp32", device=device)
        else:
            raise ValueError(f"unknown memory tier {memory!r}; choose device, ram or mmap")


def _mmap_cache(path: Path, weight: torch.Tensor, source_sha256: str) -> Path:
    """The table's rows as a flat fp32 file beside the adapter, made once; remade when the
    adapter it came from changed (its recorded checksum) or the file is not whole."""
    from engram_lm.memory.codec import encode_rows

    meta = path.with_suffix(".json")
    try:
        recorded = json.loads(meta.read_text()).get("adapter_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != source_sha256 or not path.exists() or path.stat().st_size != weight.numel() * 4:
        tmp = path.with_name(path.name + ".tmp")
        encode_rows(weight, "fp32").tofile(tmp)
        os.replace(tmp, path)
        meta.write_text(json.dumps({"adapter_sha256": source_sha256, "rows": weight.shape[0], "dim": weight.shape[1]}))
    return path


def _retrofit(model: nn.Module) -> EngramRetrofit:
    retrofit = getattr(model, "engram", None)
    if not isinstance(retrofit, EngramRetrofit):
        raise ValueError("this model has no Engram; add one with add_engram(model, tokenizer)")
    return retrofit
