"""SD3-style KL autoencoder, parameter-for-parameter compatible with diffusers' ``AutoencoderKL``.

Conventions:

* Images are ``(B, 3, H, W)`` tensors in ``[-1, 1]``.
* Raw latents are ``(B, latent_channels, H / f, W / f)`` with ``f = 2 ** (len(block_out_channels) - 1)``
  (``f = 8`` and 16 channels for SD3). ``encode`` returns and ``decode`` consumes raw (unscaled) latents.
* The diffusion model works on scaled latents, ``scale_latents(z) = (z - shift_factor) * scaling_factor``;
  ``unscale_latents`` is its inverse.

Module and parameter names mirror diffusers (``encoder.down_blocks.0.resnets.0.norm1.weight``,
``decoder.mid_block.attentions.0.to_out.0.weight``, ...), so a diffusers state dict loads with ``strict=True``
and no renaming. Old-style attention names (``query``/``key``/``value``/``proj_attn``) and original LDM
checkpoint names are not converted here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "mish": nn.Mish,
}

# SD3 latent -> RGB factors (16 x 3) and bias, as published in ComfyUI's `comfy/latent_formats.py` (class SD3).
# They map *scaled* latents, (z - 0.0609) * 1.5305, to approximately [-1, 1] RGB.
SD3_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
SD3_LATENT_RGB_BIAS: tuple[float, float, float] = (0.2394, 0.2135, 0.1925)


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unsupported act_fn {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


@dataclass
class VAEConfig:
    """Configuration of :class:`AutoencoderKL`, using diffusers' ``config.json`` field names.

    Defaults are the SD3 VAE. ``tile_sample_size`` (pixels), ``tile_overlap_factor`` and ``tile_threshold``
    (latent side above which ``tiled=None`` tiles) are workbench additions; diffusers ignores them.
    ``down_block_types``/``up_block_types`` default to one ``DownEncoderBlock2D``/``UpDecoderBlock2D`` per level.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] | None = None
    up_block_types: tuple[str, ...] | None = None
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 16
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 1024
    scaling_factor: float = 1.5305
    shift_factor: float | None = 0.0609
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    tile_sample_size: int = 512
    tile_overlap_factor: float = 0.25
    tile_threshold: int = 96
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        if isinstance(self.sample_size, list):
            self.sample_size = tuple(self.sample_size)
        levels = len(self.block_out_channels)
        if self.down_block_types is None:
            self.down_block_types = ("DownEncoderBlock2D",) * levels
        if self.up_block_types is None:
            self.up_block_types = ("UpDecoderBlock2D",) * levels
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError("down_block_types and up_block_types must have one entry per block_out_channels entry")
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ValueError(f"only DownEncoderBlock2D is supported, got {self.down_block_types}")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ValueError(f"only UpDecoderBlock2D is supported, got {self.up_block_types}")
        if self.act_fn.lower() not in _ACTIVATIONS:
            raise ValueError(f"unsupported act_fn {self.act_fn!r}")
        if not 0.0 <= self.tile_overlap_factor < 1.0:
            raise ValueError("tile_overlap_factor must be in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between image and latent, ``2 ** (levels - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Build from a diffusers-style config dict; unknown keys (``_class_name``, ...) go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "extra"}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the config fields (tuples become lists, ``extra`` is left out)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class LatentDistribution:
    """Diagonal Gaussian posterior over raw latents, matching diffusers' ``DiagonalGaussianDistribution``.

    ``parameters`` is ``(B, 2 * C, h, w)``: mean then log-variance along dim 1; log-variance is clamped to
    ``[-30, 20]``.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """Draw ``mean + std * eps``; ``(B, C, h, w)``.

        ``eps`` is drawn with ``torch.randn`` on the generator's device in the parameters' dtype, then moved to the
        parameters' device, exactly as diffusers' ``randn_tensor`` does; a list of generators draws one batch
        element each.
        """
        device, dtype = self.parameters.device, self.parameters.dtype
        shape = tuple(self.mean.shape)
        if isinstance(generator, Sequence) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, Sequence):
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for batch size {shape[0]}")
            eps = torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
            ).to(device)
        else:
            rand_device = generator.device if generator is not None else device
            eps = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The posterior mean, ``(B, C, h, w)``."""
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to the standard normal, summed over ``(C, h, w)``; shape ``(B,)``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv residual block without time embedding (diffusers ``ResnetBlock2D``, temb=None)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, act_fn: str) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = _activation(act_fn)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all ``h * w`` positions with a residual (diffusers mid-block ``Attention``)."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hidden = self.group_norm(x.reshape(b, c, h * w)).transpose(1, 2)
        q = self.to_q(hidden).view(b, -1, 1, c).transpose(1, 2)
        k = self.to_k(hidden).view(b, -1, 1, c).transpose(1, 2)
        v = self.to_v(hidden).view(b, -1, 1, c).transpose(1, 2)
        del hidden
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        del q, k, v
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock2D(nn.Module):
    """``resnet -> [attention] -> resnet`` at the lowest resolution (diffusers ``UNetMidBlock2D``, 1 layer)."""

    def __init__(self, channels: int, groups: int, eps: float, act_fn: str, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, eps, act_fn) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, eps)] if add_attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if len(self.attentions) > 0:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (diffusers ``Downsample2D``, padding=0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (diffusers ``Upsample2D``, use_conv=True)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() * 2 > 2**31:
            # upsample_nearest_nhwc fails on very large non-contiguous inputs (pytorch#141831).
            x = x.contiguous()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float, act_fn: str, down: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps, act_fn)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if down else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float, act_fn: str, up: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps, act_fn)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if up else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> moments ``(B, 2 * latent_channels, H / f, W / f)``."""

    def __init__(self, config: VAEConfig, eps: float = 1e-6) -> None:
        super().__init__()
        ch = config.block_out_channels
        groups, act = config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(
                    ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, eps, act, down=i < len(ch) - 1
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock2D(ch[-1], groups, eps, act, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=eps)
        self.conv_act = _activation(act)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents ``(B, latent_channels, h, w)`` -> image ``(B, out_channels, h * f, w * f)``."""

    def __init__(self, config: VAEConfig, eps: float = 1e-6) -> None:
        super().__init__()
        rev = tuple(reversed(config.block_out_channels))
        groups, act = config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.latent_channels, rev[0], kernel_size=3, stride=1, padding=1)
        self.mid_block = MidBlock2D(rev[0], groups, eps, act, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(
                    rev[max(i - 1, 0)], rev[i], config.layers_per_block + 1, groups, eps, act, up=i < len(rev) - 1
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=eps)
        self.conv_act = _activation(act)
        self.conv_out = nn.Conv2d(rev[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def _tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spread ``(start, end)`` tiles of size ``tile`` over ``[0, length)``; neighbours overlap >= overlap."""
    if length <= tile:
        return [(0, length)]
    stride = max(tile - overlap, 1)
    n = math.ceil((length - tile) / stride) + 1
    return [(s, s + tile) for s in (round(i * (length - tile) / (n - 1)) for i in range(n))]


def _blend_weights(spans: list[tuple[int, int]], index: int, scale: int) -> Tensor:
    """1-D weights (in output units) for tile ``index``: linear ramps across the overlaps with its neighbours."""
    start, end = spans[index]
    size = (end - start) * scale
    pos = torch.arange(size, dtype=torch.float64) + 0.5
    w = torch.ones(size, dtype=torch.float64)
    if index > 0:
        ramp = (spans[index - 1][1] - start) * scale
        if ramp > 0:
            w = torch.minimum(w, (pos / ramp).clamp(max=1.0))
    if index < len(spans) - 1:
        ramp = (end - spans[index + 1][0]) * scale
        if ramp > 0:
            w = torch.minimum(w, ((size - pos) / ramp).clamp(max=1.0))
    return w


class AutoencoderKL(nn.Module):
    """SD3-style KL autoencoder with diffusers-compatible parameter names.

    Tiling: ``encode``/``decode`` with ``tiled=True`` (or ``None`` above ``tile_threshold`` latent pixels) process
    overlapping tiles of ``tile_sample_size`` pixels (``tile_sample_size / f`` latents) whose neighbours overlap by at
    least ``tile_overlap_factor`` of a tile; tiles are spread evenly so every tile is full size, and overlaps are
    cross-faded with linear ramps (the weighted-average form of diffusers' ``blend_v``/``blend_h``). GroupNorm and
    mid-block attention see one tile at a time, so tiled results differ slightly from untiled ones. The attributes
    ``tile_sample_size``, ``tile_overlap_factor`` and ``tile_threshold`` start from the config and may be changed.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VAEConfig()
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.tile_sample_size = c.tile_sample_size
        self.tile_overlap_factor = c.tile_overlap_factor
        self.tile_threshold = c.tile_threshold

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _moments(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode_raw(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _tile_latent_sizes(self) -> tuple[int, int]:
        tile = max(self.tile_sample_size // self.downsample_factor, 1)
        return tile, int(tile * self.tile_overlap_factor)

    def _use_tiling(self, tiled: bool | None, latent_h: int, latent_w: int) -> bool:
        if tiled is None:
            return max(latent_h, latent_w) > self.tile_threshold
        return tiled

    def encode(self, x: Tensor, *, tiled: bool | None = None) -> LatentDistribution:
        """Encode images ``(B, 3, H, W)`` in ``[-1, 1]`` into the posterior over raw latents ``(B, C, H/f, W/f)``.

        ``tiled=None`` tiles when the latent side exceeds ``tile_threshold``.
        """
        f = self.downsample_factor
        if self._use_tiling(tiled, x.shape[-2] // f, x.shape[-1] // f):
            return LatentDistribution(self._tiled_moments(x))
        return LatentDistribution(self._moments(x))

    def decode(self, z: Tensor, *, tiled: bool | None = None) -> Tensor:
        """Decode raw (unscaled) latents ``(B, C, h, w)`` into images ``(B, 3, h*f, w*f)`` (roughly ``[-1, 1]``).

        ``tiled=None`` tiles when the latent side exceeds ``tile_threshold``.
        """
        if self._use_tiling(tiled, z.shape[-2], z.shape[-1]):
            return self._tiled_decode(z)
        return self._decode_raw(z)

    def forward(self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruct images ``(B, 3, H, W)`` through the posterior mode (or a sample)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> diffusion-space latents: ``(z - shift_factor) * scaling_factor``."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion-space latents -> raw latents: ``z / scaling_factor + shift_factor``."""
        return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def _tiled_moments(self, x: Tensor) -> Tensor:
        f = self.downsample_factor
        height, width = x.shape[-2:]
        lat_h, lat_w = height // f, width // f
        tile, overlap = self._tile_latent_sizes()
        spans_h, spans_w = _tile_spans(lat_h, tile, overlap), _tile_spans(lat_w, tile, overlap)
        if len(spans_h) == 1 and len(spans_w) == 1:
            return self._moments(x)
        out = None
        weight_sum = torch.zeros(lat_h, lat_w, dtype=torch.float64)
        for i, (h0, h1) in enumerate(spans_h):
            wh = _blend_weights(spans_h, i, 1)
            for j, (w0, w1) in enumerate(spans_w):
                px_h1 = h1 * f if h1 < lat_h else height
                px_w1 = w1 * f if w1 < lat_w else width
                moments = self._moments(x[..., h0 * f : px_h1, w0 * f : px_w1])
                if out is None:
                    out_dtype = moments.dtype
                    out = torch.zeros((*moments.shape[:2], lat_h, lat_w), dtype=torch.float32, device=moments.device)
                weight = wh[:, None] * _blend_weights(spans_w, j, 1)[None, :]
                weight_sum[h0:h1, w0:w1] += weight
                out[..., h0:h1, w0:w1] += moments.float() * weight.to(out.device, torch.float32)
        out /= weight_sum.to(out.device, torch.float32)
        return out.to(out_dtype)

    def _tiled_decode(self, z: Tensor) -> Tensor:
        f = self.downsample_factor
        lat_h, lat_w = z.shape[-2:]
        tile, overlap = self._tile_latent_sizes()
        spans_h, spans_w = _tile_spans(lat_h, tile, overlap), _tile_spans(lat_w, tile, overlap)
        if len(spans_h) == 1 and len(spans_w) == 1:
            return self._decode_raw(z)
        out = None
        weight_sum = torch.zeros(lat_h * f, lat_w * f, dtype=torch.float64)
        for i, (h0, h1) in enumerate(spans_h):
            wh = _blend_weights(spans_h, i, f)
            for j, (w0, w1) in enumerate(spans_w):
                image = self._decode_raw(z[..., h0:h1, w0:w1])
                if out is None:
                    out_dtype = image.dtype
                    out = torch.zeros(
                        (*image.shape[:2], lat_h * f, lat_w * f), dtype=torch.float32, device=image.device
                    )
                weight = wh[:, None] * _blend_weights(spans_w, j, f)[None, :]
                weight_sum[h0 * f : h1 * f, w0 * f : w1 * f] += weight
                out[..., h0 * f : h1 * f, w0 * f : w1 * f] += image.float() * weight.to(out.device, torch.float32)
                del image
        out /= weight_sum.to(out.device, torch.float32)
        return out.to(out_dtype)


def latent_to_rgb_preview(
    latents: Tensor,
    factors: Tensor | Sequence[Sequence[float]] | None = None,
    bias: Tensor | Sequence[float] | None = None,
    *,
    as_pil: bool = False,
) -> np.ndarray | list[Any]:
    """Cheap latent -> RGB preview at latent resolution.

    ``latents``: ``(B, C, h, w)`` in diffusion (scaled) space, as inside the sampling loop; use
    ``vae.scale_latents(z)`` for raw latents. ``factors``: ``(C, 3)``, ``bias``: ``(3,)``; default to the SD3
    factors. The projection gives RGB in about ``[-1, 1]``, mapped to ``[0, 255]``.

    Returns uint8 ``(B, h, w, 3)`` numpy array, or a list of ``B`` PIL images if ``as_pil``.
    """
    factors = torch.as_tensor(SD3_LATENT_RGB_FACTORS if factors is None else factors, dtype=torch.float32)
    bias = torch.as_tensor(SD3_LATENT_RGB_BIAS if bias is None else bias, dtype=torch.float32)
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(f"expected latents (B, {factors.shape[0]}, h, w), got {tuple(latents.shape)}")
    lat = latents.detach().to(torch.float32)
    rgb = torch.einsum("bchw,ck->bhwk", lat, factors.to(lat.device)) + bias.to(lat.device)
    arr = ((rgb + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    if as_pil:
        from PIL import Image

        return [Image.fromarray(a, mode="RGB") for a in arr]
    return arr


def fit_latent_rgb_factors(latents: Tensor, images: Tensor, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
    """Least-squares fit of ``rgb ≈ latents^T @ matrix + bias`` for :func:`latent_to_rgb_preview`.

    ``latents``: ``(B, C, h, w)`` in the space the preview will see (usually scaled); ``images``: ``(B, 3, H, W)`` in
    ``[-1, 1]``, area-downsampled to ``(h, w)``. ``ridge`` adds an L2 penalty on the matrix (not the bias).
    Returns ``matrix (C, 3)`` and ``bias (3,)`` as float32 CPU tensors.
    """
    if latents.ndim != 4 or images.ndim != 4 or latents.shape[0] != images.shape[0]:
        raise ValueError("expected latents (B, C, h, w) and images (B, 3, H, W) with the same batch size")
    h, w = latents.shape[-2:]
    target = images.detach().to(torch.float64)
    if target.shape[-2:] != (h, w):
        target = F.adaptive_avg_pool2d(target, (h, w))
    c = latents.shape[1]
    x = latents.detach().to(torch.float64).permute(0, 2, 3, 1).reshape(-1, c).cpu()
    y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]).cpu()
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = design.T @ design
    gram[:c, :c] += ridge * torch.eye(c, dtype=torch.float64)
    solution = torch.linalg.lstsq(gram, design.T @ y).solution
    return solution[:c].to(torch.float32), solution[c].to(torch.float32)
