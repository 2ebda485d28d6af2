"""``python -m workbench convert FILE.ckpt``: rewrite a trusted pickle checkpoint as safetensors."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from workbench.cli.paths import check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert a trusted .ckpt/.pt/.bin checkpoint to .safetensors")
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default=None, help="default: the same name with .safetensors")
    parser.set_defaults(run=run)


def flatten_state(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a (nested) state dict, keys joined with dots; ``state_dict`` wrappers are unwrapped."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        inner = obj.get("state_dict", obj)
        out: dict[str, torch.Tensor] = {}
        for key, value in inner.items():
            out.update(flatten_state(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def run(args: argparse.Namespace) -> int:
    source = Path(args.checkpoint)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: file not found")
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol are not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch wraps the unpickler's refusal in several types; the file is the user's
        raise ValueError(
            f"{source}: not a plain tensor checkpoint (the safe loader refused it: {type(err).__name__}); only "
            "pickles of tensors and plain containers convert"
        ) from None
    tensors = {k: v.contiguous().clone() for k, v in flatten_state(state).items()}
    if not tensors:
        raise ValueError(f"{source}: no tensors found")
    out = Path(args.out) if args.out else source.with_suffix(".safetensors")
    check_output_file(out, "--out")
    save_file(tensors, str(out))
    print(f"{out} ({len(tensors)} tensors)")
    return 0
