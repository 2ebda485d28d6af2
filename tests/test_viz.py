"""workbench.viz on synthetic records with known answers and on a micro random ShapesWorld model."""

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from workbench import RoutingRecord, viz
from workbench.flow import Trajectory, sigma_schedule


def synthetic_record(gates_by_step_block: dict[tuple[int, int], torch.Tensor], grid: tuple[int, int]) -> RoutingRecord:
    record = RoutingRecord(grid=grid)
    for (step, block), gates in gates_by_step_block.items():
        record.step = step
        record.add(block, gates)
    return record


def one_hot_gates(assignment: np.ndarray, experts: int, batch: int = 1) -> torch.Tensor:
    """(batch, N, E) gates: 0.7 on the assigned expert, the rest shared evenly."""
    flat = torch.as_tensor(assignment.ravel())
    gates = torch.full((flat.numel(), experts), 0.3 / (experts - 1))
    gates[torch.arange(flat.numel()), flat] = 0.7
    return gates.unsqueeze(0).expand(batch, -1, -1).clone()


def straight_trajectory(start: torch.Tensor, end: torch.Tensor, steps: int) -> Trajectory:
    """The exact straight flow from noise ``start`` (σ=1) to ``end``: constant velocity start − end."""
    trajectory = Trajectory()
    sigmas = sigma_schedule(steps, 1.0).tolist()
    x = start.clone()
    v = start - end
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        trajectory.add(s, x, v, x - s * v)
        x = x + (s_next - s) * v
    trajectory.final = x
    return trajectory


@pytest.fixture(scope="module")
def micro_run():
    """A micro random MoE model with perturbed weights (non-zero velocities, non-uniform routing), two images."""
    from tiny_sd3 import random_shapesworld

    pipe = random_shapesworld(noise_seed=1, sharp_routers=True)
    prompts = ["a red circle at the center on a white background", "a blue star at the top on a black background"]
    out = pipe(prompts, seed=0, num_inference_steps=5, height=64, width=64, record_trajectory=True, record_routing=True)
    return pipe, out


# ------------------------------------------------------------------------------------------------------------ routing


def test_region_map_paints_argmax_expert_of_each_token():
    assignment = np.array([[0, 1, 2], [2, 1, 0]])
    record = synthetic_record({(0, 1): one_hot_gates(assignment, 3), (1, 1): one_hot_gates(assignment, 3)}, (2, 3))
    image = Image.new("RGB", (60, 40), (128, 128, 128))
    painted = viz.expert_region_map(record, image, alpha=1.0, legend=False)
    assert painted.size == image.size
    pixels = np.asarray(painted)
    for (row, col), expert in np.ndenumerate(assignment):
        assert tuple(pixels[row * 20 + 10, col * 20 + 10]) == viz.expert_colour(int(expert))
    untouched = viz.expert_region_map(record, image, alpha=0.0, legend=False)
    assert np.array_equal(np.asarray(untouched), np.asarray(image))
    with_legend = viz.expert_region_map(record, image, alpha=0.5)
    assert with_legend.width == 60 and with_legend.height > 40


def test_region_map_averages_over_chosen_steps_and_blocks():
    first, second = np.zeros((2, 2), int), np.ones((2, 2), int)
    record = synthetic_record(
        {(0, 0): one_hot_gates(first, 2), (1, 0): one_hot_gates(second, 2), (2, 0): one_hot_gates(second, 2)}, (2, 2)
    )
    assert (viz.expert_assignment(record, step=0) == 0).all()
    assert (viz.expert_assignment(record) == 1).all()
    with pytest.raises(ValueError, match="step"):
        viz.expert_assignment(record, step=7)
    with pytest.raises(ValueError, match="block"):
        viz.expert_assignment(record, block=3)
    with pytest.raises(ValueError, match="batch_index"):
        viz.expert_assignment(record, batch_index=1)


