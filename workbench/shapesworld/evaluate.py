"""Reading ShapesWorld images back from their pixels, and scoring them against canonical captions.

Follows the data contract's "What correct means" (docs/design.md, "ShapesWorld: the data contract"):
- background: the palette background nearest the median colour of the one-pixel border;
- objects: 8-connected regions of pixels whose nearest palette colour (backgrounds included) is an object colour and
  lies within ``COLOUR_THRESHOLD`` (RGB Euclidean). Anti-aliased edge pixels are farther than that from every palette
  colour, so they are left out instead of forming slivers of a wrong colour. Pixels with fewer than ``MIN_NEIGHBOURS``
  same-class neighbours are dropped (speckle), as are regions under ``MIN_AREA_FRACTION`` x min(H, W)^2 pixels or with
  no interior left after a 3 x 3 erosion;
- extent: the region's bounding box, widened to where the object's coverage (the pixel's position between background
  and object colour, after removing a global colour cast) has a 3 x 3 mean >= 0.5, so blurred edges count at half;
- per object: colour; shape = the shape whose nearest template (each shape drawn at several pixel radii, blurs and
  sub-pixel offsets, read back the same way, coverage resampled to a TEMPLATE_GRID square) is closest; position cell
  (thirds of the canvas, from the box centre); r = half the longer box side / min(H, W); size "large" when r >= 0.14.

Images are PIL RGB images (or uint8 arrays H x W x 3). Attribute names match ``world.parse_caption``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

from workbench.pipeline import tensor_to_images
from workbench.shapesworld.world import (
    CANVAS_SIZES,
    LARGE_THRESHOLD,
    PALETTE_BACKGROUNDS,
    PALETTE_OBJECTS,
    POSITIONS,
    SHAPES,
    Scene,
    ShapeSpec,
    images_to_tensor,
    parse_caption,
    random_canonical_captions,
    render,
    scene_from_caption,
)
from workbench.viz import markdown_rows

COLOUR_THRESHOLD = 55.0
MIN_AREA_FRACTION = 0.0025
TEMPLATE_GRID = 20
TEMPLATE_RADII: tuple[float, ...] = (5.0, 6.5, 8.0, 10.0, 12.5, 16.0, 20.0, 25.0, 32.0, 40.0)
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.8, 1.5)
TEMPLATE_OFFSETS: tuple[float, ...] = (0.0, 0.5)
TEMPLATE_SCALE_TOLERANCE = 1.6
MIN_NEIGHBOURS = 2
ONE_ATTRIBUTES: tuple[str, ...] = ("background", "colour", "shape", "position", "size", "count", "all")
TWO_ATTRIBUTES: tuple[str, ...] = ("background", "object_a", "object_b", "relation", "count", "all")
TABLE_COLUMNS: tuple[str, ...] = (
    "background",
    "colour",
    "shape",
    "position",
    "size",
    "object_a",
    "object_b",
    "relation",
    "count",
    "all",
)

_OBJECT_NAMES = tuple(PALETTE_OBJECTS)
_BACKGROUND_NAMES = tuple(PALETTE_BACKGROUNDS)
_PALETTE = np.array([*PALETTE_OBJECTS.values(), *PALETTE_BACKGROUNDS.values()], dtype=np.float32)
_CELL_NAMES = {(round(x * 4) - 1, round(y * 4) - 1): name for name, (x, y) in POSITIONS.items()}

GenerateFn = Callable[[list[str], list[int]], list[Image.Image]]


# ------------------------------------------------------------------------------------------------------------ pixels


def _rgb(colour: Sequence[float]) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    return array


def border_colour(array: np.ndarray) -> np.ndarray:
    """The per-channel median colour of the one-pixel border of an (H, W, 3) array, float32 (3,)."""
    border = np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def nearest_background(rgb: Sequence[float]) -> str:
    """The palette background nearest an RGB colour."""
    distances = [
        np.linalg.norm(np.asarray(rgb, np.float32) - np.array(v, np.float32)) for v in PALETTE_BACKGROUNDS.values()
    ]
    return _BACKGROUND_NAMES[int(np.argmin(distances))]


def read_background(array: np.ndarray) -> str:
    """The palette background nearest the median border colour of an (H, W, 3) array."""
    return nearest_background(border_colour(array))


def classify_pixels(array: np.ndarray, threshold: float = COLOUR_THRESHOLD) -> np.ndarray:
    """(H, W) int: index into PALETTE_OBJECTS of each pixel's nearest palette colour; -1 for a background or none."""
    channels = [array[..., c].astype(np.float32) for c in range(3)]
    squared = np.stack([sum((channels[c] - rgb[c]) ** 2 for c in range(3)) for rgb in _PALETTE])
    nearest = squared.argmin(axis=0)
    close = squared.min(axis=0) <= threshold**2
    return np.where(close & (nearest < len(_OBJECT_NAMES)), nearest, -1)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _runs(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of equal non-negative class: (row, start, end exclusive, class), in row-major order."""
    height, width = classes.shape
    starts = np.ones_like(classes, dtype=bool)
    starts[:, 1:] = classes[:, 1:] != classes[:, :-1]
    rows, cols = np.nonzero(starts)
    flat = rows * width + cols
    ends = np.append(flat[1:], height * width)
    ends = np.minimum(ends, (rows + 1) * width) - rows * width
    run_class = classes[rows, cols]
    keep = run_class >= 0
    return rows[keep], cols[keep], ends[keep], run_class[keep]


def _union(parent: list[int], i: int, j: int) -> None:
    root_i, root_j = _find(parent, i), _find(parent, j)
    if root_i != root_j:
        parent[max(root_i, root_j)] = min(root_i, root_j)


def label_regions(classes: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of equal non-negative class: (labels (H, W) int, 0 = none, 1..n; n)."""
    rows, starts, ends, run_class = (a.tolist() for a in _runs(classes))
    parent = list(range(len(rows)))
    previous_begin = previous_end = current_begin = 0
    pointer = 0
    for i, row in enumerate(rows):
        if i == 0 or row != rows[i - 1]:
            adjacent = i > 0 and rows[i - 1] == row - 1
            previous_begin, previous_end = (current_begin, i) if adjacent else (i, i)
            current_begin, pointer = i, previous_begin
        while pointer < previous_end and ends[pointer] < starts[i]:
            pointer += 1
        j = pointer
        while j < previous_end and starts[j] <= ends[i]:
            if run_class[j] == run_class[i]:
                _union(parent, i, j)
            j += 1
    labels = np.zeros(classes.shape, dtype=np.int32)
    ids: dict[int, int] = {}
    for i, row in enumerate(rows):
        labels[row, starts[i] : ends[i]] = ids.setdefault(_find(parent, i), len(ids) + 1)
    return labels, len(ids)


def _neighbour_views(array: np.ndarray, fill: Any) -> Iterable[np.ndarray]:
    padded = np.pad(array, 1, constant_values=fill)
    height, width = array.shape
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                yield padded[dy : dy + height, dx : dx + width]


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for view in _neighbour_views(mask, False):
        out &= view
    return out


def despeckle(classes: np.ndarray, min_neighbours: int = MIN_NEIGHBOURS) -> np.ndarray:
    """``classes`` with -1 wherever fewer than ``min_neighbours`` of the 8 neighbours share the pixel's class."""
    same = np.zeros(classes.shape, dtype=np.int8)
    for view in _neighbour_views(classes, -1):
        same += view == classes
    return np.where(same >= min_neighbours, classes, -1)


# ------------------------------------------------------------------------------------------------------------ extent


def coverage(array: np.ndarray, colour: Sequence[float], background: Sequence[float]) -> np.ndarray:
    """(H, W) float in [0, 1]: how much of each pixel is ``colour`` over ``background`` (projection onto their line)."""
    base = np.asarray(background, dtype=np.float32)
    direction = np.asarray(colour, dtype=np.float32) - base
    alpha = (array.astype(np.float32) - base) @ direction / max(float(direction @ direction), 1.0)
    return np.clip(alpha, 0.0, 1.0)


def _box_mean(alpha: np.ndarray) -> np.ndarray:
    total = alpha.copy()
    for view in _neighbour_views(alpha, 0.0):
        total += view
    return total / 9.0


def region_coverage(
    array: np.ndarray,
    labels: np.ndarray,
    label: int,
    objects: np.ndarray,
    colour_rgb: np.ndarray,
    background_rgb: np.ndarray,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One object's extent and coverage: (coverage cropped to the box, box (x0, y0, x1, y1) with exclusive ends).

    Coverage is the pixel's projection between ``background_rgb`` and ``colour_rgb``; pixels of other objects
    (``objects``: (H, W) bool, True on every kept object region) count as zero. The box is the union of the region's
    bounding box and the bounding box of where the 3 x 3 mean coverage is >= 0.5 (within 2 pixels of the region), so
    blurred edges are measured at half coverage and single noisy pixels do not widen it.
    """
    ys, xs = np.nonzero(labels == label)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    height, width = labels.shape
    wx0, wy0 = max(x0 - 2, 0), max(y0 - 2, 0)
    window = (slice(wy0, min(y1 + 2, height)), slice(wx0, min(x1 + 2, width)))
    alpha = coverage(array[window], colour_rgb, background_rgb)
    alpha[objects[window] & (labels[window] != label)] = 0.0
    ys, xs = np.nonzero(_box_mean(alpha) >= 0.5)
    if len(ys):
        x0, x1 = min(x0, wx0 + int(xs.min())), max(x1, wx0 + int(xs.max()) + 1)
        y0, y1 = min(y0, wy0 + int(ys.min())), max(y1, wy0 + int(ys.max()) + 1)
    return alpha[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0], (x0, y0, x1, y1)


# ------------------------------------------------------------------------------------------------------------ shapes


def _grid(alpha: np.ndarray, grid: int = TEMPLATE_GRID) -> np.ndarray:
    """A coverage map area-resampled to (grid, grid) floats in [0, 1]."""
    image = Image.fromarray(alpha.astype(np.float32), mode="F")
    return np.asarray(image.resize((grid, grid), Image.Resampling.BOX), dtype=np.float32)


def _template(shape: str, radius: float, blur: float, offset: float) -> np.ndarray | None:
    """One shape of ``radius`` pixels, drawn ``offset`` pixels off the pixel grid, blurred, and read like an object."""
    size = int(2 * radius + 12)
    spec = ShapeSpec(shape, "red", 0.5 + offset / size, 0.5 + offset / size, radius / size)
    image = render(Scene(size, size, "black", [spec], "", "one", {}))
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    array = np.asarray(image)
    labels, count = label_regions(despeckle(classify_pixels(array)))
    if count == 0:
        return None
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    alpha, _ = region_coverage(array, labels, largest, labels > 0, _rgb(PALETTE_OBJECTS["red"]), border_colour(array))
    return _grid(alpha)


@lru_cache(maxsize=1)
def shape_templates() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each shape drawn at TEMPLATE_RADII pixels, TEMPLATE_BLURS and TEMPLATE_OFFSETS, read like an observed object.

    Returns name -> (templates (K, TEMPLATE_GRID, TEMPLATE_GRID) coverage, their radii in pixels (K,)).
    """
    bank = {}
    for shape in SHAPES:
        grids, radii = [], []
        for radius, blur, offset in itertools.product(TEMPLATE_RADII, TEMPLATE_BLURS, TEMPLATE_OFFSETS):
            grid = _template(shape, radius, blur, offset)
            if grid is not None:
                grids.append(grid)
                radii.append(radius)
        bank[shape] = (np.stack(grids), np.array(radii, dtype=np.float32))
    return bank


def classify_shape(alpha: np.ndarray, radius: float | None = None) -> tuple[str, dict[str, float]]:
    """The shape of one object's coverage map: (name, {shape: distance to its nearest template; lower is closer}).

    The distance is the mean absolute difference of (TEMPLATE_GRID, TEMPLATE_GRID) coverage grids; with ``radius``
    (half the longer bounding-box side, pixels), only templates within a factor TEMPLATE_SCALE_TOLERANCE count.
    """
    observed = _grid(alpha)
    distances = {}
    for name, (grids, radii) in shape_templates().items():
        errors = np.abs(grids - observed).mean(axis=(1, 2))
        if radius is not None:
            near = (radii <= radius * TEMPLATE_SCALE_TOLERANCE) & (radii >= radius / TEMPLATE_SCALE_TOLERANCE)
            errors = errors[near] if near.any() else errors
        distances[name] = float(errors.min())
    return min(distances, key=distances.get), distances


# ----------------------------------------------------------------------------------------------------------- reading


def position_cell(cx: float, cy: float) -> str:
    """The 3 x 3 grid cell (thirds of the canvas) holding a point given as fractions of W and H."""
    column = min(max(int(cx * 3), 0), 2)
    row = min(max(int(cy * 3), 0), 2)
    return _CELL_NAMES[(column, row)]


def _describe(
    alpha: np.ndarray, box: tuple[int, int, int, int], colour: str, area: int, height: int, width: int
) -> dict[str, Any]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    r = max(x1 - x0, y1 - y0) / 2 / min(height, width)
    shape, distances = classify_shape(alpha, r * min(height, width))
    return {
        "colour": colour,
        "shape": shape,
        "position": position_cell(cx, cy),
        "size": "large" if r >= LARGE_THRESHOLD else "small",
        "r": r,
        "cx": cx,
        "cy": cy,
        "bbox": box,
        "area": area,
        "shape_distances": distances,
    }


def read_image(image: Image.Image | np.ndarray, threshold: float = COLOUR_THRESHOLD) -> dict[str, Any]:
    """Read a ShapesWorld image from its pixels.

    Returns {"height", "width", "background": name, "objects": [...]} with objects sorted by area, largest first;
    each object is {"colour", "shape", "position", "size", "r", "cx", "cy", "bbox": (x0, y0, x1, y1) exclusive ends,
    "area", "shape_distances"}; cx, cy are fractions of W, H and r a fraction of min(H, W).
    """
    array = _as_array(image)
    height, width = array.shape[:2]
    background_rgb = border_colour(array)
    classes = despeckle(classify_pixels(array, threshold))
    labels, count = label_regions(classes)
    min_area = MIN_AREA_FRACTION * min(height, width) ** 2
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    interior = np.bincount(labels[_erode(classes >= 0)], minlength=count + 1)
    kept = np.flatnonzero((areas >= min_area) & (interior > 0))
    kept = kept[kept > 0]
    object_mask = np.isin(labels, kept)
    background = nearest_background(background_rgb)
    cast = background_rgb - _rgb(PALETTE_BACKGROUNDS[background])
    objects = []
    for label in kept:
        colour = _OBJECT_NAMES[int(classes[labels == label][0])]
        colour_rgb = _rgb(PALETTE_OBJECTS[colour]) + cast
        alpha, box = region_coverage(array, labels, int(label), object_mask, colour_rgb, background_rgb)
        objects.append(_describe(alpha, box, colour, int(areas[label]), height, width))
    objects.sort(key=lambda obj: obj["area"], reverse=True)
    return {"height": height, "width": width, "background": background, "objects": objects}


# ----------------------------------------------------------------------------------------------------------- scoring


def _first(objects: Iterable[dict[str, Any]], colour: str) -> dict[str, Any] | None:
    return next((obj for obj in objects if obj["colour"] == colour), None)


def _relation_holds(relation: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    if relation == "to the left of":
        return a["cx"] < b["cx"]
    if relation == "to the right of":
        return a["cx"] > b["cx"]
    if relation == "above":
        return a["cy"] < b["cy"]
    if relation == "below":
        return a["cy"] > b["cy"]
    raise ValueError(f"unknown relation {relation!r}")


def _score_one(attributes: dict[str, Any], reading: dict[str, Any]) -> dict[str, bool]:
    objects = reading["objects"]
    main = objects[0] if objects else {}
    scores = {"background": reading["background"] == attributes["background"]}
    for key in ("colour", "shape", "position"):
        scores[key] = main.get(key) == attributes[key]
    if attributes["size"] is not None:
        scores["size"] = main.get("size") == attributes["size"]
    scores["count"] = len(objects) == 1
    scores["all"] = all(scores.values())
    return scores


def _score_two(attributes: dict[str, Any], reading: dict[str, Any]) -> dict[str, bool]:
    objects = reading["objects"]
    scores = {"background": reading["background"] == attributes["background"]}
    for side in ("a", "b"):
        colour, shape = attributes[f"colour_{side}"], attributes[f"shape_{side}"]
        scores[f"object_{side}"] = any(obj["colour"] == colour and obj["shape"] == shape for obj in objects)
    a, b = _first(objects, attributes["colour_a"]), _first(objects, attributes["colour_b"])
    scores["relation"] = a is not None and b is not None and _relation_holds(attributes["relation"], a, b)
    scores["count"] = len(objects) == 2
    scores["all"] = all(scores.values())
    return scores


def score(caption: str, image: Image.Image | np.ndarray) -> dict[str, bool]:
    """Per-attribute correctness of an image for a canonical caption.

    One object: background, colour, shape, position, size (only when the caption states one), count (exactly one
    object), all. Two objects: background, object_a, object_b (colour and shape), relation (of the centres of the
    objects of colour A and colour B), count (exactly two objects), all. Colour, shape, position and size are read off
    the largest object. Raises ValueError for a non-canonical caption.
    """
    return score_reading(caption, read_image(image))


def score_reading(caption: str, reading: Mapping[str, Any]) -> dict[str, bool]:
    """:func:`score` of an image already read by :func:`read_image`."""
    attributes = parse_caption(caption)
    if "relation" in attributes:
        return _score_two(attributes, reading)
    return _score_one(attributes, reading)


def summarise_objects(reading: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The objects of a reading as small JSON-ready dicts: colour, shape, size, position, cx, cy, r (largest first)."""
    keys = ("colour", "shape", "size", "position")
    return [
        {**{k: obj[k] for k in keys}, **{k: round(float(obj[k]), 4) for k in ("cx", "cy", "r")}}
        for obj in reading["objects"]
    ]


# -------------------------------------------------------------------------------------------------------- evaluation


def _accumulate(records: Sequence[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    totals: dict[str, dict[str, list[int]]] = {}
    for record in records:
        group = totals.setdefault(record["kind"], {})
        for key, value in record["scores"].items():
            group.setdefault(key, [0, 0])
            group[key][0] += int(value)
            group[key][1] += 1
    accuracy = {kind: {k: hit / total for k, (hit, total) in group.items()} for kind, group in totals.items()}
    support = {kind: {k: total for k, (_, total) in group.items()} for kind, group in totals.items()}
    return accuracy, support


def evaluate(
    generate_fn: GenerateFn,
    n: int = 200,
    seed: int = 0,
    kind: str = "both",
    height: int = 128,
    width: int = 128,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``generate_fn`` on ``n`` random canonical captions drawn with ``seed``.

    ``generate_fn(captions, seeds) -> list of PIL images`` is called with up to ``batch_size`` captions at a time; the
    seed of caption i is ``seed * 100_000 + i``; ``progress`` shows a bar of the captions done. Returns {"n", "seed",
    "kind", "height", "width", "accuracy": {"one"|"two": {attribute: fraction}}, "support": {"one"|"two": {attribute:
    count}}, "all": fraction of captions fully correct, "records": [{"caption", "seed", "kind", "scores",
    "background", "objects"}]} with what was read of each image (:func:`summarise_objects`).
    """
    captions = random_canonical_captions(n, seed, kind)
    seeds = [seed * 100_000 + i for i in range(n)]
    records = []
    bar = tqdm(total=n, desc="eval", unit="image", disable=not progress)
    for start in range(0, n, batch_size):
        chunk, chunk_seeds = captions[start : start + batch_size], seeds[start : start + batch_size]
        images = generate_fn(chunk, chunk_seeds)
        bar.update(len(chunk))
        if len(images) != len(chunk):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(chunk)} captions")
        for caption, image_seed, image in zip(chunk, chunk_seeds, images):
            reading = read_image(image)
            scores = score_reading(caption, reading)
            group = "two" if "relation" in scores else "one"
            record = {"caption": caption, "seed": image_seed, "kind": group, "scores": scores}
            records.append({**record, "background": reading["background"], "objects": summarise_objects(reading)})
    bar.close()
    accuracy, support = _accumulate(records)
    overall = sum(r["scores"]["all"] for r in records) / max(len(records), 1)
    return {
        "n": n,
        "seed": seed,
        "kind": kind,
        "height": height,
        "width": width,
        "accuracy": accuracy,
        "support": support,
        "all": overall,
        "records": records,
    }


def render_generate_fn(height: int = 128, width: int = 128, renderer: str = "pil") -> GenerateFn:
    """A ``generate_fn`` that draws the ground truth, ``scene_from_caption(caption, Random(seed))``, with the PIL
    renderer (``world.render``) or the torch rasteriser of the trainer (``raster.render_scenes``)."""
    if renderer not in ("pil", "torch"):
        raise ValueError(f"renderer must be 'pil' or 'torch', got {renderer!r}")

    def generate(captions: list[str], seeds: list[int]) -> list[Image.Image]:
        scenes = [scene_from_caption(c, random.Random(s), height, width) for c, s in zip(captions, seeds)]
        if renderer == "pil":
            return [render(scene) for scene in scenes]
        from workbench.shapesworld.raster import render_scenes

        return tensor_to_images(render_scenes(scenes)[0])

    return generate


def through_vae(generate_fn: GenerateFn, vae: torch.nn.Module) -> GenerateFn:
    """``generate_fn`` whose images pass through ``vae`` (encode → posterior mode → decode): what the latent space
    keeps of them, the ceiling of any model that generates in it."""

    def generate(captions: list[str], seeds: list[int]) -> list[Image.Image]:
        images = images_to_tensor(generate_fn(captions, seeds)).to(vae.device, vae.dtype)
        with torch.no_grad():
            return tensor_to_images(vae.decode(vae.encode(images).mode()))

    return generate


def evaluate_renders(
    n: int = 200,
    seed: int = 0,
    sizes: Sequence[int | tuple[int, int]] = CANVAS_SIZES,
    kind: str = "both",
    vae: torch.nn.Module | None = None,
    renderer: str = "pil",
) -> dict[str, dict[str, Any]]:
    """Self-check: evaluate the dataset's own renders (``renderer`` "pil" or "torch") on each canvas size ("HxW" ->
    ``evaluate`` results); with ``vae``, the renders after a round trip through it (see :func:`through_vae`)."""
    results = {}
    for size in sizes:
        height, width = (size, size) if isinstance(size, int) else size
        generate = render_generate_fn(height, width, renderer)
        generate = generate if vae is None else through_vae(generate, vae)
        results[f"{height}x{width}"] = evaluate(generate, n, seed, kind, height, width)
    return results


def _cell(accuracy: Mapping[str, float], key: str) -> str:
    return f"{100 * accuracy[key]:.1f}%" if key in accuracy else "–"


def format_table(results: Mapping[str, Any]) -> str:
    """A markdown table of ``evaluate`` results, or of a mapping label -> results (as ``evaluate_renders`` returns)."""
    labelled = {f"{results['height']}x{results['width']}": results} if "accuracy" in results else dict(results)
    rows = [
        [label, group, result["support"][group]["all"], *(_cell(accuracy, key) for key in TABLE_COLUMNS)]
        for label, result in labelled.items()
        for group, accuracy in sorted(result["accuracy"].items())
    ]
    return markdown_rows(["canvas", "kind", "n", *TABLE_COLUMNS], rows)
