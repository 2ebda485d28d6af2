"""ShapesWorld: procedural scenes of flat shapes and their captions (data contract: docs/design.md, ShapesWorld).

Conventions:
- A scene is H x W pixels (H, W in CANVAS_SIZES; 128 x 128 by default) with one flat background colour.
- Object geometry is stored as fractions: ``cx`` of W, ``cy`` of H and ``r`` of min(H, W). In pixels an object spans the
  square [cx*W - r_px, cx*W + r_px] x [cy*H - r_px, cy*H + r_px] with r_px = r * min(H, W); y grows downwards.
- Images are PIL RGB images; ``make_batch`` returns float tensors (B, 3, H, W) in [-1, 1].
- Everything random takes an explicit ``random.Random`` or ``numpy.random.Generator``: the same seed gives the same
  pixels and captions.
- Tokenisation assumed by ``vocabulary``/``tokenize``: lower-case, split on whitespace, "," and ":" are separate tokens.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

PALETTE_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (24, 24, 24),
}
PALETTE_OBJECTS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "orange": (245, 140, 30),
    "yellow": (235, 205, 40),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 70, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.11), "large": (0.17, 0.21)}
ANY_SIZE: tuple[float, float] = (0.08, 0.21)
TWO_OBJECT_SIZE: tuple[float, float] = (0.09, 0.14)
LARGE_THRESHOLD = 0.14
POSITION_JITTER = 0.05
NEAR_RANGE: tuple[float, float] = (0.20, 0.32)
FAR_RANGE: tuple[float, float] = (0.68, 0.80)
FREE_RANGE: tuple[float, float] = (0.25, 0.75)
CANVAS_SIZES: tuple[int, ...] = (96, 128, 160)
STAR_INNER = 0.45
SUPERSAMPLE = 4

ONE_KEYS: tuple[str, ...] = ("colour", "shape", "position", "size", "background")
TWO_KEYS: tuple[str, ...] = ("colour_a", "shape_a", "relation", "colour_b", "shape_b", "background")

CAPTION_STYLES: tuple[str, ...] = ("canonical", "any")
STYLE_WEIGHTS: dict[str, float] = {"canonical": 0.60, "paraphrase": 0.20, "partial": 0.15, "empty": 0.05}

_TOKEN_RE = re.compile(r"[a-z]+|[,:]")


@dataclass
class ShapeSpec:
    """One object: ``shape`` in SHAPES, ``colour`` in PALETTE_OBJECTS; cx, cy fractions of W, H; r of min(H, W)."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float


@dataclass
class Scene:
    """A scene and its caption; ``attributes`` holds what the caption states (None where it states nothing).

    One object: keys ONE_KEYS; two objects: keys TWO_KEYS. ``kind`` is "one" or "two" (what is drawn).
    """

    height: int
    width: int
    background: str
    objects: list[ShapeSpec]
    caption: str
    kind: str
    attributes: dict[str, Any] = field(default_factory=dict)


class _Rng:
    """Uniform draws from either a ``random.Random`` or a ``numpy.random.Generator``."""

    def __init__(self, rng: random.Random | np.random.Generator | int | None) -> None:
        if rng is None or isinstance(rng, int):
            rng = random.Random(rng)
        self._rng = rng

    def random(self) -> float:
        return float(self._rng.random())

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def index(self, n: int) -> int:
        return min(int(self.random() * n), n - 1)

    def choice(self, options: Any) -> Any:
        options = list(options)
        return options[self.index(len(options))]

    def weighted(self, weights: dict[str, float]) -> str:
        u = self.random() * sum(weights.values())
        for name, weight in weights.items():
            u -= weight
            if u < 0:
                return name
        return name


# ----------------------------------------------------------------------------------------------------------- captions


def tokenize(caption: str) -> list[str]:
    """Split a caption into tokens: lower-case words, with "," and ":" as tokens of their own."""
    return _TOKEN_RE.findall(caption.lower())


def vocabulary() -> list[str]:
    """Every token any caption (canonical, paraphrase, partial, empty) can contain, sorted (see ``tokenize``)."""
    words = {",", ":", "a", "at", "the", "on", "background", "with", "in", "and", "shape"}
    words |= set(PALETTE_BACKGROUNDS) | set(PALETTE_OBJECTS) | set(SHAPES) | set(SIZES)
    for phrase in (*POSITIONS, *RELATIONS):
        words |= set(phrase.split())
    return sorted(words)


