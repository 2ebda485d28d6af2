"""GGUF transformer files (ComfyUI-GGUF, stable-diffusion.cpp): reading, key mapping, and layers that stay quantized.

A GGUF file holds named tensors, each with a ggml type (F32, F16, BF16, Q8_0, Q4_K, …) and a shape listed innermost
first (``ne``; PyTorch's shape reversed). A quantized tensor of PyTorch shape ``(out, in)`` is stored row by row,
``in`` split into blocks of 32 (legacy types) or 256 (K-quants) values, each block a fixed number of bytes; the
``gguf`` package reads it as a uint8 array ``(out, in / block * bytes_per_block)``. Rows are independent, so
splitting or reordering rows (the fused q/k/v, the adaLN (shift, scale) halves) works on the raw bytes.

Keys are the original MMDiT names (``joint_blocks.N.x_block.attn.qkv.weight``…), with ComfyUI-GGUF's files writing
them bare and ``general.architecture = "sd3"``, and stable-diffusion.cpp's with the ``model.diffusion_model.``
prefix and often no architecture (then it is read from the key names). They are converted with the single-file
converter of :mod:`workbench.formats.original`, applied to row indices so that the raw bytes follow it unchanged.

Linear weights that are quantized (or F16 / BF16 while computing in another dtype) become :class:`GGUFLinear`
layers holding the file's bytes, dequantized with torch for every call: memory follows the file size. All other
tensors (biases, norms, ``pos_embed``, the patch-embedding convolution) are dequantized once, to the compute dtype.
Text encoders and the VAE are not read from the file. The ``gguf`` package is imported only when a file is read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.formats.files import ModelFormatError, require_matching_keys
from workbench.formats.original import infer_transformer_config, split_single_file
from workbench.models.mmdit import MMDiT, sincos_2d_table

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
BF16 = 30
"""ggml type ids (``gguf.GGMLQuantizationType``), fixed by the file format."""

BLOCKS: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q8_0: (32, 34),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q2_K: (256, 84),
    Q3_K: (256, 110),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}
"""Supported types: values per block and bytes per block."""

TYPE_NAMES = {
    F32: "F32",
    F16: "F16",
    BF16: "BF16",
    Q8_0: "Q8_0",
    Q4_0: "Q4_0",
    Q4_1: "Q4_1",
    Q5_0: "Q5_0",
    Q5_1: "Q5_1",
    Q2_K: "Q2_K",
    Q3_K: "Q3_K",
    Q4_K: "Q4_K",
    Q5_K: "Q5_K",
    Q6_K: "Q6_K",
}
FLOAT_TYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
K_QUANTS = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
"""Dequantized by the ``gguf`` package (numpy, on the CPU); every other supported type by torch on the layer's
device."""

CPU_CHUNK_BLOCKS = 16384
"""On the CPU, blocks are dequantized this many at a time (512 K values), so the intermediates stay in cache: about
30 % faster than one pass over a large weight."""

PREFIX = "model.diffusion_model."
ARCHITECTURE_KEYS = {
    "sd3": ("joint_blocks.0.x_block.attn.qkv.weight", "transformer_blocks.0.attn.add_q_proj.weight"),
    "flux": ("double_blocks.0.img_attn.proj.weight",),
    "sdxl": ("label_emb.0.0.weight",),
    "sd1": ("input_blocks.3.0.op.weight",),
    "aura": ("double_layers.0.modX.1.weight",),
    "hidream": ("double_stream_blocks.0.block.ff_i.shared_experts.w3.weight",),
    "wan": ("head.modulation",),
    "ltxv": ("adaln_single.emb.timestep_embedder.linear_2.weight",),
    "lumina2": ("cap_embedder.1.weight",),
}
"""Architectures told apart by their key names when ``general.architecture`` is absent (stable-diffusion.cpp)."""


def type_name(quant_type: int) -> str:
    """``"Q4_0"`` for 2, …; the ``gguf`` package's name for types this module does not read."""
    if quant_type in TYPE_NAMES:
        return TYPE_NAMES[quant_type]
    try:
        import gguf

        return gguf.GGMLQuantizationType(quant_type).name
    except (ImportError, ValueError):
        return f"type {quant_type}"


def supported_types() -> list[str]:
    """The ggml types this module reads, in the file format's id order."""
    return [TYPE_NAMES[t] for t in sorted(BLOCKS)]


