"""ShapesWorld dataset and pixel evaluator: the data contract of docs/design.md, checked on rendered pixels."""

from __future__ import annotations

import argparse
import random
import re
from collections import deque

import numpy as np
import pytest
import torch

from workbench.shapesworld import evaluate as ev
from workbench.shapesworld import world as w

SIZES = [(96, 96), (128, 128), (160, 160), (96, 160), (160, 128)]
CANONICAL = re.compile(r"[a-z]+( [a-z]+)*")


def _scenes(n: int, height: int, width: int, kind: str | None = None, style: str = "canonical", seed: int = 0):
    rng = random.Random(seed)
    return [w.sample_scene(rng, height, width, kind=kind, caption_style=style) for _ in range(n)]


def _pixel(image, spec: w.ShapeSpec, height: int, width: int) -> tuple[int, int, int]:
    return image.getpixel((int(spec.cx * width), int(spec.cy * height)))


# ------------------------------------------------------------------------------------------------------- determinism


def test_make_batch_is_deterministic_by_seed():
    images, captions = w.make_batch(7, 6, 96, 128, caption_style="any")
    again, captions_again = w.make_batch(7, 6, 96, 128, caption_style="any")
    other, _ = w.make_batch(8, 6, 96, 128, caption_style="any")
    assert images.shape == (6, 3, 96, 128) and images.dtype == torch.float32
    assert torch.equal(images, again) and captions == captions_again
    assert not torch.equal(images, other)
    assert images.min() >= -1.0 and images.max() <= 1.0


@pytest.mark.parametrize("share, objects", [(1.0, 2), (0.0, 1)])
def test_make_batch_two_object_share(share, objects):
    images, _ = w.make_batch(3, 12, 96, 96, uint8=True, two_object_share=share)
    counts = [len(ev.read_image(image.permute(1, 2, 0).numpy())["objects"]) for image in images]
    assert counts == [objects] * 12
    with pytest.raises(ValueError, match="two_object_share must be in \\[0, 1\\], got 1.5"):
        w.make_batch(3, 2, 96, 96, two_object_share=1.5)


def test_sample_scene_is_deterministic_with_numpy_generator_and_random():
    for make in (random.Random, np.random.default_rng):
        a = w.sample_scene(make(3), 128, 128, caption_style="any")
        b = w.sample_scene(make(3), 128, 128, caption_style="any")
        assert a == b
        assert np.array_equal(np.asarray(w.render(a)), np.asarray(w.render(b)))


def test_random_canonical_captions_are_deterministic_and_parse():
    captions = w.random_canonical_captions(50, seed=4, kind="two")
    assert captions == w.random_canonical_captions(50, seed=4, kind="two")
    assert all("relation" in w.parse_caption(c) for c in captions)
    assert all("relation" not in w.parse_caption(c) for c in w.random_canonical_captions(50, seed=4, kind="one"))


# -------------------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("height,width", SIZES)
def test_palette_is_exact(height, width):
    for scene in _scenes(40, height, width, seed=height + width):
        image = w.render(scene)
        array = np.asarray(image)
        background = w.PALETTE_BACKGROUNDS[scene.background]
        assert image.mode == "RGB" and image.size == (width, height)
        assert (array == background).all(axis=2).mean() > 0.5
        for spec in scene.objects:
            assert _pixel(image, spec, height, width) == w.PALETTE_OBJECTS[spec.colour]


@pytest.mark.parametrize("height,width", SIZES)
def test_one_object_position_size_and_canvas(height, width):
    for scene in _scenes(150, height, width, kind="one", seed=1):
        (spec,) = scene.objects
        x, y = w.POSITIONS[scene.attributes["position"]]
        assert abs(spec.cx - x) <= w.POSITION_JITTER + 1e-9 and abs(spec.cy - y) <= w.POSITION_JITTER + 1e-9
        low, high = w.SIZES[scene.attributes["size"]] if scene.attributes["size"] else w.ANY_SIZE
        assert low <= spec.r <= high
        assert w.inside_canvas(spec, height, width)
        assert (spec.colour, spec.shape) == (scene.attributes["colour"], scene.attributes["shape"])


