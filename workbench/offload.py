"""Offload: weights live on the offload device (the CPU) and move to the execution device only while they run.

``"model"`` keeps each component (every text encoder, the transformer, the VAE) on the execution device only while it
runs; ``"sequential"`` moves one block at a time (forward pre-hooks load it, forward hooks put it back). Both give the
same numbers as no offload: the computation itself is unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from workbench.pipeline import Pipeline

OFFLOADS = (None, "model", "sequential")
_offloaders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    if mode not in OFFLOADS or mode is None:
        raise ValueError(f"offload must be 'model' or 'sequential' to enable offload, got {mode!r}")
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