# ------------------------------------------------------------------------------------------------- dequantization


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of every block, as float32 ``(..., 1)``."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``(..., 16)`` bytes → ``(..., 32)`` uint8 values: the 16 low nibbles, then the 16 high nibbles (ggml's
    order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` bytes (a little-endian uint32) → ``(..., 32)`` uint8: bit j, for value j, times 16. A lookup of
    each byte's 8 bits (several times faster on the CPU than shifting every byte 8 ways)."""
    table = _BIT_TABLES.get(qh.device)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        table = _BIT_TABLES.setdefault(qh.device, (bits << 4).to(device=qh.device, dtype=torch.uint8))
    return table.index_select(0, qh.reshape(-1).int()).reshape(*qh.shape[:-1], 32)


def _scale(q: torch.Tensor, d: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``d · q + offset`` in float32, in one pass over ``q`` (uint8 or int8 values)."""
    return torch.addcmul(offset, q.float(), d)


def _dequantize_blocks(blocks: torch.Tensor, quant_type: int) -> torch.Tensor:
    """``(..., blocks, bytes_per_block)`` uint8 → ``(..., blocks, 32)`` float32, for the 32-value types."""
    d = _f16(blocks, 0)
    if quant_type == Q8_0:
        return blocks[..., 2:].contiguous().view(torch.int8).float() * d
    if quant_type == Q4_0:
        return _scale(_nibbles(blocks[..., 2:]), d, -8 * d)
    if quant_type == Q4_1:
        return _scale(_nibbles(blocks[..., 4:]), d, _f16(blocks, 2))
    if quant_type == Q5_0:
        return _scale(_nibbles(blocks[..., 6:]) | _high_bits(blocks[..., 2:6]), d, -16 * d)
    if quant_type == Q5_1:
        return _scale(_nibbles(blocks[..., 8:]) | _high_bits(blocks[..., 4:8]), d, _f16(blocks, 2))
    raise ModelFormatError(f"no torch dequantizer for GGUF type {type_name(quant_type)}")


def dequantize(data: torch.Tensor, quant_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor as stored in a GGUF file → float32 of PyTorch ``shape``, on ``data``'s device.

    ``data``: F32 / F16 tensors in their dtype; every other type as uint8 ``(rows, row_bytes)`` (or flat), where
    ``rows · row_bytes / bytes_per_block · values_per_block == prod(shape)``. K-quants go through
    ``gguf.quants.dequantize`` on the CPU and come back to ``data``'s device."""
    if quant_type in (F32, F16):
        return data.float().reshape(shape)
    if quant_type == BF16:
        return data.contiguous().view(torch.bfloat16).float().reshape(shape)
    if quant_type not in BLOCKS:
        raise ModelFormatError(f"unsupported GGUF type {type_name(quant_type)}; supported: {supported_types()}")
    values, size = BLOCKS[quant_type]
    if quant_type in K_QUANTS:
        from gguf.quants import dequantize as gguf_dequantize

        flat = data.detach().cpu().contiguous().numpy().reshape(-1, size)
        return torch.from_numpy(gguf_dequantize(flat, quant_type)).reshape(shape).to(data.device)
    blocks = data.reshape(-1, size)
    if data.device.type != "cpu" or blocks.shape[0] <= CPU_CHUNK_BLOCKS:
        return _dequantize_blocks(blocks, quant_type).reshape(shape)
    out = torch.empty(blocks.shape[0], values)
    for start in range(0, blocks.shape[0], CPU_CHUNK_BLOCKS):
        out[start : start + CPU_CHUNK_BLOCKS] = _dequantize_blocks(blocks[start : start + CPU_CHUNK_BLOCKS], quant_type)
    return out.reshape(shape)


# -------------------------------------------------------------------------------------------------------- layers


class GGUFLinear(nn.Module):
    """``y = x Wᵀ + b`` with W ``(out_features, in_features)`` kept as the GGUF file stores it (buffer ``qweight``:
    uint8 ``(out, row_bytes)``, or float16 / bfloat16 ``(out, in)``) and dequantized to the input's dtype for each
    call; the bias (if any) is a float parameter. ``in_features`` / ``out_features`` are those of the
    ``nn.Linear`` it replaces (LoRA hooks read them)."""

    def __init__(
        self, qweight: torch.Tensor, quant_type: int, shape: tuple[int, int], bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.quant_type = int(quant_type)
        self.register_buffer("qweight", qweight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W ``(out_features, in_features)`` in ``dtype``."""
        return dequantize(self.qweight, self.quant_type, (self.out_features, self.in_features)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"type={type_name(self.quant_type)}"
        )


# ------------------------------------------------------------------------------------------------------- reading


@dataclass
class GGUFTensor:
    """One tensor of the file: ``data`` as :func:`dequantize` takes it, its ggml type and PyTorch shape."""

    data: torch.Tensor
    quant_type: int
    shape: tuple[int, ...]

    @property
    def rows_are_raw(self) -> bool:
        """Whether dim 0 of ``data`` is dim 0 of ``shape`` with whole rows (2-D tensors; selecting rows is exact)."""
        return len(self.shape) == 2 and self.data.shape[0] == self.shape[0]

    def dequantized(self) -> torch.Tensor:
        """float32 of ``shape``."""
        return dequantize(self.data, self.quant_type, self.shape)

    def as_float(self) -> torch.Tensor:
        """The stored values in their own float dtype (F32, F16, BF16; no copy), other types dequantized to
        float32."""
        if self.quant_type in (F32, F16):
            return self.data.reshape(self.shape)
        if self.quant_type == BF16:
            return self.data.contiguous().view(torch.bfloat16).reshape(self.shape)
        return self.dequantized()


@dataclass
class GGUFFile:
    """A GGUF file's tensors by name and its ``general.architecture`` (None when absent)."""

    path: Path
    architecture: str | None
    tensors: dict[str, GGUFTensor]


def _field_string(reader: Any, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[-1]]).decode("utf-8", errors="replace")


def _unreadable(path: Path, reason: str) -> ModelFormatError:
    size = path.stat().st_size if path.is_file() else 0
    return ModelFormatError(
        f"{path}: not a readable GGUF file ({size} bytes; truncated or corrupt download?): {reason}"
    )


def read_gguf(path: str | Path) -> GGUFFile:
    """All tensors of a GGUF file, copied into memory in their stored types (quantized stays quantized).

    Raises :class:`ModelFormatError` naming the file when it is missing, not GGUF, truncated, or holds a type
    outside :func:`supported_types` (naming the tensor, the type and the supported list)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: file not found")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise _unreadable(path, "no GGUF magic at the start")
    try:
        import gguf
    except ImportError as err:
        raise ModelFormatError(f"{path}: reading GGUF files needs the gguf package (pip install 'gguf>=0.10')") from err
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, EOFError) as err:
        raise _unreadable(path, f"{type(err).__name__}: {err}") from err
    size = path.stat().st_size
    tensors: dict[str, GGUFTensor] = {}
    for tensor in reader.tensors:
        quant_type = int(tensor.tensor_type)
        if quant_type not in BLOCKS:
            raise ModelFormatError(
                f"{path}: tensor {tensor.name!r} has GGUF type {type_name(quant_type)}, which this loader does not "
                f"read; supported types: {', '.join(supported_types())}"
            )
        if int(tensor.data_offset) + int(tensor.n_bytes) > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise _unreadable(path, f"tensor {tensor.name!r} ends past the end of the file")
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.from_numpy(np.array(tensor.data))
        tensors[tensor.name] = GGUFTensor(data, quant_type, shape)
    return GGUFFile(path, _field_string(reader, "general.architecture"), tensors)


def detect_architecture(file: GGUFFile) -> str:
    """``general.architecture``, or (when absent, or ComfyUI's compatibility names "pig" / "cow") the architecture
    the key names show; ``"unknown"`` when none matches."""
    if file.architecture not in (None, "", "pig", "cow"):
        return file.architecture
    names = {key.removeprefix(PREFIX) for key in file.tensors}
    for architecture, keys in ARCHITECTURE_KEYS.items():
        if any(key in names for key in keys):
            return architecture
    return "unknown"


# ---------------------------------------------------------------------------------------------------- conversion


def _pos_embed(tensor: GGUFTensor) -> GGUFTensor:
    """``pos_embed`` as ``(1, positions, width)`` in its stored float dtype, or float16 when quantized (quantizers
    may drop its leading 1; the loaders keep ``pos_embed`` in the stored dtype rather than the compute dtype)."""
    values = tensor.as_float()
    if tensor.quant_type not in FLOAT_TYPES:
        values = values.half()
    values = values.reshape(1, -1, tensor.shape[-1])
    kind = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}[values.dtype]
    return GGUFTensor(values, kind, tuple(values.shape))


def convert_keys(tensors: dict[str, GGUFTensor]) -> dict[str, GGUFTensor]:
    """Original MMDiT names (with or without ``model.diffusion_model.``; diffusers names pass unchanged) → ours,
    by :func:`workbench.formats.original.split_single_file` run on row indices: each tensor is replaced by the
    indices of its dim-0 rows (distinct across tensors), converted, and the rows each result names are taken from
    the stored data. Tensors whose rows are not whole stored rows (1-D, 3-D, 4-D) are dequantized first. Keys of
    other components (VAE, text encoders) are dropped."""
    prepared: dict[str, GGUFTensor] = {}
    index: dict[str, torch.Tensor] = {}
    starts: list[tuple[int, str]] = []
    offset = 0
    for key, tensor in tensors.items():
        if key.removeprefix(PREFIX) == "pos_embed":
            tensor = _pos_embed(tensor)
        elif not tensor.rows_are_raw:
            tensor = GGUFTensor(tensor.dequantized(), F32, tensor.shape)
        rows = tensor.shape[0] if tensor.shape else 1
        prepared[key] = tensor
        index[key] = torch.arange(offset, offset + rows).reshape((rows,) + (1,) * (len(tensor.shape) - 1))
        starts.append((offset, key))
        offset += rows
    parts = split_single_file(index)
    if "transformer" not in parts:
        raise ModelFormatError(
            "no MMDiT weights found (expected joint_blocks.* or model.diffusion_model.joint_blocks.*)"
        )
    begins = torch.tensor([start for start, _ in starts])
    out: dict[str, GGUFTensor] = {}
    for key, ids in parts["transformer"].items():
        rows = ids.reshape(ids.shape[0], -1)[:, 0]
        source_start, source_key = starts[int(torch.searchsorted(begins, rows[0], right=True)) - 1]
        source = prepared[source_key]
        local = rows - source_start
        if torch.equal(local, torch.arange(source.shape[0])):
            out[key] = source
        else:
            data = source.data.index_select(0, local)
            out[key] = GGUFTensor(data, source.quant_type, (len(local),) + tuple(source.shape[1:]))
    return out


# ------------------------------------------------------------------------------------------------------ building


def _keeps_bytes(tensor: GGUFTensor, dtype: torch.dtype) -> bool:
    """Whether a linear weight stays as stored (:class:`GGUFLinear`) rather than becoming an ``nn.Linear``."""
    return tensor.quant_type != F32 and FLOAT_TYPES.get(tensor.quant_type) != dtype


def build_gguf_transformer(tensors: dict[str, GGUFTensor], dtype: torch.dtype, source: str) -> MMDiT:
    """An :class:`MMDiT` from diffusers-named GGUF tensors: :class:`GGUFLinear` for every linear whose weight
    :func:`_keeps_bytes`, everything else dequantized to ``dtype`` (``pos_embed`` as :func:`_pos_embed` keeps
    it). ``model.quantization`` is ``"gguf"``."""
    meta = {key: torch.empty(t.shape, device="meta") for key, t in tensors.items()}
    config = infer_transformer_config(meta)
    with torch.device("meta"):
        model = MMDiT(config)
    require_matching_keys(model, tensors, source, "an SD3 transformer", optional={"pos_embed.pos_embed"})
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module_name = key.rpartition(".")[0]
        if key.endswith(".weight") and module_name in linears and _keeps_bytes(tensor, dtype):
            bias = tensors.get(f"{module_name}.bias")
            bias = None if bias is None else bias.dequantized().to(dtype)
            model.set_submodule(module_name, GGUFLinear(tensor.data, tensor.quant_type, tensor.shape, bias))
            continue
        if key.endswith(".bias") and module_name in linears and _keeps_bytes(tensors[f"{module_name}.weight"], dtype):
            continue
        value = tensor.as_float()
        state[key] = value if key == "pos_embed.pos_embed" else value.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    patch = model.pos_embed
    if patch.pos_embed.is_meta:
        size = config.sample_size // config.patch_size
        patch.pos_embed = sincos_2d_table(config.inner_dim, config.pos_embed_max_size, size).unsqueeze(0)
    model.quantization = "gguf"
    return model.eval().requires_grad_(False)


def load_gguf_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> MMDiT:
    """The SD3 / SD3.5 transformer of a GGUF file (ComfyUI-GGUF or stable-diffusion.cpp), quantized linears kept
    quantized, computing in ``dtype``. Refuses other architectures (naming the one found), unsupported types and
    truncated files with a :class:`ModelFormatError` naming the file."""
    file = read_gguf(path)
    architecture = detect_architecture(file)
    if architecture != "sd3":
        raise ModelFormatError(
            f"{file.path}: this GGUF file holds a {architecture!r} model "
            f"({'general.architecture' if file.architecture else 'from its key names'}); "
            "SD3 Workbench loads SD3 / SD3.5 MMDiT transformers (architecture 'sd3')"
        )
    try:
        tensors = convert_keys(file.tensors)
    except ModelFormatError as err:
        raise ModelFormatError(f"{file.path}: {err}") from err
    return build_gguf_transformer(tensors, dtype, str(file.path))


def gguf_bytes(model: nn.Module) -> int:
    """Bytes of the stored GGUF weights (``qweight`` buffers) in ``model``."""
    return sum(m.qweight.numel() * m.qweight.element_size() for m in model.modules() if isinstance(m, GGUFLinear))


def quantized_type_counts(model: nn.Module) -> dict[str, int]:
    """How many :class:`GGUFLinear` layers of each type ``model`` holds, e.g. ``{"Q4_0": 96, "F16": 2}``."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, GGUFLinear):
            counts[type_name(module.quant_type)] = counts.get(type_name(module.quant_type), 0) + 1
    return counts
