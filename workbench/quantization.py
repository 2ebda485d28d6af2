"""Quantization of the transformer's (and optionally the text encoders') linear layers, in place or while streaming
a checkpoint.

``"int8"``, ``"nf4"`` and ``"fp4"`` replace ``nn.Linear`` layers by bitsandbytes layers (``bnb.nn.Linear8bitLt``,
``bnb.nn.Linear4bit``) or, for int8 on the CPU, by a faster torch path (see :data:`INT8_BACKENDS`). Layers that
condition everything else stay in the compute dtype (:data:`FULL_PRECISION_MODULES`): patch embedding, time/text
embedders, ``context_embedder``, the final projection ``proj_out`` and MoE routers. The adaLN modulation linears
(:data:`MODULATION_MODULES`, a third of SD3-Medium's weights) are quantized too unless ``quantize_modulation=False``.
:func:`stream_transformer` builds a quantized transformer from a stream of ``(name, tensor)`` pairs, so the
full-precision weights are never all in memory at once. Entry point for a whole pipeline:
:func:`workbench.memory.prepare`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.mmdit import MMDiT, MMDiTConfig

QUANTIZATIONS = (None, "int8", "nf4", "fp4")
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


def check_quantization(quantization: str | None, int8_backend: str = "auto") -> None:
    """ValueError naming the parameter, the value and what is allowed, for a bad quantization or int8 backend."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if int8_backend not in INT8_BACKENDS:
        raise ValueError(f"int8_backend must be one of {INT8_BACKENDS}, got {int8_backend!r}")


def _bitsandbytes(quantization: str):
    try:
        import bitsandbytes
    except ImportError as err:
        raise ValueError(
            f"quantization={quantization!r} needs bitsandbytes (pip install 'bitsandbytes>=0.46'); "
            "int8 also runs without it with int8_backend='weight_only'"
        ) from err
    return bitsandbytes


def has_component(name: str, pattern: str) -> bool:
    return f".{pattern}." in f".{name}."


def keeps_full_precision(name: str, quantize_modulation: bool = True) -> bool:
    """Whether the transformer's module ``name`` stays unquantized (see :data:`FULL_PRECISION_MODULES`)."""
    kept = [p for p in FULL_PRECISION_MODULES if not (quantize_modulation and p in MODULATION_MODULES)]
    return any(has_component(name, pattern) for pattern in kept)


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
        if isinstance(module, nn.Linear) and not any(has_component(name, p) for p in keep)
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
    check_quantization(quantization, int8_backend)
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


def _without_backward(model: nn.Module) -> list[nn.Module]:
    """The quantized linears of ``model`` that have no usable input gradient of their own: bitsandbytes' layers and
    torch's dynamic int8 (our int8 weight-only layer dequantizes into ``F.linear`` and has one)."""
    blocking = tuple(t for t in _quantized_types() if t not in QUANTIZED_TYPES)
    return [module for module in model.modules() if isinstance(module, blocking)]


def effective_weight(
    layer: Callable[[torch.Tensor], torch.Tensor], in_features: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The weight ``(out, in)`` that the linear map ``layer`` (a module or its forward) computes with, read back from
    its own output: ``layer(I) − layer(0)`` on inputs of ``dtype`` on ``device``. Exact for bitsandbytes' nf4 / fp4 /
    int8 and for dynamic int8, whose quantization of a one-hot row loses nothing."""
    with torch.no_grad():
        probe = torch.cat([torch.zeros(1, in_features), torch.eye(in_features)]).to(device, dtype)
        out = layer(probe)
        return (out[1:] - out[:1]).T


class _PassInputGradient(torch.autograd.Function):
    """``forward(x)`` as the layer computes it; ``backward`` multiplies by the layer's effective weight (the
    straight-through gradient of a quantized linear). No gradient reaches the weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
        ctx.forward_of, ctx.probe = forward, (x.shape[-1], x.dtype, x.device)
        return forward(x.detach())  # bitsandbytes takes another CPU kernel for inputs that require a gradient

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        weight = effective_weight(ctx.forward_of, *ctx.probe)
        return (grad.to(weight.dtype) @ weight).to(ctx.probe[1]), None


@contextmanager
def input_gradients(model: nn.Module) -> Iterator[None]:
    """Within the block, input gradients flow through every quantized linear of ``model`` that has no backward of
    its own (:func:`_without_backward`): the forward is unchanged, the backward multiplies by the weight the layer
    computes with (:func:`effective_weight`, read again on each backward so no dense copy stays in memory). Used by
    layout guidance, which needs the gradient of an attention loss with respect to the latents."""
    saved = [(layer, vars(layer).get("forward")) for layer in _without_backward(model)]
    for layer, _ in saved:
        original = layer.forward
        layer.forward = lambda x, original=original: _PassInputGradient.apply(x, original)
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


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
    check_quantization(quantization, int8_backend)
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
