"""ControlNets attached to a pipeline: ``pipe.controlnets.load(path, scale)``, then ``pipe(…, control_image=…)``.

The set registers itself as the pipeline extension ``controlnets`` and as a conditioning hook
(:data:`workbench.pipeline.ConditioningHook`): for a call with a ``control_image`` it encodes that image with the VAE
and, at every transformer evaluation, runs each ControlNet on the same latents, text and timestep, sums their
residuals and hands them to ``MMDiT.forward`` (``block_controls``). The semantics are those of diffusers'
``StableDiffusion3ControlNetPipeline``:

* the control image is resized to the generation size (Lanczos, as diffusers' image processor does) whatever its
  own size, encoded by the VAE and scaled by ``scaling_factor``; the shift factor is subtracted only for
  ControlNets without ``force_zeros_for_pooled_projection`` (InstantX's SD3 ControlNets were trained without it);
* ControlNets with ``force_zeros_for_pooled_projection`` get zero pooled text; image-only ones (SD3.5 Large) get no
  text and embed the latents with the transformer's ``pos_embed``;
* the residuals are multiplied by ``controlnet_conditioning_scale`` × the ControlNet's own scale and applied at step
  i of N only when ``start <= i/N`` and ``(i+1)/N <= end`` (``control_guidance_start`` / ``_end``).

One deliberate difference: diffusers draws the control latent from the VAE posterior with the unseeded global RNG;
here it is the posterior mean, so that a seed reproduces the image.

The residuals are computed lazily (:class:`LazyControls`), when the transformer's blocks first read them: an
evaluation that step caching (``cache_threshold``) skips does not run the ControlNets either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.formats.controlnet import read_controlnet
from workbench.formats.files import require_matching_keys
from workbench.models.controlnet import ControlNetConfig, SD3ControlNet, sum_controls
from workbench.models.mmdit import sincos_2d_table
from workbench.pipeline import Conditioning, Inputs, Pipeline, image_to_tensor
from workbench.settings import GenerationSettings

__all__ = ["ControlNetEntry", "ControlNetSet", "build_controlnet", "check_compatible", "file_sha256"]


@dataclass
class ControlNetEntry:
    """One attached ControlNet: its ``name``, ``model``, own ``scale`` (multiplied by the call's
    ``controlnet_conditioning_scale``), ``source`` path, file ``sha256`` and the ``preprocessor`` that made its
    control images (for the PNG metadata; set by the CLI and the app)."""

    name: str
    model: SD3ControlNet
    scale: float = 1.0
    source: str = ""
    sha256: str | None = None
    preprocessor: str | None = None


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_controlnet(config: ControlNetConfig, state: dict[str, torch.Tensor], source: str) -> SD3ControlNet:
    """An :class:`SD3ControlNet` holding ``state`` (strict key match; the position table is rebuilt when absent)."""
    with torch.device("meta"):
        model = SD3ControlNet(config)
    require_matching_keys(model, state, source, "the ControlNet config", optional={"pos_embed.pos_embed"})
    model.load_state_dict(state, strict=False, assign=True)
    if model.pos_embed is not None and model.pos_embed.pos_embed.is_meta:
        block = config.block_config()
        table = sincos_2d_table(block.inner_dim, block.pos_embed_max_size, block.sample_size // block.patch_size)
        model.pos_embed.pos_embed = table.unsqueeze(0)
    return model.eval().requires_grad_(False)


def check_compatible(model: SD3ControlNet, pipe: Pipeline, name: str) -> None:
    """ValueError naming both shapes unless the ControlNet's width, its text widths (pooled, and the sequence's for
    one with joint blocks) and its patch size and channels match the transformer's."""
    c, t = model.config, pipe.transformer.config
    if c.inner_dim != t.inner_dim:
        raise ValueError(
            f"ControlNet {name!r} does not fit this transformer: its width is {c.num_attention_heads} heads × "
            f"{c.attention_head_dim} = {c.inner_dim}, the transformer's {t.num_attention_heads} × "
            f"{t.attention_head_dim} = {t.inner_dim}"
        )
    if (c.patch_size, c.in_channels) != (t.patch_size, t.in_channels):
        raise ValueError(
            f"ControlNet {name!r} does not fit this transformer: patch size {c.patch_size} on {c.in_channels} latent "
            f"channels, the transformer's patch size {t.patch_size} on {t.in_channels}"
        )
    text_width = t.joint_attention_dim if c.joint_attention_dim is None else c.joint_attention_dim
    for what, mine, theirs in (
        ("pooled text width", c.pooled_projection_dim, t.pooled_projection_dim),
        ("text width", text_width, t.joint_attention_dim),
    ):
        if mine != theirs:
            raise ValueError(
                f"ControlNet {name!r} does not fit this transformer: its {what} is {mine}, the transformer's {theirs}"
            )
    if c.extra_conditioning_channels:
        raise ValueError(
            f"ControlNet {name!r} takes {c.extra_conditioning_channels} extra conditioning channel(s) (an inpainting "
            "ControlNet's mask); only ControlNets on the control image's latents alone are supported"
        )