def canonical_caption_one(colour: str, shape: str, position: str, background: str, size: str | None = None) -> str:
    """``a [small |large ]{colour} {shape} at the {position} on a {background} background``."""
    size_word = f"{size} " if size else ""
    return f"a {size_word}{colour} {shape} at the {position} on a {background} background"


def canonical_caption_two(
    colour_a: str, shape_a: str, relation: str, colour_b: str, shape_b: str, background: str
) -> str:
    """``a {colour} {shape} {relation} a {colour} {shape} on a {background} background``."""
    return f"a {colour_a} {shape_a} {relation} a {colour_b} {shape_b} on a {background} background"


def canonical_caption(attributes: dict[str, Any]) -> str:
    """The canonical caption of a complete attributes dict (ONE_KEYS, size may be None, or TWO_KEYS)."""
    if "relation" in attributes:
        return canonical_caption_two(*(attributes[k] for k in TWO_KEYS))
    return canonical_caption_one(
        attributes["colour"], attributes["shape"], attributes["position"], attributes["background"], attributes["size"]
    )


def _alternatives(names: Any) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_COLOUR = _alternatives(PALETTE_OBJECTS)
_SHAPE = _alternatives(SHAPES)
_BACKGROUND = _alternatives(PALETTE_BACKGROUNDS)
_ONE_RE = re.compile(
    rf"a (?:(?P<size>{_alternatives(SIZES)}) )?(?P<colour>{_COLOUR}) (?P<shape>{_SHAPE}) "
    rf"at the (?P<position>{_alternatives(POSITIONS)}) on a (?P<background>{_BACKGROUND}) background"
)
_TWO_RE = re.compile(
    rf"a (?P<colour_a>{_COLOUR}) (?P<shape_a>{_SHAPE}) (?P<relation>{_alternatives(RELATIONS)}) "
    rf"a (?P<colour_b>{_COLOUR}) (?P<shape_b>{_SHAPE}) on a (?P<background>{_BACKGROUND}) background"
)


def parse_caption(caption: str) -> dict[str, Any]:
    """Parse a canonical caption into its attributes (ONE_KEYS with size None when unstated, or TWO_KEYS).

    Raises ValueError for anything that is not exactly a canonical caption.
    """
    match = _ONE_RE.fullmatch(caption)
    if match:
        return {key: match.group(key) for key in ONE_KEYS}
    match = _TWO_RE.fullmatch(caption)
    if match:
        attributes = {key: match.group(key) for key in TWO_KEYS}
        if attributes["colour_a"] == attributes["colour_b"]:
            raise ValueError(f"two-object caption with the same colour twice: {caption!r}")
        return attributes
    raise ValueError(
        f"not a canonical ShapesWorld caption: {caption!r}; expected 'a [small |large ]{{colour}} {{shape}} at the "
        "{position} on a {background} background' or 'a {colour} {shape} {relation} a {colour} {shape} on a "
        "{background} background' (lower case, single spaces)"
    )


def caption_kind(caption: str) -> str:
    """ "one" or "two" for a canonical caption."""
    return "two" if "relation" in parse_caption(caption) else "one"


def _noun(colour: str | None, shape: str | None, size: str | None = None) -> str:
    return " ".join(w for w in (size, colour, shape or "shape") if w)


def _one_paraphrase(a: dict[str, Any], rng: _Rng) -> str:
    noun = _noun(a["colour"], a["shape"], a["size"])
    templates = (
        f"{noun}, {a['position']}, {a['background']} background",
        f"a {a['background']} background with a {noun} in the {a['position']}",
        f"{a['position']}: a {noun} on {a['background']}",
        f"a {noun} in the {a['position']}, {a['background']} background",
        f"on a {a['background']} background, a {noun} at the {a['position']}",
    )
    return rng.choice(templates)


def _one_partial(a: dict[str, Any]) -> str:
    text = f"a {_noun(a['colour'], a['shape'], a['size'])}"
    if a["position"]:
        text += f" at the {a['position']}"
    if a["background"]:
        text += f" on a {a['background']} background"
    return text


