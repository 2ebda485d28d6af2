"""CPU kernels: in bfloat16 (and float32 on wide models, ``memory.packing_pays``) on the CPU, the transformer's large
linears run through oneDNN with pre-packed weights, and the feed-forward's tanh-GELU is fused into its first linear
(:class:`PackedLinear`); ``state_dict`` keeps the same parameter names. :func:`pack_linears` installs them,
:func:`unpack_linears` restores plain layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.moe import GELUProjection
from workbench.quantization import MODULATION_MODULES, has_component


def packed_kernels_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ROW_BUCKET = 64


class PackedLinear(nn.Module):
    """An ``nn.Linear`` on oneDNN with the weight pre-packed for the CPU (optionally followed by a fused tanh-GELU).

    Inference kernels: an input that needs a gradient (layout guidance) takes the dense weight. ``state_dict`` holds
    the usual dense ``weight`` and ``bias`` (the names of the module it replaces; with ``gelu`` it replaces a
    :class:`GELUProjection` and keeps its ``proj.`` prefix). Moving it to another device or dtype unpacks it into a
    plain dense weight.
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
        differentiable = torch.is_grad_enabled() and x.requires_grad  # oneDNN's packed kernel has no backward
        if self.packed is None or differentiable or x.dtype != self.dtype or x.device.type != "cpu":
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
        if any(has_component(name, pattern) for pattern in PER_IMAGE_MODULES):
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