@pytest.mark.parametrize("height,width", SIZES)
def test_two_objects_relation_overlap_and_canvas(height, width):
    for scene in _scenes(150, height, width, kind="two", seed=2):
        a, b = scene.objects
        attrs = scene.attributes
        assert (a.colour, a.shape, b.colour, b.shape) == (
            attrs["colour_a"],
            attrs["shape_a"],
            attrs["colour_b"],
            attrs["shape_b"],
        )
        assert a.colour != b.colour
        assert all(w.TWO_OBJECT_SIZE[0] <= s.r <= w.TWO_OBJECT_SIZE[1] for s in (a, b))
        assert not w.boxes_overlap(a, b, height, width)
        assert w.inside_canvas(a, height, width) and w.inside_canvas(b, height, width)
        axis = "cx" if "left" in attrs["relation"] or "right" in attrs["relation"] else "cy"
        first_smaller = attrs["relation"] in ("to the left of", "above")
        near, far = (a, b) if first_smaller else (b, a)
        assert w.NEAR_RANGE[0] <= getattr(near, axis) <= w.NEAR_RANGE[1]
        assert w.FAR_RANGE[0] <= getattr(far, axis) <= w.FAR_RANGE[1]
        other = "cy" if axis == "cx" else "cx"
        assert all(w.FREE_RANGE[0] <= getattr(s, other) <= w.FREE_RANGE[1] for s in (a, b))


def test_star_triangle_and_circle_cover_their_area():
    side = 160
    for shape, area in (("circle", np.pi), ("square", 4.0), ("triangle", 2.0), ("star", 5 * 0.45 * np.sin(np.pi / 5))):
        scene = w.Scene(side, side, "black", [w.ShapeSpec(shape, "red", 0.5, 0.5, 0.2)], "", "one", {})
        coverage = (np.asarray(w.render(scene))[..., 0].astype(float) - 24) / (220 - 24)
        assert coverage.sum() == pytest.approx(area * (0.2 * side) ** 2, rel=0.03)


# -------------------------------------------------------------------------------------------------------- captions


def test_canonical_captions_format_and_round_trip():
    for scene in _scenes(300, 128, 128, seed=5):
        caption = scene.caption
        assert CANONICAL.fullmatch(caption), caption
        assert caption == caption.lower() and "  " not in caption
        assert caption.endswith(" background") and caption.startswith("a ")
        assert w.parse_caption(caption) == scene.attributes
        assert w.canonical_caption(scene.attributes) == caption
    assert w.parse_caption("a large red circle at the top left on a white background") == {
        "colour": "red",
        "shape": "circle",
        "position": "top left",
        "size": "large",
        "background": "white",
    }
    assert w.parse_caption("a yellow square above a purple triangle on a gray background")["relation"] == "above"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle",
        "red circle, top left, white background",
        "a Red circle at the top left on a white background",
        "a red  circle at the top left on a white background",
        "a red circle at the top left on a pink background",
        "a red circle above a red square on a gray background",
    ],
)
def test_parse_caption_rejects_non_canonical(text):
    with pytest.raises(ValueError, match="caption"):
        w.parse_caption(text)


def _is_canonical(caption: str) -> bool:
    try:
        w.parse_caption(caption)
    except ValueError:
        return False
    return True


ONE_WORDS = {
    "colour": set(w.PALETTE_OBJECTS),
    "shape": set(w.SHAPES),
    "background": set(w.PALETTE_BACKGROUNDS),
    "position": {"top", "bottom", "left", "right", "center"},
}