def _two_paraphrase(a: dict[str, Any], rng: _Rng) -> str:
    first = _noun(a["colour_a"], a["shape_a"])
    second = _noun(a["colour_b"], a["shape_b"])
    templates = (
        f"{first} {a['relation']} {second}, {a['background']} background",
        f"on a {a['background']} background, a {first} {a['relation']} a {second}",
        f"a {a['background']} background with a {first} {a['relation']} a {second}",
    )
    return rng.choice(templates)


def _two_partial(a: dict[str, Any]) -> str:
    first = _noun(a["colour_a"], a["shape_a"])
    second = _noun(a["colour_b"], a["shape_b"])
    text = f"a {first} {a['relation']} a {second}" if a["relation"] else f"a {first} and a {second}"
    if a["background"]:
        text += f" on a {a['background']} background"
    return text


def _drop_some(attributes: dict[str, Any], droppable: tuple[str, ...], rng: _Rng) -> dict[str, Any]:
    """A copy of ``attributes`` with a random non-empty subset of ``droppable`` set to None."""
    present = [k for k in droppable if attributes[k] is not None]
    while True:
        dropped = [k for k in present if rng.random() < 0.5]
        if dropped or not present:
            break
    return {k: (None if k in dropped else v) for k, v in attributes.items()}


# ------------------------------------------------------------------------------------------------------------ scenes


def _random_attributes(kind: str, rng: _Rng) -> dict[str, Any]:
    if kind == "one":
        return {
            "colour": rng.choice(PALETTE_OBJECTS),
            "shape": rng.choice(SHAPES),
            "position": rng.choice(POSITIONS),
            "size": rng.choice((None, *SIZES)),
            "background": rng.choice(PALETTE_BACKGROUNDS),
        }
    colour_a = rng.choice(PALETTE_OBJECTS)
    return {
        "colour_a": colour_a,
        "shape_a": rng.choice(SHAPES),
        "relation": rng.choice(RELATIONS),
        "colour_b": rng.choice([c for c in PALETTE_OBJECTS if c != colour_a]),
        "shape_b": rng.choice(SHAPES),
        "background": rng.choice(PALETTE_BACKGROUNDS),
    }


def _caption_for(kind: str, attributes: dict[str, Any], caption_style: str, rng: _Rng) -> tuple[str, dict[str, Any]]:
    """Pick a caption form; returns (caption, the attributes it states)."""
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f"caption_style must be one of {CAPTION_STYLES}, got {caption_style!r}")
    form = "canonical" if caption_style == "canonical" else rng.weighted(STYLE_WEIGHTS)
    if form == "canonical":
        return canonical_caption(attributes), attributes
    if form == "empty":
        return "", dict.fromkeys(attributes)
    if form == "paraphrase":
        paraphrase = _one_paraphrase if kind == "one" else _two_paraphrase
        return paraphrase(attributes, rng), attributes
    if kind == "one":
        stated = _drop_some(attributes, ("colour", "shape", "position", "background"), rng)
        return _one_partial(stated), stated
    stated = _drop_some(attributes, ("colour_a", "shape_a", "relation", "colour_b", "shape_b", "background"), rng)
    return _two_partial(stated), stated


def _clamp(value: float, radius: float) -> float:
    return min(max(value, radius), 1.0 - radius)


def _one_object(stated: dict[str, Any], rng: _Rng, height: int, width: int) -> ShapeSpec:
    size = stated.get("size")
    low, high = SIZES[size] if size else ANY_SIZE
    r = rng.uniform(low, high)
    x, y = POSITIONS[stated.get("position") or rng.choice(POSITIONS)]
    cx = x + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = y + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    side = min(height, width)
    return ShapeSpec(
        shape=stated.get("shape") or rng.choice(SHAPES),
        colour=stated.get("colour") or rng.choice(PALETTE_OBJECTS),
        cx=_clamp(cx, r * side / width),
        cy=_clamp(cy, r * side / height),
        r=r,
    )


