"""Placing a pipeline on its device: quantization, offload, attention chunking, VAE tiling and CPU kernels.

Entry point :func:`prepare` (called by ``loading.load_pipeline``). Its parts, each in its own module
(:mod:`workbench.quantization`, :mod:`workbench.offload`, :mod:`workbench.kernels`):

- **Quantization** (``"int8"``, ``"nf4"``, ``"fp4"``) replaces the transformer's ``nn.Linear`` layers — and, with
  ``quantize_text_encoders``, the text encoders' — by bitsandbytes layers (``bnb.nn.Linear8bitLt``,
  ``bnb.nn.Linear4bit``) or, for int8 on the CPU, by a faster torch path (see :data:`INT8_BACKENDS`). Layers that
  condition everything else stay in the compute dtype: patch embedding, time/text embedders, ``context_embedder``,
  the final projection ``proj_out`` and MoE routers. The adaLN modulation linears (``norm1.linear``,
  ``norm1_context.linear``, ``norm_out.linear``) hold a third of SD3-Medium's weights and are quantized too unless
  ``quantize_modulation=False`` (the embedded model's accuracy and SD3-Medium's velocity error stay within the
  noise of the unquantized-modulation variant; README, "Memory and speed"). :func:`stream_transformer`
  builds a quantized transformer from a stream of ``(name, tensor)`` pairs, so the full-precision weights are never
  all in memory at once.
- **Offload**: ``"model"`` keeps each component (every text encoder, the transformer, the VAE) on the execution
  device only while it runs; ``"sequential"`` moves one block at a time (forward pre-hooks load it, forward hooks
  put it back). Both give the same numbers as no offload: the computation itself is unchanged.
- **Attention chunking**: ``attention_chunk_size`` queries at a time (identical results, lower peak memory).
- **VAE tiling**: the VAE tiles above ``tile_threshold`` latent pixels on its own; ``vae_tile_threshold`` changes it.
- **CPU kernels**: in bfloat16 on the CPU, the large linears use oneDNN with pre-packed weights and the
  feed-forward's tanh-GELU is fused into its first linear (:class:`PackedLinear`); same parameter names in
  ``state_dict``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from workbench.kernels import (
    ROW_BUCKET,
    PackedLinear,
    pack_linears,
    packed_kernels_available,
    unpack_linears,
)
from workbench.offload import (
    OFFLOADS,
    ModelOffload,
    Offloader,
    SequentialOffload,
    disable_offload,
    enable_offload,
    offloader_of,
    sequential_units,
)
from workbench.quantization import (
    FULL_PRECISION_MODULES,
    INT8_BACKENDS,
    MODULATION_MODULES,
    QUANTIZATIONS,
    TEXT_FULL_PRECISION_MODULES,
    Int8WeightOnlyLinear,
    check_quantization,
    is_quantized,
    keeps_full_precision,
    quantization_targets,
    quantize_linear,
    quantize_modules,
    quantize_text_conditioner,
    quantize_transformer,
    resolve_int8_backend,
    stream_transformer,
    text_quantization_targets,
)

if TYPE_CHECKING:
    from workbench.pipeline import Pipeline

__all__ = [
    "FULL_PRECISION_MODULES",
    "INT8_BACKENDS",
    "MODULATION_MODULES",
    "OFFLOADS",
    "QUANTIZATIONS",
    "ROW_BUCKET",
    "TEXT_FULL_PRECISION_MODULES",
    "Int8WeightOnlyLinear",
    "ModelOffload",
    "Offloader",
    "PackedLinear",
    "SequentialOffload",
    "check_options",
    "cpu_has_bf16",
    "disable_offload",
    "enable_offload",
    "is_quantized",
    "keeps_full_precision",
    "memory_report",
    "offloader_of",
    "pack_linears",
    "packed_kernels_available",
    "prepare",
    "quantization_targets",
    "quantize_linear",
    "quantize_modules",
    "quantize_text_conditioner",
    "quantize_transformer",
    "recommended_dtype",
    "resolve_int8_backend",
    "sequential_units",
    "stream_transformer",
    "tensor_bytes",
    "text_quantization_targets",
    "unpack_linears",
]


def check_options(
    quantization: str | None = None,
    offload: str | None = None,
    attention_chunk_size: int | None = None,
    int8_backend: str = "auto",
    vae_tile_threshold: int | None = None,
) -> None:
    """Raise ValueError naming the parameter, the value and what is allowed, for any bad memory option."""
    check_quantization(quantization, int8_backend)
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    for name, value in (("attention_chunk_size", attention_chunk_size), ("vae_tile_threshold", vae_tile_threshold)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive integer, got {value!r}")


def recommended_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """float16 on CUDA; bfloat16 on a CPU with native bfloat16 matmuls (AVX512-BF16 / AMX); float32 otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)
"""Values of ``ONEDNN_MAX_CPU_ISA`` that cap oneDNN below native bfloat16 dot products (AVX512_CORE_BF16, AMX)."""


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where bfloat16 is much faster than
    float32; elsewhere bfloat16 matmuls are emulated and slower. ``ONEDNN_MAX_CPU_ISA`` set below AVX512_CORE_BF16
    (e.g. ``AVX512_CORE_VNNI``, to make an AMX machine behave like one without) counts as no native bfloat16."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return torch.backends.mkldnn.is_available() and any(getattr(torch.cpu, c, lambda: False)() for c in checks)
    except RuntimeError:
        return False


# -------------------------------------------------------------------------------------------------------- measures