def test_entropy_is_one_for_uniform_and_zero_for_one_expert():
    uniform = torch.full((2, 6, 4), 0.25)
    collapsed = torch.zeros(2, 6, 4)
    collapsed[..., 2] = 1.0
    record = synthetic_record({(0, 1): uniform, (0, 3): collapsed}, (2, 3))
    entropy = viz.load_balance_entropy(record)
    assert entropy[1] == pytest.approx(1.0, abs=1e-4)
    assert entropy[3] == pytest.approx(0.0, abs=1e-4)
    rows = viz.expert_share_per_block(record)
    assert [row["block"] for row in rows] == [1, 3]
    assert rows[1]["expert_2"] == pytest.approx(1.0) and rows[1]["entropy"] == pytest.approx(0.0, abs=1e-4)
    assert sum(rows[0][f"expert_{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-3)


def test_share_of_one_batch_entry_and_conditional_indices():
    gates = torch.zeros(4, 2, 2)
    gates[:2, :, 0] = 1.0
    gates[2:, :, 1] = 1.0
    record = synthetic_record({(0, 0): gates}, (1, 2))
    assert viz.conditional_indices(record, 2) == [2, 3]
    assert viz.conditional_indices(record, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_images"):
        viz.conditional_indices(record, 3)
    assert viz.expert_share_per_block(record, batch_index=3)[0]["expert_1"] == pytest.approx(1.0)
    assert viz.expert_share_per_block(record)[0]["expert_1"] == pytest.approx(0.5)


def test_usage_heatmap_panels_hold_mean_share_per_block_and_step(micro_run):
    _, out = micro_run
    record = out.routing
    figure = viz.expert_usage_heatmap(record, batch_index=2)
    assert isinstance(figure, Figure)
    panels = [ax for ax in figure.axes if ax.images and ax.get_title().startswith("expert")]
    assert len(panels) == 4
    expected = record.stacked(2).mean(dim=2)
    for e, ax in enumerate(panels):
        data = np.asarray(ax.images[0].get_array())
        assert data.shape == (len(record.blocks()), len(record.steps()))
        np.testing.assert_allclose(data, expected[:, :, e].T.numpy(), atol=1e-6)
    assert "block × step" in figure._suptitle.get_text()
    with pytest.raises(ValueError, match="batch_index"):
        viz.expert_usage_heatmap(record, batch_index=4)


def test_empty_record_and_bad_alpha_are_rejected():
    with pytest.raises(ValueError, match="record_routing"):
        viz.expert_usage_heatmap(RoutingRecord())
    record = synthetic_record({(0, 0): torch.full((1, 4, 2), 0.5)}, (2, 2))
    with pytest.raises(ValueError, match="alpha"):
        viz.expert_region_map(record, Image.new("RGB", (8, 8)), alpha=1.5)


def test_attribute_share_heatmap_groups_images():
    shares = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]])
    absolute = viz.attribute_share_heatmap(shares, ["red", "blue", "red"], [3], relative=False)
    block_panel = next(ax for ax in absolute.axes if ax.get_title() == "block 3")
    np.testing.assert_allclose(np.asarray(block_panel.images[0].get_array()), [[0.0, 1.0], [0.75, 0.25]])
    assert [t.get_text() for t in block_panel.texts] == ["0.00", "1.00", "0.75", "0.25"]
    relative = viz.attribute_share_heatmap(shares, ["red", "blue", "red"], [3])
    block_panel = next(ax for ax in relative.axes if ax.get_title() == "block 3")
    mean = shares.mean(0)[0].numpy()
    np.testing.assert_allclose(np.asarray(block_panel.images[0].get_array()), [[0.0, 1.0] - mean, [0.75, 0.25] - mean])
    with pytest.raises(ValueError, match="labels"):
        viz.attribute_share_heatmap(shares, ["red"], [3])


# --------------------------------------------------------------------------------------------------------- trajectory


