"""Placing a pipeline on its device: quantization, offload, attention chunking, VAE tiling and CPU kernels.

Entry point :func:`prepare` (called by ``loading.load_pipeline``). Its parts:

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

import logging
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.mmdit import MMDiT, MMDiTConfig
from workbench.models.moe import GELUProjection
from workbench.pipeline import Pipeline

QUANTIZATIONS = (None, "int8", "nf4", "fp4")
OFFLOADS = (None, "model", "sequential")
INT8_BACKENDS = ("auto", "bitsandbytes", "weight_only", "dynamic")
"""``bitsandbytes``: ``Linear8bitLt`` (row-wise int8 weights, int8 matmul with row-wise activation scales);
``weight_only``: int8 weights with one scale per output channel, dequantized to the compute dtype per call (fastest
int8 path on a CPU with bfloat16 matmuls); ``dynamic``: ``torch.ao.quantization.quantize_dynamic`` (fbgemm int8
matmul with activations quantized per call, float32 compute only: faster than float32 on large models, less exact);
``auto``: ``weight_only`` on the CPU (on the embedded model it stays within 1.1 points of float32 in every column of
the evaluation, where ``dynamic`` loses 3.2 on one), ``bitsandbytes`` elsewhere."""

FULL_PRECISION_MODULES = (
    "pos_embed",
    "time_text_embed",
    "context_embedder",
    "norm1.linear",
    "norm1_context.linear",
    "norm_out.linear",
    "proj_out",
    "router",
)
MODULATION_MODULES = ("norm1.linear", "norm1_context.linear", "norm_out.linear")
TEXT_FULL_PRECISION_MODULES = ("text_projection", "embed_tokens", "shared")

_offloaders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------------ validation


def check_options(
    quantization: str | None = None,
    offload: str | None = None,
    attention_chunk_size: int | None = None,
    int8_backend: str = "auto",
    vae_tile_threshold: int | None = None,
) -> None:
    """Raise ValueError naming the parameter, the value and what is allowed, for any bad memory option."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if int8_backend not in INT8_BACKENDS:
        raise ValueError(f"int8_backend must be one of {INT8_BACKENDS}, got {int8_backend!r}")
    for name, value in (("attention_chunk_size", attention_chunk_size), ("vae_tile_threshold", vae_tile_threshold)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive integer, got {value!r}")


def _bitsandbytes(quantization: str):
    try:
        import bitsandbytes
    except ImportError as err:
        raise ValueError(
            f"quantization={quantization!r} needs bitsandbytes (pip install 'bitsandbytes>=0.46'); "
            "int8 also runs without it with int8_backend='weight_only'"
        ) from err
    return bitsandbytes


def recommended_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """float16 on CUDA; bfloat16 on a CPU with native bfloat16 matmuls (AVX512-BF16 / AMX); float32 otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where bfloat16 is much faster than
    float32; elsewhere bfloat16 matmuls are emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return torch.backends.mkldnn.is_available() and any(getattr(torch.cpu, c, lambda: False)() for c in checks)
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------------- quantization


def _has_component(name: str, pattern: str) -> bool:
    return f".{pattern}." in f".{name}."


def keeps_full_precision(name: str, quantize_modulation: bool = True) -> bool:
    """Whether the transformer's module ``name`` stays unquantized (see :data:`FULL_PRECISION_MODULES`)."""
    kept = [p for p in FULL_PRECISION_MODULES if not (quantize_modulation and p in MODULATION_MODULES)]
    return any(_has_component(name, pattern) for pattern in kept)


def quantization_targets(model: nn.Module, quantize_modulation: bool = True) -> list[str]:
    """Names of the transformer's ``nn.Linear`` modules that quantization replaces."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not keeps_full_precision(name, quantize_modulation)
    ]


def text_quantization_targets(encoder: nn.Module) -> list[str]:
    """Names of a transformers text encoder's ``nn.Linear`` modules to quantize: all but the output projection
    and the model's own ``_keep_in_fp32_modules`` (T5's ``wo``)."""
    keep = (*TEXT_FULL_PRECISION_MODULES, *(getattr(encoder, "_keep_in_fp32_modules", None) or ()))
    return [
        name
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear) and not any(_has_component(name, p) for p in keep)
    ]


def resolve_int8_backend(backend: str, device: str | torch.device, compute_dtype: torch.dtype) -> str:
    """The concrete int8 backend for ``backend`` (``"auto"`` resolved) on ``device`` computing in ``compute_dtype``;
    raises ValueError for combinations that cannot run."""
    device = torch.device(device)
    if backend == "auto":
        return "weight_only" if device.type == "cpu" else "bitsandbytes"
    if backend == "dynamic" and (device.type != "cpu" or compute_dtype != torch.float32):
        raise ValueError(
            f"int8_backend='dynamic' runs on the CPU in float32 only, got device={str(device)!r}, "
            f"dtype={compute_dtype}; use 'weight_only' or 'bitsandbytes'"
        )
    if backend == "dynamic" and not _dynamic_available():
        raise ValueError("int8_backend='dynamic' needs torch.ao.quantization.quantize_dynamic, missing from this torch")
    return backend


def _dynamic_available() -> bool:
    return hasattr(getattr(getattr(torch, "ao", None), "quantization", None), "quantize_dynamic")


class Int8WeightOnlyLinear(nn.Module):
    """``y = x Wᵀ + b`` with W stored as int8 ``(out, in)`` and one float32 scale per output row
    (``W ≈ weight · scale[:, None]``); W is dequantized to the input's dtype for each call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def quantize_linear(
    linear: nn.Linear,
    quantization: str,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    int8_backend: str = "auto",
) -> nn.Module:
    """A quantized replacement for ``linear`` (whose weights may be on the CPU), placed on ``device``; the
    full-precision weight is only read. ``compute_dtype`` is the dtype the layer computes and returns in."""
    check_options(quantization, int8_backend=int8_backend)
    if quantization is None:
        raise ValueError("quantization must be 'int8', 'nf4' or 'fp4' to quantize a layer, got None")
    device = torch.device(device)
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if quantization == "int8":
        backend = resolve_int8_backend(int8_backend, device, compute_dtype)
        if backend == "weight_only":
            return Int8WeightOnlyLinear(weight, bias, compute_dtype).to(device)
        if backend == "dynamic":
            return _dynamic_int8(weight, bias)
    bnb = _bitsandbytes(quantization)
    out_features, in_features = weight.shape
    if quantization == "int8":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_bnb_cast_warning)
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=0.0, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type=quantization,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=quantization, compress_statistics=True, module=layer
        )
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(weight.device, compute_dtype), requires_grad=False)
    return layer.to(device).eval().requires_grad_(False)