def test_any_style_states_only_what_the_scene_shows():
    scenes = _scenes(600, 128, 128, style="any", seed=6)
    vocabulary = set(w.vocabulary())
    for scene in scenes:
        tokens = w.tokenize(scene.caption)
        assert set(tokens) <= vocabulary and len(tokens) <= 22, scene.caption
        if scene.kind == "two":
            a, b = scene.objects
            drawn = {"colour_a": a.colour, "shape_a": a.shape, "colour_b": b.colour, "shape_b": b.shape}
            assert all(scene.attributes[k] in (None, v) for k, v in drawn.items())
            continue
        (spec,) = scene.objects
        stated = scene.attributes
        drawn = {"colour": spec.colour, "shape": spec.shape, "background": scene.background}
        for key, words in ONE_WORDS.items():
            if stated[key] is None:
                assert not words & set(tokens), (key, scene.caption)
            elif key in drawn:
                assert stated[key] == drawn[key] and stated[key] in tokens
        if stated["position"]:
            x, y = w.POSITIONS[stated["position"]]
            assert abs(spec.cx - x) <= w.POSITION_JITTER + 1e-9 and abs(spec.cy - y) <= w.POSITION_JITTER + 1e-9
        low, high = w.SIZES[stated["size"]] if stated["size"] else w.ANY_SIZE
        assert low <= spec.r <= high
    captions = [s.caption for s in scenes]
    canonical = sum(map(_is_canonical, captions)) / len(captions)
    empty = captions.count("") / len(captions)
    assert 0.5 < canonical < 0.72 and 0.01 < empty < 0.1
    assert sum(1 for c in captions if c and not _is_canonical(c)) > 100


def test_vocabulary_is_sorted_and_covers_canonical_words():
    vocabulary = w.vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    assert {",", ":", "red", "circle", "star", "top", "left", "above", "background", "shape"} <= set(vocabulary)
    assert w.tokenize("Top left: a red circle, on white") == [
        "top",
        "left",
        ":",
        "a",
        "red",
        "circle",
        ",",
        "on",
        "white",
    ]


# ------------------------------------------------------------------------------------------------------- evaluation