def test_trajectory_strip_has_one_labelled_tile_per_frame(micro_run):
    pipe, out = micro_run
    strip = viz.trajectory_strip(pipe, out.trajectory, batch_index=1, max_frames=3)
    tile = out.images[0].size
    assert strip.size == (3 * tile[0] + 2 * 2, tile[1] + viz.LABEL_HEIGHT)
    expected = pipe.decode_latents(out.trajectory.x0[-1][1:2])[0]
    last = strip.crop((2 * (tile[0] + 2), 0, 2 * (tile[0] + 2) + tile[0], tile[1]))
    assert np.array_equal(np.asarray(last), np.asarray(expected))
    with pytest.raises(ValueError, match="batch_index"):
        viz.trajectory_strip(pipe, out.trajectory, batch_index=2)


def test_frame_indices_keep_first_and_last():
    assert viz.frame_indices(5, 12) == [0, 1, 2, 3, 4]
    chosen = viz.frame_indices(20, 6)
    assert chosen[0] == 0 and chosen[-1] == 19 and len(chosen) == 6
    with pytest.raises(ValueError, match="max_frames"):
        viz.frame_indices(5, 0)


def test_step_deviations_integrate_to_straightness(micro_run):
    _, out = micro_run
    trajectory = out.trajectory
    deviations = viz.step_deviations(trajectory)
    sigmas = trajectory.sigmas + [0.0]
    weights = torch.tensor([a - b for a, b in zip(sigmas[:-1], sigmas[1:])])
    assert torch.allclose((weights[:, None] * deviations).sum(0), trajectory.straightness(), rtol=1e-4)
    assert float(trajectory.straightness().min()) > 0
    figure = viz.straightness_plot(trajectory, labels=["red", "blue"])
    lines = figure.axes[0].get_lines()
    np.testing.assert_allclose(lines[1].get_ydata(), deviations[:, 1].numpy(), rtol=1e-6)
    assert "S = " in figure.axes[0].get_title()


def test_straight_path_has_zero_deviation():
    generator = torch.Generator().manual_seed(0)
    start, end = torch.randn(1, 16, 2, 2, generator=generator), torch.randn(1, 16, 2, 2, generator=generator)
    trajectory = straight_trajectory(start, end, 6)
    assert torch.allclose(trajectory.final, end, atol=1e-5)
    assert float(viz.step_deviations(trajectory).abs().max()) < 1e-8


def test_pca_of_planar_paths_preserves_their_geometry():
    generator = torch.Generator().manual_seed(0)
    origin = torch.randn(1, 16, 2, 2, generator=generator)
    u, w = torch.randn(2, 1, 16, 2, 2, generator=generator)
    a = straight_trajectory(origin + 3 * u, origin - w, 4)
    b = straight_trajectory(origin - 2 * w, origin + u, 4)
    figure = viz.latent_path_pca([a, b], ["a", "b"])
    solid = [line for line in figure.axes[0].get_lines() if line.get_linestyle() == "-"]
    assert len(solid) == 2
    projected = np.stack([solid[0].get_xdata(), solid[0].get_ydata()], 1)
    original = torch.stack([*a.latents, a.final]).flatten(1).double().numpy()
    distances = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)
    np.testing.assert_allclose(distances(projected), distances(original), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="labels"):
        viz.latent_path_pca([a, b], ["a"])


# ------------------------------------------------------------------------------------------------------------ helpers


def test_image_grid_places_tiles_row_major():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (10, 8), c) for c in colours]
    grid = viz.image_grid(images, 2, 2)
    assert grid.size == (2 * 10 + 2, 2 * 8 + 2)
    assert grid.getpixel((5, 4)) == colours[0]
    assert grid.getpixel((12 + 5, 4)) == colours[1]
    assert grid.getpixel((5, 10 + 4)) == colours[2]
    assert grid.getpixel((12 + 5, 10 + 4)) == (255, 255, 255)
    labelled = viz.image_grid(images, 1, 3, ["σ=1", "b", "c"])
    assert labelled.size == (3 * 10 + 2 * 2, 8 + viz.LABEL_HEIGHT)
    with pytest.raises(ValueError, match="rows×cols"):
        viz.image_grid(images, 1, 2)
    with pytest.raises(ValueError, match="labels"):
        viz.image_grid(images, 2, 2, ["a"])