def tensor_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes held by ``module``: ``{"parameters", "buffers", "quantized", "total"}``. ``parameters`` includes
    oneDNN pre-packed weights; ``quantized`` counts storage that is neither parameter nor buffer (bitsandbytes
    quantization statistics, fbgemm packed weights); :class:`Int8WeightOnlyLinear` keeps its int8 weight in buffers."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    extra = 0
    for sub in module.modules():
        if isinstance(sub, PackedLinear):
            params += 0 if sub.packed is None else sub.packed.numel() * sub.packed.element_size()
            continue
        weight = getattr(sub, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            extra += sum(t.numel() * t.element_size() for t in _quant_state_tensors(state))
        scb = getattr(weight, "SCB", None)
        if isinstance(scb, torch.Tensor):
            extra += scb.numel() * scb.element_size()
        if type(sub).__module__.startswith("torch.ao.nn.quantized.dynamic"):
            packed = sub.weight()
            extra += packed.numel() * packed.element_size() + 12 * packed.shape[0]
            bias = sub.bias()
            extra += 0 if bias is None else bias.numel() * bias.element_size()
    return {"parameters": params, "buffers": buffers, "quantized": extra, "total": params + buffers + extra}


def _quant_state_tensors(state) -> Iterator[torch.Tensor]:
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "absmax"):
            yield from _quant_state_tensors(value)


def memory_report(pipe: Pipeline) -> dict[str, dict[str, int]]:
    """:func:`tensor_bytes` of the transformer, the VAE and the text encoders."""
    return {
        "transformer": tensor_bytes(pipe.transformer),
        "vae": tensor_bytes(pipe.vae),
        "text_encoders": tensor_bytes(pipe.text_encoders),
    }


# ----------------------------------------------------------------------------------------------------------- entry


FP32_PACKING_MIN_WIDTH = 1024
"""float32 linears are packed for oneDNN from this transformer width up: SD3-Medium's width (1536, depth 2, 512²)
runs a guided step in 3.19 s packed against 3.67 s plain, while the 192-wide embedded model (MoE experts padded to
oneDNN's row buckets, layout guidance reading dense weights back) takes 0.95 s per image against 0.88 s (one
thread / two threads, the AMD EPYC of the README)."""


def packing_pays(dtype: torch.dtype, width: int) -> bool:
    """Whether oneDNN pre-packed linears are the faster CPU path for a transformer ``width`` wide (heads × head
    dimension) in ``dtype``: always in bfloat16, in float32 from :data:`FP32_PACKING_MIN_WIDTH` up."""
    return dtype == torch.bfloat16 or (dtype == torch.float32 and width >= FP32_PACKING_MIN_WIDTH)


def prepare(
    pipe: Pipeline,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    offload: str | None = None,
    attention_chunk_size: int | None = None,
    *,
    quantize_text_encoders: bool = False,
    quantize_modulation: bool = True,
    int8_backend: str = "auto",
    cpu_kernels: bool | None = None,
    vae_tile_threshold: int | None = None,
) -> Pipeline:
    """Place ``pipe`` on ``device`` with the requested memory options; returns the same pipeline.

    ``quantization`` ∈ {None, "int8", "nf4", "fp4"} quantizes the transformer (unless already quantized, e.g. by
    the streaming loader) in ``pipe.dtype``; ``quantize_text_encoders`` also quantizes the text encoders;
    ``quantize_modulation`` (default) quantizes the adaLN modulation linears too, ``False`` keeps them in the
    compute dtype (larger, slightly more exact). ``offload`` ∈ {None, "model", "sequential"} keeps weights on the
    CPU and runs on ``device``. ``attention_chunk_size`` bounds the attention's query block; ``vae_tile_threshold``
    (latent pixels) overrides where VAE tiling starts.
    ``cpu_kernels`` (None: on the CPU without offload where :func:`packing_pays`) packs the transformer's linears for
    oneDNN.
    """
    check_options(quantization, offload, attention_chunk_size, int8_backend, vae_tile_threshold)
    device = torch.device(device)
    disable_offload(pipe)
    unpack_linears(pipe.transformer)
    done = getattr(pipe.transformer, "quantization", None)
    if quantization is not None and done is not None and done != quantization:
        raise ValueError(
            f"quantization={quantization!r}, but the transformer is already quantized as {done!r}; reload the model"
        )
    target = torch.device("cpu") if offload is not None else device
    if quantization is not None and done is None:
        backend = resolve_int8_backend(int8_backend, device, pipe.dtype) if quantization == "int8" else int8_backend
        quantize_transformer(pipe.transformer, quantization, pipe.dtype, target, quantize_modulation, backend)
    if quantization is not None and quantize_text_encoders and not is_quantized(pipe.text_encoders):
        quantize_text_conditioner(pipe.text_encoders, quantization, target, int8_backend, execution_device=device)
    if cpu_kernels is None:
        width = pipe.transformer.config.inner_dim
        cpu_kernels = device.type == "cpu" and offload is None and packing_pays(pipe.dtype, width)
    if cpu_kernels and device.type == "cpu" and offload is None and packed_kernels_available():
        pack_linears(pipe.transformer)
    if offload is None:
        pipe.transformer.to(device)
        pipe.vae.to(device)
        pipe.text_encoders.to(device)
    else:
        enable_offload(pipe, offload, device)
    pipe.device = device
    pipe.transformer.set_attention_chunk_size(attention_chunk_size)
    if vae_tile_threshold is not None:
        pipe.vae.tile_threshold = vae_tile_threshold
    return pipe