def _drop_bnb_cast_warning(record: logging.LogRecord) -> bool:
    """bitsandbytes logs on every int8 call that non-float16 inputs are cast to float16; that is expected here."""
    return "inputs will be cast" not in record.getMessage()


def _dynamic_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.float().cpu(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.float().cpu(), requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(nn.Sequential(linear), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)[0]


QUANTIZED_TYPES: tuple[type, ...] = (Int8WeightOnlyLinear,)


def _quantized_types() -> tuple[type, ...]:
    types = list(QUANTIZED_TYPES)
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear8bitLt, bnb.nn.Linear4bit]
    except ImportError:
        pass
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        types.append(DynamicLinear)
    except ImportError:
        pass
    return tuple(types)


def is_quantized(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is a quantized linear layer."""
    types = _quantized_types()
    return any(isinstance(m, types) for m in model.modules())


def quantize_modules(
    model: nn.Module,
    names: Iterable[str],
    quantization: str,
    compute_dtype: torch.dtype,
    device: str | torch.device = "cpu",
    int8_backend: str = "auto",
) -> nn.Module:
    """Replace the ``nn.Linear`` submodules ``names`` of ``model`` by quantized layers, one at a time (in place)."""
    for name in names:
        linear = model.get_submodule(name)
        model.set_submodule(name, quantize_linear(linear, quantization, compute_dtype, device, int8_backend))
        del linear
    return model


def quantize_transformer(
    model: MMDiT,
    quantization: str,
    compute_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantize_modulation: bool = True,
    int8_backend: str = "auto",
) -> MMDiT:
    """Quantize an in-memory transformer in place (layer by layer); see :func:`stream_transformer` to load one
    without holding its full-precision weights."""
    compute_dtype = compute_dtype or model.dtype
    targets = quantization_targets(model, quantize_modulation)
    quantize_modules(model, targets, quantization, compute_dtype, device, int8_backend)
    model.quantization = quantization
    return model


def quantize_text_conditioner(
    text_encoders: nn.Module,
    quantization: str,
    device: str | torch.device = "cpu",
    int8_backend: str = "auto",
    execution_device: str | torch.device | None = None,
) -> nn.Module:
    """Quantize the Linear layers of each present text encoder (``clip_l``, ``clip_g``, ``t5``) in place, placing
    them on ``device``; the int8 backend is chosen for ``execution_device`` (default ``device``)."""
    for slot in ("clip_l", "clip_g", "t5"):
        encoder = getattr(text_encoders, slot, None)
        if encoder is None:
            continue
        dtype = next(encoder.parameters()).dtype
        backend = int8_backend
        if quantization == "int8":
            backend = resolve_int8_backend(int8_backend, execution_device or device, dtype)
        quantize_modules(encoder, text_quantization_targets(encoder), quantization, dtype, device, backend)
    return text_encoders


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def stream_transformer(
    config: MMDiTConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    device: str | torch.device = "cpu",
    quantize_modulation: bool = True,
    int8_backend: str = "auto",
    source: str = "transformer",
) -> MMDiT:
    """Build an :class:`MMDiT` from ``(name, tensor)`` pairs read one at a time (diffusers names), quantizing each
    target layer as soon as its weight (and bias) have arrived; other floating tensors are cast to ``dtype``.

    The model starts on the meta device, so no random weights are made and the full-precision weights are never all
    in memory: at any time only the tensors of layers still waiting for their bias or weight are held. Buffers that
    checkpoints may omit (``pos_embed.pos_embed``, MoE ``expert_weights``) are left on the meta device for the
    caller to fill. Raises ValueError for unexpected or missing names.
    """
    check_options(quantization, int8_backend=int8_backend)
    with torch.device("meta"):
        model = MMDiT(config)
    expected = set(model.state_dict())
    targets = set(quantization_targets(model, quantize_modulation)) if quantization else set()
    pending: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    for key, tensor in tensors:
        if key not in expected:
            raise ValueError(f"{source}: unexpected weight {key!r} for this transformer config")
        seen.add(key)
        module_name, _, leaf = key.rpartition(".")
        if module_name not in targets:
            cast = tensor.is_floating_point() and key != "pos_embed.pos_embed"
            _set_tensor(model, key, tensor.to(dtype) if cast else tensor)
            continue
        parts = pending.setdefault(module_name, {})
        parts[leaf] = tensor
        if "weight" in parts and ("bias" in parts or model.get_submodule(module_name).bias is None):
            linear = _linear_from(parts["weight"], parts.get("bias"))
            del pending[module_name]
            model.set_submodule(module_name, quantize_linear(linear, quantization, dtype, device, int8_backend))
            del linear, parts
    missing = sorted(expected - seen - {"pos_embed.pos_embed"})
    if missing or pending:
        raise ValueError(f"{source}: missing weights ({len(missing)}: {missing[:5]}; incomplete {sorted(pending)[:5]})")
    model.quantization = quantization
    return model.eval().requires_grad_(False)


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


# ------------------------------------------------------------------------------------------------------ CPU kernels


def packed_kernels_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ROW_BUCKET = 64


class PackedLinear(nn.Module):
    """An ``nn.Linear`` on oneDNN with the weight pre-packed for the CPU (optionally followed by a fused tanh-GELU).

    Inference only; ``state_dict`` holds the usual dense ``weight`` and ``bias`` (the names of the module it
    replaces; with ``gelu`` it replaces a :class:`GELUProjection` and keeps its ``proj.`` prefix). Moving it to
    another device or dtype unpacks it into a plain dense weight.
    """

    def __init__(self, linear: nn.Linear, gelu: bool = False, batch_hint: int = 2048) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gelu = gelu
        self.dtype = linear.weight.dtype
        self.packed: torch.Tensor | None = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.register_buffer("unpacked", None, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.unpacked if self.packed is None else self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.dtype != self.dtype or x.device.type != "cpu":
            out = F.linear(x, self.weight.to(x), None if self.bias is None else self.bias.to(x))
            return F.gelu(out, approximate="tanh") if self.gelu else out
        rows = x.shape[0]
        if x.dim() == 2 and rows % ROW_BUCKET:
            # Routed tokens (MoE experts) come in a new count at every call, and oneDNN builds a kernel per shape:
            # padding to a multiple of ROW_BUCKET keeps the shapes few, so the built kernels are reused.
            x = F.pad(x, (0, 0, 0, ROW_BUCKET - rows % ROW_BUCKET))
        if self.gelu:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], "tanh")
        else:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out[:rows]

    def add_to_weight(self, delta: torch.Tensor) -> None:
        """``W += delta`` (``delta`` (out, in), any float dtype), repacking the weight."""
        weight = (self.weight.float() + delta.float().to(self.weight.device)).to(self.dtype)
        if self.packed is None:
            self.unpacked = weight
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2048)

    def dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear``."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def _prefix(self, prefix: str) -> str:
        return prefix + "proj." if self.gelu else prefix

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[self._prefix(prefix) + "weight"] = self.weight
        if self.bias is not None:
            destination[self._prefix(prefix) + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        key = self._prefix(prefix) + "weight"
        if key not in state_dict:
            if strict:
                missing.append(key)
        elif self.packed is None:
            self.unpacked = state_dict[key].to(self.unpacked)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(state_dict[key].to(self.dtype), 2048)
        if self.bias is not None and self._prefix(prefix) + "bias" in state_dict:
            self.bias.data.copy_(state_dict[self._prefix(prefix) + "bias"])

    def _apply(self, fn, recurse=True):
        if self.packed is not None:
            probe = fn(torch.empty(0, dtype=self.dtype))
            if probe.device.type != "cpu" or probe.dtype != self.dtype:
                self.unpacked, self.packed = self.packed.to_dense(), None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gelu={self.gelu}"


PER_IMAGE_MODULES = ("time_text_embed", *MODULATION_MODULES, "router")


def pack_linears(model: nn.Module) -> int:
    """Replace the transformer's token-wise linears by :class:`PackedLinear` (GELU projections fused). Linears that
    see one vector per image (time/text embedders, adaLN modulation), MoE routers and quantized layers are left
    alone. Returns the number replaced."""
    modules = dict(model.named_modules())
    gelu = {n for n, m in modules.items() if isinstance(m, GELUProjection) and type(m.proj) is nn.Linear}
    count = 0
    for name, module in modules.items():
        if any(_has_component(name, pattern) for pattern in PER_IMAGE_MODULES):
            continue
        if name in gelu:
            model.set_submodule(name, PackedLinear(module.proj, gelu=True))
            count += 1
        elif type(module) is nn.Linear and name.rpartition(".")[0] not in gelu:
            model.set_submodule(name, PackedLinear(module))
            count += 1
    return count


def unpack_linears(model: nn.Module) -> int:
    """Undo :func:`pack_linears`; returns the number of modules restored."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            dense = module.dense()
            if module.gelu:
                with torch.device("meta"):
                    replacement = GELUProjection(module.in_features, module.out_features)
                replacement.proj = dense
            else:
                replacement = dense
            model.set_submodule(name, replacement)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------------------- offload


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class _Unit:
    name: str
    module: nn.Module
    triggers: list[nn.Module]


class Offloader:
    """Hooks that keep modules on ``offload_device`` and bring them to ``execution_device`` when they run.

    ``location`` maps each unit name to ``"execution"`` or ``"offload"`` (what the hooks last did); ``moves``
    counts the transfers. Inputs of a unit are moved to the execution device before it runs.
    """

    def __init__(self, execution_device: torch.device, offload_device: torch.device) -> None:
        self.execution_device = execution_device
        self.offload_device = offload_device
        self.units: list[_Unit] = []
        self.location: dict[str, str] = {}
        self.moves = 0
        self._handles: list = []

    def _move(self, unit: _Unit, where: str) -> None:
        if self.location.get(unit.name) == where:
            return
        unit.module.to(self.execution_device if where == "execution" else self.offload_device)
        self.location[unit.name] = where
        self.moves += 1

    def add(self, name: str, module: nn.Module, triggers: list[nn.Module] | None = None) -> None:
        unit = _Unit(name, module, triggers or [module])
        self.units.append(unit)
        self._move(unit, "offload")
        for trigger in unit.triggers:
            self._handles.append(trigger.register_forward_pre_hook(self._pre_hook(unit), with_kwargs=True))
            post = self._post_hook(unit)
            if post is not None:
                self._handles.append(trigger.register_forward_hook(post))

    def _pre_hook(self, unit: _Unit) -> Callable:
        def hook(module, args, kwargs):
            self.before(unit)
            return _to_device(args, self.execution_device), _to_device(kwargs, self.execution_device)

        return hook

    def _post_hook(self, unit: _Unit) -> Callable | None:
        return None

    def before(self, unit: _Unit) -> None:
        self._move(unit, "execution")

    def offload_all(self) -> None:
        for unit in self.units:
            self._move(unit, "offload")

    def remove(self) -> None:
        """Detach the hooks (modules stay where they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ModelOffload(Offloader):
    """One component on the execution device at a time: when a component starts, the previous one is offloaded."""

    def __init__(self, execution_device: torch.device, offload_device: torch.device) -> None:
        super().__init__(execution_device, offload_device)
        self.active: _Unit | None = None

    def before(self, unit: _Unit) -> None:
        if self.active is not None and self.active is not unit:
            self._move(self.active, "offload")
        self._move(unit, "execution")
        self.active = unit


class SequentialOffload(Offloader):
    """Each unit (a transformer block, an encoder layer, a VAE block, …) is loaded just before its forward and
    offloaded right after it."""

    def _post_hook(self, unit: _Unit) -> Callable:
        def hook(module, args, output):
            self._move(unit, "offload")
            return output

        return hook


def _direct_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def sequential_units(
    module: nn.Module, max_bytes: int = 512 << 20, prefix: str = "", seen: set[int] | None = None
) -> list[tuple[str, nn.Module]]:
    """Split a component into units moved as a whole. The component itself is split into its children (so a
    transformer moves block by block); below it, a module holding tensors itself, or a called module (not a
    ModuleList/ModuleDict) of at most ``max_bytes``, is a unit, and larger ones are split further. Every tensor
    belongs to exactly one unit (a module shared by two parents is listed once)."""
    top = seen is None
    seen = set() if seen is None else seen
    if id(module) in seen:
        return []
    small = not isinstance(module, (nn.ModuleList, nn.ModuleDict)) and _module_bytes(module) <= max_bytes
    if _direct_tensors(module) or (small and not top):
        seen.update(id(m) for m in module.modules())
        return [(prefix or "root", module)] if _module_bytes(module) else []
    seen.add(id(module))
    units = []
    for name, child in module.named_children():
        units += sequential_units(child, max_bytes, f"{prefix}.{name}" if prefix else name, seen)
    return units


def _components(pipe: Pipeline) -> list[tuple[str, nn.Module, list[nn.Module]]]:
    out = []
    for slot in ("clip_l", "clip_g", "t5"):
        encoder = getattr(pipe.text_encoders, slot, None)
        if encoder is not None:
            out.append((f"text_encoders.{slot}", encoder, [encoder]))
    out.append(("transformer", pipe.transformer, [pipe.transformer]))
    vae = pipe.vae
    triggers = [m for m in (vae.encoder, vae.decoder, vae.quant_conv, vae.post_quant_conv) if m is not None]
    out.append(("vae", vae, triggers))
    return out


def enable_offload(
    pipe: Pipeline,
    mode: str,
    execution_device: str | torch.device,
    offload_device: str | torch.device = "cpu",
    max_unit_bytes: int = 512 << 20,
) -> Offloader:
    """Install ``"model"`` or ``"sequential"`` offload hooks on ``pipe`` (replacing earlier ones)."""
    check_options(offload=mode)
    if mode is None:
        raise ValueError("offload must be 'model' or 'sequential' to enable offload, got None")
    disable_offload(pipe)
    execution_device, offload_device = torch.device(execution_device), torch.device(offload_device)
    if mode == "model":
        offloader: Offloader = ModelOffload(execution_device, offload_device)
        for name, module, triggers in _components(pipe):
            offloader.add(name, module, triggers)
    else:
        offloader = SequentialOffload(execution_device, offload_device)
        for name, module, _ in _components(pipe):
            for unit_name, unit in sequential_units(module, max_unit_bytes):
                offloader.add(f"{name}.{unit_name}", unit)
    pipe.text_encoders.to(offload_device)
    _offloaders[pipe] = offloader
    return offloader


def disable_offload(pipe: Pipeline) -> None:
    """Remove offload hooks installed by :func:`enable_offload` (modules are left on the offload device)."""
    offloader = _offloaders.pop(pipe, None)
    if offloader is not None:
        offloader.remove()


def offloader_of(pipe: Pipeline) -> Offloader | None:
    """The offload hooks installed on ``pipe``, if any."""
    return _offloaders.get(pipe)


# ------------------------------------------------------------------------------------------------------------ entry


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
    ``cpu_kernels`` (None: on for bfloat16 on the CPU without offload) packs the transformer's linears for oneDNN.
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
        cpu_kernels = device.type == "cpu" and offload is None and pipe.dtype == torch.bfloat16
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
