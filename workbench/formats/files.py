"""Checkpoint files: safetensors reading (whole or one tensor at a time), JSON configs, and the refusal of pickles.

Weights are safetensors only; pickle checkpoints (.ckpt/.pt/.pth/.bin) are refused with a message explaining how
to convert them. Missing, truncated and mismatched files raise :class:`ModelFormatError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class ModelFormatError(ValueError):
    """A model path or file that cannot be loaded; the message names the file and what is allowed."""


def require_matching_keys(
    module: torch.nn.Module, names: Collection[str], source: str, what: str, optional: Collection[str] = ()
) -> None:
    """Raise :class:`ModelFormatError` unless ``names`` are exactly ``module``'s state-dict keys (``optional`` keys
    may be absent); the message names ``source``, ``what`` the weights should match and a few of each difference."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(names) - set(optional))
    unexpected = sorted(set(names) - expected)
    if missing or unexpected:
        raise ModelFormatError(
            f"{source}: weights do not match {what} "
            f"(missing {len(missing)}: {missing[:5]}, unexpected {len(unexpected)}: {unexpected[:5]})"
        )


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: refusing to load a pickle checkpoint (pickles can run arbitrary code). Only .safetensors weights "
        f"are accepted. Convert it once, if you trust its source, with: python -m workbench convert {path}"
    )


def _check_safetensors_path(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFormatError(_pickle_message(path))
    if not path.is_file():
        raise ModelFormatError(f"{path}: file not found")
    with open(path, "rb") as handle:
        head = handle.read(9)
    looks_safetensors = head[8:9] == b"{"
    if not looks_safetensors and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ModelFormatError(_pickle_message(path))


def read_safetensors(path: str | Path, prefix: str = "", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (only keys starting with ``prefix``, prefix kept), optionally cast."""
    path = Path(path)
    _check_safetensors_path(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    tensor = f.get_tensor(key)
                    tensors[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return tensors
    except (SafetensorError, OSError, RuntimeError) as err:
        size = path.stat().st_size
        raise ModelFormatError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt download?): {err}"
        ) from err


def iter_safetensors(path: str | Path, reopen_bytes: int = 64 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file, one at a time, in file order. The file is memory-mapped; it is reopened
    after every ``reopen_bytes`` read so that the pages already read leave the process's resident memory."""
    path = Path(path)
    _check_safetensors_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        start = 0
        while start < len(keys):
            read = 0
            with safe_open(str(path), framework="pt") as f:
                while start < len(keys) and read < reopen_bytes:
                    tensor = f.get_tensor(keys[start])
                    read += tensor.numel() * tensor.element_size()
                    yield keys[start], tensor
                    start += 1
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size
        raise ModelFormatError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt download?): {err}"
        ) from err


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{path}: invalid JSON ({err})") from err