def _bfs_labels(classes: np.ndarray) -> np.ndarray:
    labels = np.zeros(classes.shape, dtype=int)
    count = 0
    for start in zip(*np.nonzero(classes >= 0)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    inside = 0 <= v < classes.shape[0] and 0 <= u < classes.shape[1]
                    if inside and not labels[v, u] and classes[v, u] == classes[y, x]:
                        labels[v, u] = count
                        queue.append((v, u))
    return labels


def test_label_regions_matches_breadth_first_search():
    rng = np.random.default_rng(0)
    for _ in range(60):
        classes = rng.integers(-1, 3, size=tuple(rng.integers(1, 14, size=2)))
        labels, count = ev.label_regions(classes)
        reference = _bfs_labels(classes)
        assert count == reference.max()
        assert len(set(zip(labels.ravel(), reference.ravel()))) == len(np.unique(labels))


@pytest.mark.parametrize("size", w.CANVAS_SIZES)
def test_evaluator_scores_the_dataset_renders(size):
    for kind in ("one", "two"):
        results = ev.evaluate_renders(n=100, seed=size, sizes=[size], kind=kind)[f"{size}x{size}"]
        accuracy = results["accuracy"][kind]
        assert results["support"][kind]["all"] == 100
        assert min(accuracy.values()) >= 0.99, ev.format_table(results)


def test_the_shipped_vae_keeps_what_the_evaluator_reads(embedded_pipeline):
    """The latent space is no ceiling: renders passed through the embedded model's VAE still score ≥ 99 %."""
    vae = embedded_pipeline.vae
    caption = ["a large red circle at the top left on a white background"]
    render = np.asarray(ev.render_generate_fn()(caption, [0])[0], dtype=np.float32)
    round_trip = np.asarray(ev.through_vae(ev.render_generate_fn(), vae)(caption, [0])[0], dtype=np.float32)
    assert 0 < np.abs(render - round_trip).mean() < 8, "the images went through the VAE, which keeps them close"
    results = ev.evaluate_renders(n=60, seed=5, sizes=[128], vae=vae)["128x128"]
    for kind in ("one", "two"):
        assert min(results["accuracy"][kind].values()) >= 0.99, ev.format_table(results)


def test_evaluator_flags_wrong_images():
    rng = random.Random(0)
    caption = "a large red circle at the top left on a white background"
    wrong = w.scene_from_caption("a small blue square at the bottom right on a black background", rng)
    scores = ev.score(caption, w.render(wrong))
    assert not any(scores[k] for k in ("background", "colour", "shape", "position", "size", "all"))
    assert scores["count"]
    right = ev.score(caption, w.render(w.scene_from_caption(caption, rng)))
    assert all(right.values()) and set(right) == {"background", "colour", "shape", "position", "size", "count", "all"}

    empty = w.Scene(128, 128, "white", [], "", "one", {})
    scores = ev.score(caption, w.render(empty))
    assert scores["background"] and not scores["count"] and not scores["all"]

    two = "a red circle to the left of a blue square on a gray background"
    swapped = w.scene_from_caption("a red circle to the right of a blue square on a gray background", rng)
    scores = ev.score(two, w.render(swapped))
    assert scores["object_a"] and scores["object_b"] and not scores["relation"] and not scores["all"]
    assert not ev.score(caption, w.render(swapped))["count"]
    assert not ev.score(two, w.render(w.scene_from_caption(caption, rng)))["all"]


def test_read_image_reports_geometry():
    scene = w.Scene(128, 160, "gray", [w.ShapeSpec("star", "purple", 0.75, 0.25, 0.19)], "", "one", {})
    (obj,) = ev.read_image(w.render(scene))["objects"]
    assert (obj["colour"], obj["shape"], obj["position"], obj["size"]) == ("purple", "star", "top right", "large")
    assert obj["cx"] == pytest.approx(0.75, abs=0.01) and obj["r"] == pytest.approx(
        0.19 * np.sin(0.4 * np.pi), abs=0.01
    )


def test_evaluate_calls_generate_fn_in_chunks_and_formats_a_table():
    calls = []
    truth = ev.render_generate_fn(96, 96)

    def generate(captions, seeds):
        calls.append(len(captions))
        return truth(captions, seeds)

    results = ev.evaluate(generate, n=20, seed=1, kind="both", height=96, width=96, batch_size=8)
    assert calls == [8, 8, 4] and len(results["records"]) == 20 and results["all"] == 1.0
    table = ev.format_table(results)
    assert table.splitlines()[0].startswith("| canvas | kind | n |") and "96x96" in table


def test_cli_render_and_eval_renders(tmp_path, capsys):
    from workbench.shapesworld.cli_data import add_data_commands

    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["render", "--out-dir", str(tmp_path), "--n", "3", "--seed", "1", "--size", "96"])
    assert args.run(args) == 0
    lines = (tmp_path / "captions.txt").read_text().splitlines()
    assert len(lines) == 3 and all((tmp_path / line.split("\t")[0]).exists() for line in lines)
    assert not (tmp_path / "00000.txt").exists()
    args = parser.parse_args(["render", "--out-dir", str(tmp_path / "lora"), "--n", "2", "--caption-files"])
    assert args.run(args) == 0
    from workbench.lora_training import read_image_folder

    images, captions = read_image_folder(tmp_path / "lora")
    assert len(images) == 2 and captions == [
        line.split("\t")[1] for line in (tmp_path / "lora" / "captions.txt").read_text().splitlines()
    ]
    args = parser.parse_args(["eval-renders", "--n", "10", "--sizes", "96"])
    assert args.run(args) == 0 and "| 96x96 |" in capsys.readouterr().out


def test_eval_command_prints_the_table_and_each_experts_token_share(capsys):
    from workbench.shapesworld.__main__ import main

    assert main(["eval", "--n", "2", "--size", "96", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| 96x96 | one | 1 |" in printed and "| 96x96 | two | 1 |" in printed
    rows = re.findall(r"block (\d+): (.+)", printed)
    assert [int(b) for b, _ in rows] == [1, 3, 5]
    for _, shares in rows:
        values = [float(v) for v in re.findall(r"([\d.]+) %", shares)]
        assert len(values) == 4 and abs(sum(values) - 100) < 0.5