def _two_colours(stated: dict[str, Any], rng: _Rng) -> tuple[str, str]:
    colour_a, colour_b = stated.get("colour_a"), stated.get("colour_b")
    if colour_a is None:
        colour_a = rng.choice([c for c in PALETTE_OBJECTS if c != colour_b])
    if colour_b is None:
        colour_b = rng.choice([c for c in PALETTE_OBJECTS if c != colour_a])
    if colour_a == colour_b:
        raise ValueError(f"two objects must have different colours, got {colour_a!r} twice")
    return colour_a, colour_b


def _two_centres(relation: str, rng: _Rng) -> tuple[tuple[float, float], tuple[float, float]]:
    near, far = (rng.uniform(*NEAR_RANGE), rng.uniform(*FAR_RANGE))
    free_a, free_b = rng.uniform(*FREE_RANGE), rng.uniform(*FREE_RANGE)
    if relation == "to the left of":
        return (near, free_a), (far, free_b)
    if relation == "to the right of":
        return (far, free_a), (near, free_b)
    if relation == "above":
        return (free_a, near), (free_b, far)
    if relation == "below":
        return (free_a, far), (free_b, near)
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def pixel_box(spec: ShapeSpec, height: int, width: int) -> tuple[float, float, float, float]:
    """The object's bounding square in pixels: (x0, y0, x1, y1), continuous coordinates."""
    r_px = spec.r * min(height, width)
    x, y = spec.cx * width, spec.cy * height
    return x - r_px, y - r_px, x + r_px, y + r_px


def boxes_overlap(a: ShapeSpec, b: ShapeSpec, height: int, width: int) -> bool:
    """Whether the bounding squares of two objects intersect."""
    ax0, ay0, ax1, ay1 = pixel_box(a, height, width)
    bx0, by0, bx1, by1 = pixel_box(b, height, width)
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


def inside_canvas(spec: ShapeSpec, height: int, width: int) -> bool:
    """Whether the object's bounding square lies within the canvas."""
    x0, y0, x1, y1 = pixel_box(spec, height, width)
    eps = 1e-9
    return x0 >= -eps and y0 >= -eps and x1 <= width + eps and y1 <= height + eps


def _two_objects(stated: dict[str, Any], rng: _Rng, height: int, width: int) -> list[ShapeSpec]:
    colour_a, colour_b = _two_colours(stated, rng)
    shape_a = stated.get("shape_a") or rng.choice(SHAPES)
    shape_b = stated.get("shape_b") or rng.choice(SHAPES)
    relation = stated.get("relation") or rng.choice(RELATIONS)
    for _ in range(1000):
        (xa, ya), (xb, yb) = _two_centres(relation, rng)
        a = ShapeSpec(shape_a, colour_a, xa, ya, rng.uniform(*TWO_OBJECT_SIZE))
        b = ShapeSpec(shape_b, colour_b, xb, yb, rng.uniform(*TWO_OBJECT_SIZE))
        fits = inside_canvas(a, height, width) and inside_canvas(b, height, width)
        if fits and not boxes_overlap(a, b, height, width):
            return [a, b]
    raise RuntimeError(f"could not place two objects on a {height}x{width} canvas")


def _build_scene(kind: str, stated: dict[str, Any], caption: str, rng: _Rng, height: int, width: int) -> Scene:
    background = stated.get("background") or rng.choice(PALETTE_BACKGROUNDS)
    if kind == "one":
        objects = [_one_object(stated, rng, height, width)]
    else:
        objects = _two_objects(stated, rng, height, width)
    return Scene(height, width, background, objects, caption, kind, dict(stated))


def sample_scene(
    rng: random.Random | np.random.Generator,
    height: int = 128,
    width: int = 128,
    kind: str | None = None,
    caption_style: str = "canonical",
) -> Scene:
    """A random valid scene; ``kind`` "one"/"two" or None (either, equally likely).

    caption_style "canonical": the canonical caption; "any": canonical (60%), paraphrase (20%), partial (15%) or
    empty (5%). Attributes a caption leaves out are drawn at random; ``scene.attributes`` only holds what it states.
    """
    r = _Rng(rng)
    kind = kind or r.choice(("one", "two"))
    if kind not in ("one", "two"):
        raise ValueError(f"kind must be 'one', 'two' or None, got {kind!r}")
    caption, stated = _caption_for(kind, _random_attributes(kind, r), caption_style, r)
    return _build_scene(kind, stated, caption, r, height, width)