def test_expert_colours_are_distinct_and_figures_render():
    colours = [viz.expert_colour(e) for e in range(16)]
    assert len(set(colours)) == 16
    rows = [
        {"sampler": "euler", "nfe": 8, "all": 0.5},
        {"sampler": "euler", "nfe": 4, "all": 0.25},
        {"sampler": "heun", "nfe": 7, "all": 0.75},
    ]
    figure = viz.quality_vs_evaluations_plot(rows)
    euler = next(line for line in figure.axes[0].get_lines() if line.get_label() == "euler")
    assert list(euler.get_xdata()) == [4, 8] and list(euler.get_ydata()) == [25.0, 50.0]
    image = viz.figure_to_image(figure, dpi=50)
    assert image.mode == "RGB" and image.size == (math.ceil(5.6 * 50), math.ceil(3.6 * 50))
    with pytest.raises(ValueError, match="missing"):
        viz.quality_vs_evaluations_plot([{"sampler": "euler"}])


def test_markdown_table_formats_rows():
    table = viz.markdown_table([{"block": 1, "share": 0.25}, {"block": 3, "share": None}], digits=2)
    assert table.splitlines() == ["| block | share |", "|---|---|", "| 1 | 0.25 |", "| 3 | – |"]
    with pytest.raises(ValueError, match="rows"):
        viz.markdown_table([])


def test_markdown_rows_is_header_then_rows_printed_one_by_one():
    header, rows = ["σ", "n"], [[0.5, 3], ["–", None]]
    table = viz.markdown_rows(header, rows)
    assert table.splitlines() == ["| σ | n |", "|---|---|", "| 0.5 | 3 |", "| – | None |"]
    assert table == "\n".join([viz.markdown_header(header), *map(viz.markdown_row, rows)])


def test_expert_share_plot_stacks_shares_per_block():
    uniform = torch.full((1, 4, 2), 0.5)
    skewed = torch.tensor([0.8, 0.2]).expand(1, 4, 2).clone()
    record = synthetic_record({(0, 1): uniform, (0, 3): skewed}, (2, 2))
    figure = viz.expert_share_plot(record)
    widths = sorted(patch.get_width() for patch in figure.axes[0].patches)
    assert widths == pytest.approx([0.2, 0.5, 0.5, 0.8], abs=1e-3)
    assert any("H = 1.000" in text.get_text() for text in figure.axes[0].texts)


def test_token_entropy_measures_per_token_decisiveness():
    split = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).unsqueeze(0)
    decided = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).unsqueeze(0)
    record = synthetic_record({(0, 0): split, (0, 2): decided}, (1, 2))
    assert viz.token_entropy(record) == pytest.approx({0: 1.0, 2: 0.0}, abs=1e-4)
    assert viz.load_balance_entropy(record) == pytest.approx({0: 1.0, 2: 1.0}, abs=1e-4)


def test_series_plot_draws_sorted_points():
    figure = viz.series_plot({"a": {4: 0.1, 1: 0.5, 2: 0.3}}, "steps", "distance", "title", log_x=True)
    line = figure.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 4] and list(line.get_ydata()) == [0.5, 0.3, 0.1]
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["1", "2", "4"]


def test_routing_record_with_guidance_interval_keeps_one_batch(micro_run):
    pipe, _ = micro_run
    prompt = "a red circle at the center on a white background"
    common = dict(seed=3, num_inference_steps=4, height=64, width=64, guidance_scale=3.0, guidance_interval=(0.5, 1.0))
    recorded = pipe(prompt, record_routing=True, **common)
    plain = pipe(prompt, **common)
    assert torch.allclose(recorded.latents, plain.latents, atol=1e-4)
    gates = recorded.routing.stacked()
    assert gates.shape[:3] == (4, len(pipe.transformer.moe_layers), 2)  # every step holds [negative; positive]
    assert viz.conditional_indices(recorded.routing, 1) == [1]
