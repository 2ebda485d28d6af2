"""LoRA adapters for a loaded pipeline: read, attach, stack, re-weight, remove.

A LoRA holds, per target layer with weight W (out × in), a down matrix A (rank × in) and an up matrix B (out × rank);
the layer then computes ``W x + strength · (alpha / rank) · B A x``. Adapters attach as forward hooks that add the
low-rank term to the layer's output, so they work on every kind of layer a pipeline may hold — float, oneDNN-packed,
int8 or 4-bit, offloaded — stack, and change strength without reloading; the base weights and ``state_dict`` are
untouched, and removing an adapter restores the exact base model (unless it was fused into the weights, see
:meth:`LoRASet.fuse`).

Formats (safetensors only; detected from the keys: diffusers / PEFT, kohya / ComfyUI, original names) are read by
:mod:`workbench.formats.lora`; this module resolves their keys to the pipeline's layers (a kohya fused q/k/v delta is
split by rows onto ``to_q``, ``to_k``, ``to_v``) and attaches them.

Entry point: ``pipe.loras`` (a :class:`LoRASet`): ``pipe.loras.load("style.safetensors", strength=0.8)``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from workbench.formats.lora import (
    COMPONENT_TITLES,
    COMPONENTS,
    DOTTED_PREFIXES,
    ORIGINAL_PREFIXES,
    UNDERSCORED_PREFIXES,
    LoRAFormatError,
    group_keys,
    lora_scale,
    metadata_alphas,
    read_lora_file,
)
from workbench.formats.original import original_module_map
from workbench.kernels import PackedLinear
from workbench.models.moe import GELUProjection

if TYPE_CHECKING:
    from workbench.pipeline import Pipeline

logger = logging.getLogger(__name__)


@dataclass
class LoRALayer:
    """One low-rank delta ``ΔW = scale · up @ down``.

    Linear: ``down`` (rank, in), ``up`` (out, rank). Convolution (the patch embedding): ``down`` (rank, in, k, k),
    ``up`` (out, rank, 1, 1), applied with the base layer's stride and padding. ``scale`` is alpha / rank (alpha /
    √rank for rank-stabilised LoRA).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    _cast: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def weights(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` on ``like``'s device and in its dtype (cached per device and dtype unless trainable)."""
        if self.down.requires_grad or self.up.requires_grad:
            return self.down.to(like.device, like.dtype), self.up.to(like.device, like.dtype)
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = (self.down.to(like.device, like.dtype), self.up.to(like.device, like.dtype))
        return self._cast[key]

    def delta(self) -> torch.Tensor:
        """The full weight delta ``(out, in)`` (or ``(out, in, k, k)``) in float32, scale included."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 4:
            return self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return self.scale * (up @ down)

    def output(self, module: nn.Module, x: torch.Tensor, strength: float) -> torch.Tensor:
        """The term this layer adds to ``module(x)``."""
        down, up = self.weights(x)
        if down.dim() == 4:
            hidden = F.conv2d(x, down, stride=module.stride, padding=module.padding)
            return F.conv2d(hidden, up) * (strength * self.scale)
        return F.linear(F.linear(x, down), up) * (strength * self.scale)


@dataclass
class LoRA:
    """A parsed LoRA: ``layers[(component, module name)]`` in this model's module names."""

    name: str
    layers: dict[tuple[str, str], LoRALayer]
    source: str = "<state dict>"
    sha256: str | None = None
    skipped: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)

    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(component == c for component, _ in self.layers))


# ------------------------------------------------------------------------------------------------------ resolving


@dataclass(frozen=True)
class _Target:
    component: str
    module: str
    chunk: int = 0
    chunks: int = 1
    swap_halves: bool = False


class _Names:
    """The module names of one pipeline, for turning a LoRA's keys into (component, module) targets."""

    def __init__(self, modules: dict[str, nn.Module | None]) -> None:

        self.modules = {c: dict(m.named_modules()) if m is not None else None for c, m in modules.items()}
        self.underscored = {
            c: {name.replace(".", "_"): name for name in names} if names is not None else None
            for c, names in self.modules.items()
        }
        transformer = modules["transformer"]
        depth = transformer.config.num_layers if hasattr(transformer, "config") else 0
        self.original = original_module_map(depth)
        self.original_underscored = {name.replace(".", "_"): name for name in self.original}

    def has(self, component: str, module: str) -> bool:
        names = self.modules[component]
        return names is not None and (module in names or _fused_gelu_parent(names, module) is not None)

    def _original(self, name: str) -> list[_Target] | None:
        if name not in self.original:
            return None
        targets, swap = self.original[name]
        return [_Target("transformer", t, i, len(targets), swap) for i, t in enumerate(targets)]

    def resolve(self, stem: str) -> list[_Target] | None:
        for prefix in ORIGINAL_PREFIXES:
            if stem.startswith(prefix):
                return self._original(stem[len(prefix) :])
        for prefix, component in DOTTED_PREFIXES.items():
            if stem.startswith(prefix):
                return [_Target(component, stem[len(prefix) :])]
        for prefix, component in UNDERSCORED_PREFIXES.items():
            if stem.startswith(prefix):
                rest = stem[len(prefix) :]
                if component == "transformer" and rest in self.original_underscored:
                    return self._original(self.original_underscored[rest])
                names = self.underscored[component]
                return [_Target(component, names.get(rest, rest) if names is not None else rest)]
        if stem in self.original:
            return self._original(stem)
        return [_Target("transformer", stem)]


def _fused_gelu_parent(names: dict[str, nn.Module], module: str) -> nn.Module | None:
    """The oneDNN linear that absorbed ``module`` (``….net.0.proj`` fused with its GELU into ``….net.0``)."""

    parent, _, leaf = module.rpartition(".")
    candidate = names.get(parent)
    return candidate if leaf == "proj" and isinstance(candidate, PackedLinear) and candidate.gelu else None


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear-like layer, (out, in) channels of a convolution, else None."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    out_features, in_features = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if out_features is None or in_features is None:
        return None
    return int(out_features), int(in_features)


def parse_lora(
    tensors: dict[str, torch.Tensor],
    modules: dict[str, nn.Module | None],
    *,
    metadata: dict[str, str] | None = None,
    name: str = "lora",
    source: str = "<state dict>",
    sha256: str | None = None,
) -> LoRA:
    """Turn a LoRA state dict into :class:`LoRA` layers for ``modules`` (``{"transformer": MMDiT, "clip_l": …}``;
    None for an absent encoder). Raises :class:`LoRAFormatError` naming the key when a key matches no module of
    the model or a shape disagrees; layers for an absent text encoder are skipped with a warning."""
    groups = group_keys(tensors, source)
    if not groups:
        raise LoRAFormatError(f"{source}: holds no LoRA tensors")
    configs = metadata_alphas(metadata or {}, source)
    names = _Names(modules)
    layers: dict[tuple[str, str], LoRALayer] = {}
    skipped: list[str] = []
    for stem, group in groups.items():
        targets = names.resolve(stem)
        if targets is None or not all(names.has(t.component, t.module) for t in targets):
            component = targets[0].component if targets else "transformer"
            if names.modules[component] is None:
                skipped.append(stem)
                continue
            raise LoRAFormatError(
                f"{source}: LoRA module {stem!r} matches no layer of this model's {COMPONENT_TITLES[component]} "
                "(a LoRA for another model family or size?)"
            )
        up = group.up
        if targets[0].swap_halves:
            up = torch.cat(up.chunk(2, dim=0)[::-1], dim=0)
        ups = up.chunk(targets[0].chunks, dim=0) if targets[0].chunks > 1 else (up,)
        for target, part in zip(targets, ups):
            module = names.modules[target.component].get(target.module)
            if module is None:
                module = _fused_gelu_parent(names.modules[target.component], target.module)
            shape = _features(module)
            if shape is None:
                raise LoRAFormatError(
                    f"{source}: LoRA module {stem!r} targets {target.module} ({type(module).__name__}), which is "
                    "not a linear or convolution layer"
                )
            if (part.shape[0], group.down.shape[1]) != shape or part.shape[0] * target.chunks != up.shape[0]:
                raise LoRAFormatError(
                    f"{source}: LoRA module {stem!r} maps {group.down.shape[1]} → {up.shape[0]} features but "
                    f"{target.module} maps {shape[1]} → {shape[0] * target.chunks} (a LoRA for another model size?)"
                )
            scale = lora_scale(group, target.component, target.module, configs)
            layers[(target.component, target.module)] = LoRALayer(group.down.float(), part.float(), scale)
    if skipped:
        logger.warning(
            "%s: %d LoRA layers target a text encoder this model does not have; skipped", source, len(skipped)
        )
    return LoRA(name, layers, source, sha256, tuple(skipped))


# ------------------------------------------------------------------------------------------------------ attaching


class _HookedModule:
    """The adapters on one layer and the forward hook that adds their outputs."""

    def __init__(self, owner: LoRASet, module: nn.Module) -> None:
        self.adapters: dict[str, LoRALayer] = {}
        self.module = module
        self.handle = module.register_forward_hook(self._hook)
        self.owner = owner
        self.fused_delta: torch.Tensor | None = None

    def delta(self) -> torch.Tensor:
        """The weight change of all adapters at their strengths, float32."""
        total = torch.zeros(())
        for name, layer in self.adapters.items():
            total = total + self.owner.strengths[name] * layer.delta().detach()
        return total

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.fused_delta is not None:
            return output
        x = args[0]
        for name, layer in self.adapters.items():
            strength = self.owner.strengths[name]
            if strength:
                output = output + layer.output(module, x, strength).to(output.dtype)
        return output


class LoRASet:
    """The LoRAs attached to one pipeline, by name, each with a strength (``pipe.loras``).

    >>> pipe.loras.load("style.safetensors", strength=0.8)     # returns the name, here "style"
    >>> pipe.loras.set_strength("style", 0.5)                  # next calls use 0.5; no reload
    >>> pipe.loras.remove("style")                             # base model restored exactly
    >>> pipe.loras.fuse()                                      # bake into the weights: no per-call cost

    Fused LoRAs stay fused through later ``load`` / ``set_strength`` / ``remove`` calls (each unfuses, changes,
    fuses again); fusing needs float weights (not int8 / 4-bit layers, where the hooks do the work).
    """

    def __init__(self, pipe: Pipeline) -> None:
        self._pipe = pipe
        self.loaded: dict[str, LoRA] = {}
        self.strengths: dict[str, float] = {}
        self._hooks: dict[tuple[str, str], _HookedModule] = {}
        self.fused = False

    def _modules(self) -> dict[str, nn.Module | None]:
        text = self._pipe.text_encoders
        return {"transformer": self._pipe.transformer, **{c: getattr(text, c, None) for c in COMPONENTS[1:]}}

    def __len__(self) -> int:
        return len(self.loaded)

    @property
    def active(self) -> dict[str, float]:
        """Name → strength of every attached LoRA."""
        return dict(self.strengths)

    def load(
        self,
        source: str | Path | dict[str, torch.Tensor],
        strength: float = 1.0,
        name: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Attach a LoRA from a ``.safetensors`` file or a state dict; returns its name (the file's stem unless
        ``name`` is given). Loading a name again replaces that LoRA."""
        strength = _check_strength(strength)
        if isinstance(source, dict):
            tensors, digest, label = source, None, "<state dict>"
            name = name or f"lora{len(self.loaded)}"
        else:
            path = Path(source)
            tensors, file_metadata, digest = read_lora_file(path)
            metadata = {**file_metadata, **(metadata or {})}
            label, name = str(path), name or path.stem
        lora = parse_lora(tensors, self._modules(), metadata=metadata, name=name, source=label, sha256=digest)
        self.attach(lora, strength)
        return name

    def attach(self, lora: LoRA, strength: float = 1.0) -> None:
        """Attach an already parsed (or freshly built, trainable) :class:`LoRA` under ``lora.name``."""
        strength = _check_strength(strength)
        with self._refusing():
            self._attach(lora, strength)

    def _attach(self, lora: LoRA, strength: float) -> None:
        if lora.name in self.loaded:
            self._remove(lora.name)
        self.strengths[lora.name] = strength
        self.loaded[lora.name] = lora
        roots = self._modules()
        names = {c: dict(root.named_modules()) for c, root in roots.items() if root is not None}
        for key, layer in lora.layers.items():
            if key not in self._hooks:
                component, module_name = key
                module = names[component].get(module_name)
                if module is None:
                    module = _unfuse_gelu(roots[component], module_name.rpartition(".")[0])
                self._hooks[key] = _HookedModule(self, module)
            self._hooks[key].adapters[lora.name] = layer

    def set_strength(self, name: str, strength: float) -> None:
        """Change one LoRA's strength (0 turns it off without removing it)."""
        if name not in self.loaded:
            raise KeyError(f"no LoRA named {name!r}; loaded: {sorted(self.loaded) or 'none'}")
        strength = _check_strength(strength)
        with self._refusing():
            self.strengths[name] = strength

    def remove(self, name: str | None = None) -> None:
        """Detach one LoRA, or all with ``name=None``."""
        with self._refusing():
            self._remove(name)

    def fuse(self) -> None:
        """Add every LoRA's delta (at its strength) to the float weights it adapts, so generation costs what the
        base model costs; :meth:`unfuse` subtracts it again (the weights come back within rounding: about 1e-7 of
        their size in float32, 1e-2 in bfloat16)."""
        if self.fused:
            return
        unfusable = [f"{c}:{m}" for (c, m), h in self._hooks.items() if not _fusable(h.module)]
        if unfusable:
            raise ValueError(
                f"cannot fuse LoRAs into quantized layers ({', '.join(unfusable[:3])}…); they keep working unfused"
            )
        for hooked in self._hooks.values():
            hooked.fused_delta = hooked.delta()
            _add_to_weight(hooked.module, hooked.fused_delta)
        self.fused = True

    def unfuse(self) -> None:
        """Undo :meth:`fuse`; the LoRAs act through their hooks again."""
        if not self.fused:
            return
        for hooked in self._hooks.values():
            if hooked.fused_delta is not None:
                _add_to_weight(hooked.module, -hooked.fused_delta)
                hooked.fused_delta = None
        self.fused = False

    @contextmanager
    def _refusing(self):
        was_fused = self.fused
        self.unfuse()
        try:
            yield
        finally:
            if was_fused:
                self.fuse()

    def _remove(self, name: str | None) -> None:
        names = list(self.loaded) if name is None else [name]
        for item in names:
            if item not in self.loaded:
                raise KeyError(f"no LoRA named {item!r}; loaded: {sorted(self.loaded) or 'none'}")
            for key in self.loaded.pop(item).layers:
                hooked = self._hooks[key]
                hooked.adapters.pop(item, None)
                if not hooked.adapters:
                    hooked.handle.remove()
                    del self._hooks[key]
            del self.strengths[item]

    def metadata(self) -> str | None:
        """``"name:strength:hash, …"`` for the PNG parameters (hash: the file's sha256, first 10 digits)."""
        if not self.loaded:
            return None
        items = []
        for name, lora in self.loaded.items():
            digest = f":{lora.sha256[:10]}" if lora.sha256 else ""
            items.append(f"{name}:{self.strengths[name]:g}{digest}")
        return ", ".join(items)

    def describe(self) -> list[dict]:
        """One row per LoRA: name, strength, rank, layers per component, source, sha256 prefix."""
        rows = []
        for name, lora in self.loaded.items():
            counts = {c: sum(1 for comp, _ in lora.layers if comp == c) for c in lora.components()}
            rows.append(
                {
                    "name": name,
                    "strength": self.strengths[name],
                    "rank": lora.rank,
                    "layers": counts,
                    "skipped": len(lora.skipped),
                    "source": lora.source,
                    "sha256": lora.sha256[:10] if lora.sha256 else None,
                }
            )
        return rows


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``"style.safetensors:0.8"`` → (path, 0.8); without ``:STRENGTH`` the strength is 1."""
    path, _, tail = spec.rpartition(":")
    try:
        strength = float(tail) if path else 1.0
    except ValueError:
        path, strength = "", 1.0
    return Path(path or spec), _check_strength(strength)


def _fusable(module: nn.Module) -> bool:

    if isinstance(module, PackedLinear):
        return True
    # exact types: bitsandbytes' layers subclass nn.Linear but hold int8 / 4-bit weights
    return type(module) in (nn.Linear, nn.Conv2d) and module.weight.is_floating_point()


def _add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:

    if isinstance(module, PackedLinear):
        module.add_to_weight(delta)
        return
    with torch.no_grad():
        module.weight.add_(delta.to(module.weight.device, module.weight.dtype))


def _check_strength(strength: float) -> float:
    value = float(strength)
    if not (-10.0 <= value <= 10.0):
        raise ValueError(f"LoRA strength must be within [-10, 10], got {strength!r}")
    return value


def _unfuse_gelu(root: nn.Module, name: str) -> nn.Module:
    """Split a oneDNN linear with fused GELU back into GELU(linear(x)) so a hook can reach the linear's output;
    returns that linear."""

    fused = root.get_submodule(name)
    if not (isinstance(fused, PackedLinear) and fused.gelu):
        raise LoRAFormatError(f"{name}.proj: no such layer to attach a LoRA to")
    with torch.device("meta"):
        replacement = GELUProjection(fused.in_features, fused.out_features)
    replacement.proj = PackedLinear(fused.dense())
    root.set_submodule(name, replacement)
    return replacement.proj
