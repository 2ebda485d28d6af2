"""ShapesWorld scenes rasterised in torch, batched, on any device (the training device itself).

The PIL renderer (:func:`workbench.shapesworld.world.render`) draws each scene at 4× and box-filters it down; here
every object is a signed-distance field evaluated at the pixel centres and turned into coverage with a one-pixel ramp,
which is the same anti-aliasing up to the shape of the filter. Scenes come from the same sampler
(:func:`world.sample_scene`); only the pixels are made differently, so captions, attributes and the data contract
are shared.

Conventions:
- pixel ``(i, j)`` covers ``[j, j + 1) × [i, i + 1)`` in canvas coordinates, its centre is ``(j + ½, i + ½)``; an
  object centred at fractions ``(cx, cy)`` sits at ``(cx·W, cy·H)``, its radius is ``r·min(H, W)`` pixels (world.py);
- signed distances are in pixels, negative inside;
- :func:`rasterize` returns images ``(B, 3, H, W)`` as float in [0, 255], rounded to whole levels like a PNG, and
  the coverage of every object slot ``(B, MAX_OBJECTS, H, W)`` in [0, 1] (zeros for an empty slot).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.shapesworld.world import (
    PALETTE_BACKGROUNDS,
    PALETTE_OBJECTS,
    SHAPES,
    STAR_INNER,
    Scene,
    uint8_to_unit,
)

MAX_OBJECTS = 2
_SHAPE_INDEX = {name: i for i, name in enumerate(SHAPES)}


@dataclass
class SceneTensors:
    """A batch of scenes as tensors: ``shape (B, MAX_OBJECTS)`` long (index into SHAPES, −1 = no object),
    ``colour (B, MAX_OBJECTS, 3)`` and ``background (B, 3)`` as 0–255 floats, ``centre (B, MAX_OBJECTS, 2)`` and
    ``radius (B, MAX_OBJECTS)`` in pixels (x, y), for a canvas of ``height × width``."""

    shape: torch.Tensor
    colour: torch.Tensor
    background: torch.Tensor
    centre: torch.Tensor
    radius: torch.Tensor
    height: int
    width: int

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene], device: torch.device | str = "cpu") -> SceneTensors:
        """Pack scenes of one canvas size (raises ValueError for mixed sizes or more than MAX_OBJECTS objects)."""
        sizes = {(s.height, s.width) for s in scenes}
        if len(sizes) != 1:
            raise ValueError(f"scenes of one batch must share a canvas size, got {sorted(sizes)}")
        height, width = sizes.pop()
        side = min(height, width)
        shape, colour, centre, radius = [], [], [], []
        for scene in scenes:
            if len(scene.objects) > MAX_OBJECTS:
                raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, got {len(scene.objects)}")
            empty = MAX_OBJECTS - len(scene.objects)
            shape.append([_SHAPE_INDEX[o.shape] for o in scene.objects] + [-1] * empty)
            colour.append([PALETTE_OBJECTS[o.colour] for o in scene.objects] + [(0, 0, 0)] * empty)
            centre.append([(o.cx * width, o.cy * height) for o in scene.objects] + [(0.0, 0.0)] * empty)
            radius.append([o.r * side for o in scene.objects] + [0.0] * empty)
        background = [PALETTE_BACKGROUNDS[s.background] for s in scenes]
        return cls(
            torch.tensor(shape, dtype=torch.long, device=device).reshape(-1, MAX_OBJECTS),
            torch.tensor(colour, dtype=torch.float32, device=device).reshape(-1, MAX_OBJECTS, 3),
            torch.tensor(background, dtype=torch.float32, device=device).reshape(-1, 3),
            torch.tensor(centre, dtype=torch.float32, device=device).reshape(-1, MAX_OBJECTS, 2),
            torch.tensor(radius, dtype=torch.float32, device=device).reshape(-1, MAX_OBJECTS),
            height,
            width,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SceneTensors:
        """The same scenes with every tensor on ``device``."""
        move = dict(device=device, non_blocking=non_blocking)
        return SceneTensors(
            self.shape.to(**move),
            self.colour.to(**move),
            self.background.to(**move),
            self.centre.to(**move),
            self.radius.to(**move),
            self.height,
            self.width,
        )


def polygon_vertices(shape: str, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Vertices ``(M, K, 2)`` of M triangles (K = 3) or stars (K = 10) with centres ``(M, 2)`` and radii ``(M,)``;
    the same outlines as :func:`world.shape_polygon` (apex / one point straight up, y downwards)."""
    if shape == "triangle":
        unit = torch.tensor([[0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    elif shape == "star":
        k = torch.arange(10, dtype=torch.float64)
        scale = torch.where(k % 2 == 0, 1.0, STAR_INNER)
        angle = math.pi * k / 5
        unit = torch.stack([scale * torch.sin(angle), -scale * torch.cos(angle)], dim=1).float()
    else:
        raise ValueError(f"no polygon for shape {shape!r}; polygons are 'triangle' and 'star'")
    unit = unit.to(centre.device, centre.dtype)
    return centre[:, None, :] + radius[:, None, None] * unit[None]


def polygon_sdf(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Signed distance ``(M, P)`` from points ``(P, 2)`` to closed polygons ``(M, K, 2)`` (negative inside; exact
    for any simple polygon: the distance to the nearest edge, the sign from the even-odd crossing rule)."""
    p = points[None, :, None, :]  # (1, P, 1, 2)
    start = vertices[:, None, :, :]  # (M, 1, K, 2)
    edge = torch.roll(vertices, -1, dims=1)[:, None] - start
    offset = p - start
    along = ((offset * edge).sum(-1) / (edge * edge).sum(-1)).clamp(0, 1)
    distance = (offset - edge * along[..., None]).pow(2).sum(-1).min(dim=-1).values.sqrt()
    y, y0, y1 = p[..., 1], start[..., 1], start[..., 1] + edge[..., 1]
    straddles = (y0 <= y) != (y1 <= y)
    x_cross = start[..., 0] + (y - y0) / torch.where(edge[..., 1] == 0, 1.0, edge[..., 1]) * edge[..., 0]
    crossings = (straddles & (p[..., 0] < x_cross)).sum(-1)
    return torch.where(crossings % 2 == 1, -distance, distance)


def shape_sdf(shape: str, points: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance ``(M, P)`` from points ``(P, 2)`` to M shapes of one kind with centres ``(M, 2)``, radii
    ``(M,)`` (pixels)."""
    offset = points[None] - centre[:, None]
    if shape == "circle":
        return offset.norm(dim=-1) - radius[:, None]
    if shape == "square":
        q = offset.abs() - radius[:, None, None]
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)
    return polygon_sdf(points, polygon_vertices(shape, centre, radius))


def pixel_centres(height: int, width: int, device: torch.device | str) -> torch.Tensor:
    """``(H·W, 2)`` pixel-centre coordinates (x, y), row-major."""
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def object_coverage(scenes: SceneTensors) -> torch.Tensor:
    """Coverage ``(B, MAX_OBJECTS, H, W)`` in [0, 1] of every object slot: ``clamp(½ − sdf, 0, 1)``.

    Each object's field is evaluated only on a square window around it (the side fits the largest radius of the
    batch plus the one-pixel ramp, shifted to lie inside the canvas) and then placed on the canvas."""
    height, width = scenes.height, scenes.width
    device = scenes.centre.device
    flat_shape = scenes.shape.reshape(-1)
    flat_centre = scenes.centre.reshape(-1, 2)
    flat_radius = scenes.radius.reshape(-1)
    cover = torch.zeros(flat_shape.shape[0], height, width, device=device)
    present = (flat_shape >= 0).nonzero().reshape(-1)
    if not present.numel():
        return cover.reshape(*scenes.shape.shape, height, width)
    side = min(height, width, 2 * math.ceil(float(flat_radius[present].max())) + 4)
    limit = torch.tensor([width - side, height - side], device=device)
    origin = (flat_centre - side / 2).floor().long().clamp(min=0)
    origin = torch.minimum(origin, limit)  # (M, 2) top-left pixel (x, y) of each window
    local = pixel_centres(side, side, device)  # (side², 2)
    offsets = torch.arange(side, device=device)
    for index, name in enumerate(SHAPES):
        rows = present[flat_shape[present] == index]
        if not rows.numel():
            continue
        # Distances in window coordinates: the same field with the centre moved by the window's origin.
        sdf = shape_sdf(name, local, flat_centre[rows] - origin[rows].float(), flat_radius[rows])
        ys = (origin[rows, 1, None] + offsets)[:, :, None].expand(-1, side, side)
        xs = (origin[rows, 0, None] + offsets)[:, None, :].expand(-1, side, side)
        slots = rows[:, None, None].expand(-1, side, side)
        cover[slots, ys, xs] = (0.5 - sdf).clamp(0, 1).reshape(-1, side, side)
    return cover.reshape(*scenes.shape.shape, height, width)


def rasterize(scenes: SceneTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 3, H, W)`` (float 0–255, whole levels) and object coverage ``(B, MAX_OBJECTS, H, W)``."""
    cover = object_coverage(scenes)
    image = scenes.background[:, :, None, None].expand(-1, -1, scenes.height, scenes.width).clone()
    for slot in range(MAX_OBJECTS):
        alpha = cover[:, slot, None]
        image = image * (1 - alpha) + scenes.colour[:, slot, :, None, None] * alpha
    return image.round_(), cover


def render_scenes(scenes: Sequence[Scene], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rasterize` of scenes: images ``(B, 3, H, W)`` in [−1, 1] and coverage ``(B, MAX_OBJECTS, H, W)``."""
    images, cover = rasterize(SceneTensors.from_scenes(scenes, device))
    return uint8_to_unit(images), cover