class ControlNetSet:
    """The ControlNets of one pipeline, applied in the order attached (``pipe.controlnets``)."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.entries: dict[str, ControlNetEntry] = {}
        self.layout: ControlNetEntry | None = None
        """The layout ControlNet (``layout_control``): it draws each image's own layout, apart from the entries."""
        pipe.conditioning_hooks.append(self.conditioning)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ControlNetEntry]:
        return iter(self.entries.values())

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def load(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Attach the ControlNet of a diffusers folder (or a pipeline folder's ``controlnet/``) or a single
        ``.safetensors`` file (diffusers' names or Stability's); returns its name (the folder's or file's stem
        unless ``name`` is given). Loading a name again replaces it."""
        entry = self._read(path, scale, name)
        self.entries[entry.name] = entry
        return entry.name

    def load_layout(self, path: str | Path) -> str:
        """Make the ControlNet at ``path`` (as :meth:`load` reads it) the layout ControlNet: with ``layout_control``
        > 0 it gets, for each image that has a layout (``pipe.layout_source``), that layout's control image. It is
        not one of the entries (a ``control_image`` does not reach it). Returns its name."""
        self.layout = self._read(path, 1.0, None)
        return self.layout.name

    def _read(self, path: str | Path, scale: float, name: str | None) -> ControlNetEntry:
        config, state, weights = read_controlnet(path, dtype=self.pipe.dtype)
        source = str(path)
        model = build_controlnet(config, state, source)
        files = [weights] if weights.is_file() else sorted(weights.glob("*.safetensors"))
        digest = file_sha256(files[0]) if len(files) == 1 else None
        stem = Path(path).name if Path(path).is_dir() else Path(path).stem
        return self._entry_for(model, name or stem, scale, source, digest)

    def attach(
        self, model: SD3ControlNet, name: str, scale: float = 1.0, source: str = "", sha256: str | None = None
    ) -> str:
        """Attach a built :class:`SD3ControlNet` (moved to the pipeline's device and dtype) under ``name``."""
        self.entries[name] = self._entry_for(model, name, scale, source, sha256)
        return name

    def _entry_for(
        self, model: SD3ControlNet, name: str, scale: float, source: str, sha256: str | None
    ) -> ControlNetEntry:
        check_compatible(model, self.pipe, name)
        model = model.to(self.pipe.device, self.pipe.dtype)
        return ControlNetEntry(name, model, _check_scale(scale), source, sha256)

    def set_scale(self, name: str, scale: float) -> None:
        self._entry(name).scale = _check_scale(scale)

    def remove(self, name: str) -> None:
        self._entry(name)
        del self.entries[name]

    def clear(self) -> None:
        self.entries.clear()

    def _entry(self, name: str) -> ControlNetEntry:
        if name not in self.entries:
            raise KeyError(f"no ControlNet named {name!r}; attached: {self.names}")
        return self.entries[name]

    def metadata(self, settings: GenerationSettings) -> dict[str, object]:
        """The PNG ``parameters`` entries: per ControlNet ``name:scale:sha256[:10]`` and preprocessor, and the
        call's scale, start and end."""
        items = [f"{entry.name}:{entry.scale:g}{_digest(entry)}" for entry in self]
        preprocessors = [entry.preprocessor or "none" for entry in self]
        return {
            "controlnets": ", ".join(items),
            "controlnet_preprocessors": ", ".join(preprocessors) if any(e.preprocessor for e in self) else None,
            "controlnet_conditioning_scale": settings.controlnet_conditioning_scale,
            "control_guidance_start": settings.control_guidance_start or None,
            "control_guidance_end": settings.control_guidance_end if settings.control_guidance_end != 1.0 else None,
        }

    def control_latents(self, image: object, entry: ControlNetEntry, height: int, width: int) -> torch.Tensor:
        """The control image as ControlNet input ``(1, C, height/8, width/8)``: resized to the generation size,
        encoded (posterior mean) and scaled as diffusers does for this ControlNet (shift only without
        ``force_zeros_for_pooled_projection``)."""
        pixels = image_to_tensor(image, height, width)
        with torch.no_grad():
            z = self.pipe.encode_image(pixels).mode().float()
        vae = self.pipe.vae.config
        shift = 0.0 if entry.model.config.force_zeros_for_pooled_projection else (vae.shift_factor or 0.0)
        return ((z - shift) * vae.scaling_factor).to(self.pipe.device, self.pipe.dtype)

    def conditioning(self, settings: GenerationSettings, inputs: Inputs, sigmas: torch.Tensor) -> Conditioning | None:
        """The conditioning hook: the entries' residuals for a ``control_image`` (between ``control_guidance_start``
        and ``_end``) plus the layout ControlNet's for ``layout_control``; None when neither applies."""
        s = settings
        runs: list[ControlRun] = []
        parameters: dict[str, object] = {}
        if self.entries and inputs.control_image is not None:
            runs.append(self._entry_runs(s, inputs.control_image, sigmas))
            parameters.update(self.metadata(s))
        if self.layout is not None and s.layout_control:
            layout_run = self._layout_run(self.layout, s, inputs.layouts or [])
            if layout_run is not None:
                runs.append(layout_run)
            parameters["layout_controlnet"] = f"{self.layout.name}{_digest(self.layout)}"
        if not parameters:
            return None

        def kwargs(x: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor) -> dict:
            active = [run for run in runs if run.active(timestep)]
            if not active:
                return {}
            return {
                "block_controls": LazyControls(
                    lambda: sum_controls([run.run(x, embeds, pooled, timestep) for run in active])
                )
            }

        return Conditioning(kwargs, parameters)

    def _entry_runs(self, s: GenerationSettings, images: object, sigmas: torch.Tensor) -> ControlRun:
        """The attached entries on the call's control image(s), summed, active between start and end."""
        entries = list(self)
        images = list(images) if isinstance(images, (list, tuple)) else [images] * len(entries)
        if len(images) != len(entries):
            raise ValueError(
                f"control_image lists {len(images)} images for {len(entries)} ControlNets ({', '.join(self.names)})"
            )
        latents = [self.control_latents(img, e, s.height, s.width) for img, e in zip(images, entries)]
        steps = len(sigmas) - 1
        step_timesteps = torch.tensor([float(sigma) * 1000.0 for sigma in sigmas[:-1]])
        start, end, scale = s.control_guidance_start, s.control_guidance_end, s.controlnet_conditioning_scale

        def active(timestep: torch.Tensor) -> bool:
            step = int((step_timesteps - float(timestep.reshape(-1)[0])).abs().argmin())
            return not (step / steps < start or (step + 1) / steps > end)

        def run(x: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor) -> list:
            controls = [
                self._residuals(entry, x, control, embeds, pooled, timestep, entry.scale * scale)
                for entry, control in zip(entries, latents)
            ]
            return sum_controls(controls)

        return ControlRun(run, active)

    def _layout_run(
        self, entry: ControlNetEntry, s: GenerationSettings, layouts: Sequence[object]
    ) -> ControlRun | None:
        """The layout ControlNet ``entry`` on each image's own layout control image (images without one: no
        residual), at every step; None when no image has a layout."""
        controls = [getattr(layout, "control", None) for layout in layouts]
        known = [i for i, control in enumerate(controls) if control is not None]
        if not known:
            return None
        latents = [self.control_latents(controls[i], entry, s.height, s.width) for i in known]
        per_image = torch.zeros(len(controls), *latents[0].shape[1:], device=latents[0].device, dtype=latents[0].dtype)
        per_image[known] = torch.cat(latents)
        keep = torch.zeros(len(controls), 1, 1, device=per_image.device, dtype=per_image.dtype)
        keep[known] = 1.0

        def run(x: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor) -> list:
            repeats = x.shape[0] // len(controls)  # [negatives; positives], each in image order
            residuals = self._residuals(
                entry, x, per_image.repeat(repeats, 1, 1, 1), embeds, pooled, timestep, s.layout_control
            )
            mask = keep.repeat(repeats, 1, 1).to(x.dtype)
            return [r * mask for r in residuals]

        return ControlRun(run, lambda timestep: True)

    def _residuals(
        self,
        entry: ControlNetEntry,
        x: torch.Tensor,
        control: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        timestep: torch.Tensor,
        scale: float,
    ) -> list[torch.Tensor]:
        """``entry``'s residuals for latents ``x (B, …)`` and ``control`` (1 or B, C, h, w)."""
        config = entry.model.config
        return entry.model(
            x,
            control.expand(x.shape[0], -1, -1, -1).to(x.dtype),
            embeds if config.joint_attention_dim is not None else None,
            torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
            timestep,
            scale,
            pos_embed=self.pipe.transformer.pos_embed,
        )


@dataclass
class ControlRun:
    """One source of ControlNet residuals in a generation: ``run(x, embeds, pooled, timestep)`` → residual list,
    and ``active(timestep)``: whether it applies at that evaluation."""

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]
    active: Callable[[torch.Tensor], bool]


class LazyControls(Sequence[torch.Tensor]):
    """The summed ControlNet residuals of one transformer evaluation, computed at their first use: when step
    caching (:mod:`workbench.step_cache`) reuses the last residual, the transformer never reads its
    ``block_controls`` and the ControlNets do not run. ``compute()`` returns the list of residuals."""

    def __init__(self, compute: Callable[[], list[torch.Tensor]]) -> None:
        self._compute: Callable[[], list[torch.Tensor]] | None = compute
        self._controls: list[torch.Tensor] = []

    @property
    def computed(self) -> bool:
        return self._compute is None

    def _get(self) -> list[torch.Tensor]:
        if self._compute is not None:
            self._controls, self._compute = self._compute(), None
        return self._controls

    def __len__(self) -> int:
        return len(self._get())

    def __getitem__(self, index):  # noqa: ANN001 - Sequence's int or slice
        return self._get()[index]


def _digest(entry: ControlNetEntry) -> str:
    """``":<first 10 hex of sha256>"`` for the PNG metadata, or "" when the file's digest is unknown."""
    return f":{entry.sha256[:10]}" if entry.sha256 else ""


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 10:
        raise ValueError(f"ControlNet scale must be a number in [0, 10], got {scale!r}")
    return float(scale)


def parse_controlnet_arg(text: str) -> tuple[str, float]:
    """``"PATH[:SCALE]"`` → ``(path, scale)`` (the CLI's ``--controlnet``); a colon not followed by a number
    belongs to the path."""
    path, _, tail = text.rpartition(":")
    if path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def attach_all(pipe: Pipeline, controlnets: str | Path | Sequence[str | Path]) -> None:
    """Load ``controlnets`` (one path or several; ``PATH:SCALE`` allowed) into ``pipe.controlnets``."""
    items = [controlnets] if isinstance(controlnets, (str, Path)) else list(controlnets)
    for item in items:
        path, scale = parse_controlnet_arg(str(item))
        pipe.controlnets.load(path, scale)


Pipeline.extensions["controlnets"] = ControlNetSet
