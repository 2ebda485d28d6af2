"""Placing a pipeline on its device: quantization, offload and attention chunking."""

from __future__ import annotations

import torch

from workbench.pipeline import Pipeline

QUANTIZATIONS = (None, "int8", "nf4", "fp4")
OFFLOADS = (None, "model", "sequential")


def prepare(
    pipe: Pipeline,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    offload: str | None = None,
    attention_chunk_size: int | None = None,
) -> Pipeline:
    """Move ``pipe`` to ``device`` with the requested memory options; returns the same pipeline."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    device = torch.device(device)
    pipe.transformer.to(device)
    pipe.vae.to(device)
    pipe.text_encoders.to(device)
    pipe.device = device
    pipe.transformer.set_attention_chunk_size(attention_chunk_size)
    return pipe