def scene_from_caption(
    caption: str, rng: random.Random | np.random.Generator, height: int = 128, width: int = 128
) -> Scene:
    """A random scene matching a canonical caption (raises ValueError for non-canonical text)."""
    stated = parse_caption(caption)
    kind = "two" if "relation" in stated else "one"
    return _build_scene(kind, stated, caption, _Rng(rng), height, width)


def random_canonical_captions(n: int, seed: int, kind: str = "one") -> list[str]:
    """``n`` random canonical captions, deterministic by seed; kind "one", "two" or "both" (each equally likely)."""
    if kind not in ("one", "two", "both"):
        raise ValueError(f"kind must be 'one', 'two' or 'both', got {kind!r}")
    rng = _Rng(random.Random(seed))
    captions = []
    for _ in range(n):
        k = rng.choice(("one", "two")) if kind == "both" else kind
        captions.append(canonical_caption(_random_attributes(k, rng)))
    return captions


# --------------------------------------------------------------------------------------------------------- rendering


def shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Outline of a triangle, square or star centred on (x, y) with radius r (same units as the inputs)."""
    if shape == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else STAR_INNER * r
            angle = math.pi * k / 5
            points.append((x + radius * math.sin(angle), y - radius * math.cos(angle)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}; shapes are {SHAPES}")


def _draw_object(draw: ImageDraw.ImageDraw, spec: ShapeSpec, height: int, width: int, scale: int) -> None:
    r = spec.r * min(height, width) * scale
    x, y = spec.cx * width * scale, spec.cy * height * scale
    colour = PALETTE_OBJECTS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        return
    if spec.shape not in SHAPES:
        raise ValueError(f"unknown shape {spec.shape!r}; shapes are {SHAPES}")
    draw.polygon(shape_polygon(spec.shape, x, y, r), fill=colour)


def render(scene: Scene, supersample: int = SUPERSAMPLE) -> Image.Image:
    """The scene as an H x W RGB image: flat colours, anti-aliased by ``supersample`` x box filtering."""
    scale = max(1, int(supersample))
    image = Image.new("RGB", (scene.width * scale, scene.height * scale), PALETTE_BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for spec in scene.objects:
        _draw_object(draw, spec, scene.height, scene.width, scale)
    return image.reduce(scale) if scale > 1 else image


def images_to_tensor(images: list[Image.Image], uint8: bool = False) -> torch.Tensor:
    """Stack same-size RGB images into a tensor (B, 3, H, W): float in [-1, 1], or the raw uint8 pixels."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2)
    return pixels.contiguous() if uint8 else uint8_to_unit(pixels)


def uint8_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in 0–255 (uint8, or float in whole levels as the torch rasteriser gives; any shape) → float in
    [-1, 1], on the pixels' device (a float input is scaled in place)."""
    return pixels.float().div_(127.5).sub_(1.0)


def sample_batch_scenes(
    seed: int,
    batch_size: int,
    height: int = 128,
    width: int = 128,
    caption_style: str = "any",
    two_object_share: float | None = None,
) -> list[Scene]:
    """``batch_size`` random scenes, deterministic by seed (the scenes of :func:`make_batch`).
    ``two_object_share``: probability of a two-object scene (None: one or two objects equally likely, drawn by
    ``sample_scene``)."""
    if two_object_share is not None and not 0 <= two_object_share <= 1:
        raise ValueError(f"two_object_share must be in [0, 1], got {two_object_share}")
    rng = random.Random(seed)
    scenes = []
    for _ in range(batch_size):
        kind = None if two_object_share is None else ("two" if rng.random() < two_object_share else "one")
        scenes.append(sample_scene(rng, height, width, kind=kind, caption_style=caption_style))
    return scenes


def make_batch(
    seed: int,
    batch_size: int,
    height: int = 128,
    width: int = 128,
    caption_style: str = "any",
    uint8: bool = False,
    two_object_share: float | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """The scenes of :func:`sample_batch_scenes` rendered with PIL: (images (B, 3, H, W) float in [-1, 1] — or uint8
    pixels with ``uint8`` —, captions)."""
    scenes = sample_batch_scenes(seed, batch_size, height, width, caption_style, two_object_share)
    return images_to_tensor([render(scene) for scene in scenes], uint8), [scene.caption for scene in scenes]
