"""The trainer's torch rasteriser against the PIL renderer and the data contract, read back by the evaluator."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from workbench.pipeline import tensor_to_images
from workbench.shapesworld import raster
from workbench.shapesworld import world as w
from workbench.shapesworld.evaluate import score

SIZES = [(96, 96), (128, 128), (160, 160), (96, 160), (160, 128)]


def _scenes(n: int, height: int, width: int, seed: int, kind: str | None = None) -> list[w.Scene]:
    rng = random.Random(seed)
    return [w.sample_scene(rng, height, width, kind=kind) for _ in range(n)]


@pytest.mark.parametrize("height,width", SIZES)
def test_torch_renders_match_pil_renders_and_read_back_right(height, width):
    scenes = _scenes(40, height, width, seed=height * 1000 + width)
    images, coverage = raster.render_scenes(scenes)
    pil = w.images_to_tensor([w.render(scene) for scene in scenes])
    assert images.shape == pil.shape == (40, 3, height, width)
    assert coverage.shape == (40, raster.MAX_OBJECTS, height, width)
    difference = (images - pil).abs() * 127.5  # in 0–255 levels
    assert difference.mean() < 0.5, "the two renderers differ only on anti-aliased edge pixels"
    assert (difference > 2).float().mean() < 0.02
    for scene, image in zip(scenes, tensor_to_images(images)):
        result = score(scene.caption, np.asarray(image))
        assert all(result.values()), (scene.caption, result)


def test_coverage_area_is_the_shape_area():
    scene = w.Scene(160, 160, "white", [], "", "one")
    radius = 0.2
    expected = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
    # Star: ten triangles between consecutive outer (r) and inner (0.45 r) points, 36° apart.
    expected["star"] = 10 * 0.5 * 1.0 * w.STAR_INNER * math.sin(math.pi / 5)
    for shape, unit_area in expected.items():
        scene.objects = [w.ShapeSpec(shape, "red", 0.5, 0.5, radius)]
        _, coverage = raster.render_scenes([scene])
        r_px = radius * 160
        assert coverage[0, 0].sum().item() == pytest.approx(unit_area * r_px**2, rel=0.01), shape
        assert coverage[0, 1].sum().item() == 0, "an empty slot covers nothing"


def test_polygon_sdf_is_signed_distance():
    square = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]]])
    points = torch.tensor([[1.0, 1.0], [3.0, 1.0], [1.0, 0.5], [4.0, 4.0]])
    sdf = raster.polygon_sdf(points, square)[0]
    assert torch.allclose(sdf, torch.tensor([-1.0, 1.0, -0.5, math.sqrt(8.0)]))
    box = raster.shape_sdf("square", points, torch.tensor([[1.0, 1.0]]), torch.tensor([1.0]))[0]
    assert torch.allclose(box, sdf), "the box formula and the polygon formula agree on a square"


def test_star_vertices_are_the_pil_outline():
    vertices = raster.polygon_vertices("star", torch.tensor([[10.0, 20.0]]), torch.tensor([5.0]))[0]
    expected = torch.tensor(w.shape_polygon("star", 10.0, 20.0, 5.0))
    assert torch.allclose(vertices, expected.float(), atol=1e-5)


def test_scene_tensors_refuse_mixed_canvas_sizes():
    with pytest.raises(ValueError, match="canvas size"):
        raster.SceneTensors.from_scenes(_scenes(1, 96, 96, 0) + _scenes(1, 128, 128, 0))


def test_batch_scenes_are_those_of_make_batch():
    images, captions = w.make_batch(5, 6, 96, 128, two_object_share=0.5)
    scenes = w.sample_batch_scenes(5, 6, 96, 128, two_object_share=0.5)
    assert [s.caption for s in scenes] == captions
    assert torch.equal(w.images_to_tensor([w.render(s) for s in scenes]), images)
