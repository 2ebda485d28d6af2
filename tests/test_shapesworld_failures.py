"""The failure breakdown on generators that go wrong in known ways (the dataset's renderer, altered)."""

import dataclasses
import json
import random

from workbench.shapesworld import evaluate as ev
from workbench.shapesworld import failures
from workbench.shapesworld import world as w


def faulty_generate(captions, seeds):
    """Renders each caption, except: one object is always drawn as a square; of the two-object scenes, seed % 3 == 0
    paints object b in object a's colour, seed % 3 == 1 drops object b, seed % 3 == 2 is drawn right."""
    images = []
    for caption, seed in zip(captions, seeds):
        scene = w.scene_from_caption(caption, random.Random(seed))
        if scene.kind == "one":
            scene.objects = [dataclasses.replace(scene.objects[0], shape="square")]
        elif seed % 3 == 0:
            scene.objects = [scene.objects[0], dataclasses.replace(scene.objects[1], colour=scene.objects[0].colour)]
        elif seed % 3 == 1:
            scene.objects = scene.objects[:1]
        images.append(w.render(scene))
    return images


def test_breakdown_names_the_known_faults():
    results = ev.evaluate(faulty_generate, n=90, seed=4, height=128, width=128)
    records = results["records"]
    assert all("objects" in r and "background" in r for r in records)
    result = failures.breakdown(records)
    one = result["one"]
    assert one["by_shape"]["square"][0] > 0.9
    assert all(one["by_shape"][shape][0] == 0 for shape in ("circle", "triangle", "star") if shape in one["by_shape"])
    for stated, counts in one["shape_confusion"].items():
        assert max(counts, key=counts.get) == "square", (stated, counts)
    reasons = result["two"]["reasons"]
    two = [r for r in records if r["kind"] == "two"]
    assert result["two"]["n"] == len(two) and set(reasons) == set(failures.TWO_OBJECT_REASONS)
    painted = sum(r["seed"] % 3 == 0 for r in two)
    dropped = sum(r["seed"] % 3 == 1 for r in two)
    assert reasons["colour missing"] >= painted - 2 and reasons["missing object"] >= dropped - 2
    assert sum(reasons.values()) == sum(not r["scores"]["all"] for r in two)
    table = failures.format_breakdown(records)
    assert "| stated shape → read as |" in table and "| colour missing |" in table
    json.dumps(records)  # what `eval --records` writes


def test_eval_command_writes_breakdown_and_records(tmp_path, capsys):
    from workbench.shapesworld.__main__ import main

    path = tmp_path / "records.jsonl"
    assert main(["eval", "--n", "2", "--size", "96", "--steps", "2", "--breakdown", "--records", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "two objects: first failure" in printed
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["kind"] for r in rows) == ["one", "two"]
    assert {"caption", "seed", "scores", "objects"} <= set(rows[0])


def test_sensitivity_command_probes_the_quantized_default_generation(capsys):
    from workbench.shapesworld.__main__ import main

    argv = ["sensitivity", "--n", "3", "--sigmas", "0.9", "--quantization", "int8", "--layout-control", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layout control 1, int8" in printed
    flipped = next(line for line in printed.splitlines() if line.startswith("| two | relation flipped |"))
    assert float(flipped.split("|")[3]) > 0.2  # the plan moves with the relation (the weights alone: about 0.06)


def test_edited_captions_change_only_what_they_name():
    from workbench.shapesworld.sensitivity import edited_caption

    two = "a red circle to the left of a blue square on a white background"
    assert edited_caption(two, "colours swapped") == "a blue circle to the left of a red square on a white background"
    assert edited_caption(two, "shapes swapped") == "a red square to the left of a blue circle on a white background"
    assert edited_caption(two, "relation flipped") == "a red circle to the right of a blue square on a white background"
    recoloured = w.parse_caption(edited_caption(two, "colour of a"))
    assert recoloured["colour_a"] not in ("red", "blue") and recoloured["colour_b"] == "blue"
    assert edited_caption("a red star above a blue star on a gray background", "shapes swapped") is None
    one = "a large red circle at the top left on a white background"
    assert edited_caption(one, "position") == "a large red circle at the bottom right on a white background"
    assert w.parse_caption(edited_caption(one, "shape"))["shape"] != "circle"


def test_caption_sensitivity_on_a_micro_model():
    import torch

    from workbench.shapesworld.model import ShapesWorldSpec, build_pipeline
    from workbench.shapesworld.sensitivity import caption_sensitivity, format_sensitivity

    pipe = build_pipeline(ShapesWorldSpec.micro())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised gates would make the velocity ignore the text
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    result = caption_sensitivity(pipe, n=6, seed=1, sigmas=(0.8, 0.4), size=96)
    assert set(result) == {"one", "two"} and set(result["two"]) == {
        "colour of a",
        "colours swapped",
        "shapes swapped",
        "relation flipped",
    }
    values = [v for edits in result.values() for per_sigma in edits.values() for v in per_sigma.values()]
    assert len(values) == 2 * 7 and all(0 < v < 100 for v in values)
    table = format_sensitivity(result)
    assert "| two | relation flipped |" in table and "σ = 0.8" in table
