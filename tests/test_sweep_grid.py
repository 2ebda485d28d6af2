"""Sweep configs: validation messages, grid expansion, stable cell ids, batching, the results table and X/Y grids
(no model needed)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from workbench import sweep, viz

PROMPTS = ["a red circle at the top on a white background", "a blue star at the center on a black background"]


def _config(tmp_path, **overrides):
    data = {"output_dir": str(tmp_path / "out"), "prompts": PROMPTS, "seeds": [0, 1], "guidance": [1, 4], "steps": 4}
    data.update(overrides)
    return sweep.parse_config({k: v for k, v in data.items() if v is not None})


def test_expansion_is_the_cartesian_product_in_run_order(tmp_path):
    config = _config(tmp_path, sampler=["euler", "heun"])
    cells = sweep.expand(config)
    assert len(cells) == 2 * 2 * 2 * 2
    assert config.varying_axes() == ["prompt", "seed", "guidance", "sampler"]
    assert len({c.id for c in cells}) == len(cells)
    assert [(c.prompt, c.seed) for c in cells[:4]] == [(p, s) for p in PROMPTS for s in (0, 1)]
    assert {(c.settings["guidance"], c.settings["sampler"]) for c in cells} == {
        (g, s) for g in (1.0, 4.0) for s in ("euler", "heun")
    }
    first = cells[0]
    assert first.name == "p0-s0-cfg1-samplereuler" and first.file == f"images/{first.name}-{first.id}.png"
    assert first.settings["steps"] == 4 and first.settings["shift"] is None


def test_ids_are_stable_and_depend_on_everything_that_shapes_the_image(tmp_path):
    ids = [c.id for c in sweep.expand(_config(tmp_path))]
    assert ids == [c.id for c in sweep.expand(_config(tmp_path, guidance=[1.0, 4.0]))]
    assert ids == [c.id for c in sweep.expand(_config(tmp_path / "elsewhere"))]
    for change in ({"steps": 5}, {"height": 96}, {"model": "other"}, {"negative_prompt": "blurry"}):
        assert set(ids).isdisjoint(c.id for c in sweep.expand(_config(tmp_path, **change))), change


def test_expert_weights_flat_list_is_one_value_and_list_of_lists_an_axis(tmp_path):
    one = _config(tmp_path, expert_weights=[1, 0, 1, 1])
    assert one.axes["expert_weights"] == [[1.0, 0.0, 1.0, 1.0]]
    axis = _config(tmp_path, expert_weights=[None, [1, 0, 1, 1], {"1": [1, 1, 0, 1]}])
    assert axis.axes["expert_weights"] == [None, [1.0, 0.0, 1.0, 1.0], {1: [1.0, 1.0, 0.0, 1.0]}]
    assert len(sweep.expand(axis)) == 3 * len(sweep.expand(_config(tmp_path)))


def test_guidance_interval_and_skip_layers_pairs_are_one_value_lists_of_pairs_an_axis(tmp_path):
    one = _config(tmp_path, guidance_interval=[0.2, 1], skip_layers=[7, 8, 9])
    assert one.axes["guidance_interval"] == [[0.2, 1.0]] and one.axes["skip_layers"] == [[7, 8, 9]]
    axis = _config(tmp_path, guidance_interval=[None, [0.2, 1]], skip_layers=[None, [1], [1, 2]])
    cells = sweep.expand(axis)
    assert len(cells) == 2 * 3 * len(sweep.expand(_config(tmp_path)))
    kwargs = sweep.pipeline_kwargs(cells[-1].settings)
    assert kwargs["guidance_interval"] == [0.2, 1.0] and kwargs["skip_guidance_layers"] == [1, 2]


def test_quantization_is_the_outermost_axis(tmp_path):
    cells = sweep.expand(_config(tmp_path, quantization=[None, "int8"]))
    values = [c.settings["quantization"] for c in cells]
    assert values == [None] * 8 + ["int8"] * 8


def test_work_units_batch_cells_of_equal_settings(tmp_path):
    config = _config(tmp_path, batch_size=3)
    units = sweep.work_units(config, sweep.expand(config))
    assert [len(u) for u in units] == [3, 1, 3, 1]
    assert all(len({c.settings_key for c in u}) == 1 for u in units)


def test_evaluate_cells_pair_captions_with_evaluation_seeds(tmp_path):
    data = {"output_dir": str(tmp_path), "evaluate": {"n": 5, "kind": "one", "seed": 2}, "guidance": [1, 4]}
    config = sweep.parse_config(data)
    cells = sweep.expand(config)
    assert len(cells) == 10
    assert [c.seed for c in cells[:5]] == [200_000 + i for i in range(5)]
    assert [c.prompt for c in cells[:5]] == [c.prompt for c in cells[5:]]
    assert config.varying_axes() == ["guidance"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"guidance": "high"}, ["guidance", "'high'"]),
        ({"guidance": [1, 1.0]}, ["guidance", "twice"]),
        ({"steps": 2.5}, ["steps", "2.5"]),
        ({"steps": 0}, ["steps", "0"]),
        ({"sampler": ["euler", "ddim"]}, ["sampler", "'ddim'", "heun"]),
        ({"quantization": "int4"}, ["quantization", "'int4'", "nf4"]),
        ({"expert_weights": [1, -1, 1, 1]}, ["expert_weights", "-1"]),
        ({"router_temperature": 0}, ["router_temperature", "0"]),
        ({"guidance_interval": [0.8, 0.2]}, ["guidance_interval", "0.8", "low <= high"]),
        ({"skip_layers": [1.5]}, ["skip_layers", "1.5", "block indices"]),
        ({"seeds": [1, 1]}, ["seeds", "twice"]),
        ({"seeds": "one"}, ["seeds", "'one'"]),
        ({"prompts": []}, ["prompts", "[]"]),
        ({"colour": "red"}, ["unknown config keys", "colour"]),
        ({"height": 100.5}, ["height", "100.5"]),
        ({"batch_size": 0}, ["batch_size", "0"]),
        ({"device": "gpu"}, ["device", "'gpu'"]),
        ({"output_dir": ""}, ["output_dir", "''"]),
        ({"evaluate": {"n": 10}}, ["evaluate", "prompts", "seeds"]),
        ({"grids": {"pairs": [["guidance", "steps"]]}}, ["grids.pairs", "'steps'", "varying axes"]),
        ({"grids": {"others": "some"}}, ["grids.others", "'some'"]),
    ],
)
def test_bad_config_names_key_and_value(tmp_path, overrides, words):
    with pytest.raises(ValueError) as info:
        _config(tmp_path, **overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_evaluate_spec_names_key(tmp_path):
    base = {"output_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=r"evaluate.kind.*'three'"):
        sweep.parse_config({**base, "evaluate": {"kind": "three"}})
    with pytest.raises(ValueError, match=r"evaluate has unknown keys \['size'\]"):
        sweep.parse_config({**base, "evaluate": {"size": 3}})


def test_config_files_yaml_json_and_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    yaml_file = tmp_path / "sweep.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path / 'o'}\nprompts_file: {prompts}\nseeds: {{start: 3, count: 2}}\n")
    config = sweep.load_config(yaml_file)
    assert config.prompts == PROMPTS and config.seeds == [3, 4]
    json_file = tmp_path / "sweep.json"
    json_file.write_text(json.dumps({"output_dir": "x", "prompts": PROMPTS[0], "shift": [1, 3]}))
    assert sweep.load_config(json_file, output_dir=tmp_path / "y").output_dir == tmp_path / "y"
    json_file.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        sweep.load_config(json_file)


def test_merge_results_folds_parts_once_and_ignores_a_torn_line(tmp_path):
    (tmp_path / sweep.RESULTS_NAME).write_text(json.dumps({"id": "a", "v": 1}) + "\n")
    (tmp_path / "results.part-0.jsonl").write_text(json.dumps({"id": "b", "v": 2}) + "\n")
    (tmp_path / "results.part-1.jsonl").write_text(json.dumps({"id": "a", "v": 3}) + "\n" + '{"id": "c", "v"')
    rows = sweep.merge_results(tmp_path, order=["b", "a"])
    assert [(r["id"], r["v"]) for r in rows] == [("b", 2), ("a", 3)]
    assert not list(tmp_path.glob(sweep.PART_PATTERN))
    assert sweep.read_rows(tmp_path / sweep.RESULTS_NAME) == rows


def test_draw_grid_places_tiles_under_labels():
    red, blue = Image.new("RGB", (32, 24), (255, 0, 0)), Image.new("RGB", (32, 24), (0, 0, 255))
    grid = viz.labelled_grid([[red, blue], [blue, None]], ["guidance=1", "guidance=4"], ["seed=0", "seed=1"], "title")
    left, top = grid.width - 64, grid.height - 48
    assert grid.getpixel((left + 5, top + 5)) == (255, 0, 0)
    assert grid.getpixel((left + 37, top + 5)) == (0, 0, 255)
    assert grid.getpixel((left + 37, top + 29)) == (200, 200, 200)
    assert grid.getpixel((2, grid.height - 1)) == (255, 255, 255)


def test_cell_ids_of_earlier_sweeps_stay_as_they_were(tmp_path):
    """A rerun recognises finished cells by id: ids computed before skip_layer_start / skip_layer_stop existed. Layout
    guidance and control now default to the model's (on for the embedded model), which makes other images: a cell
    that leaves them to the model gets a new id, one that turns them off keeps the old one."""
    base = {"output_dir": str(tmp_path), "prompts": ["a"], "seeds": [0]}
    plain = sweep.expand(sweep.parse_config(base))
    assert [c.id for c in plain] == ["c5e0410816"]
    layout_off = {"layout_guidance": [0.0], "layout_control": [0.0]}
    off = sweep.expand(sweep.parse_config({**base, **layout_off}))
    assert [c.id for c in off] == ["d338c890af"]
    grid = {"output_dir": str(tmp_path), "prompts": ["a"], "guidance": [5, 6.0, 7.5], "steps": [24, 32], **layout_off}
    assert sweep.expand(sweep.parse_config({**grid, "sampler": ["euler", "heun"]}))[0].id == "56cc89ca8a"
    later = sweep.parse_config({**base, "skip_layer_start": [0.01, 0.1], **layout_off})
    cells = sweep.expand(later)
    assert cells[0].id == "d338c890af" and cells[1].id != cells[0].id
    assert sweep.pipeline_kwargs(cells[1].settings)["skip_layer_guidance_start"] == 0.1
