"""Frame sequences on the embedded ShapesWorld model: prompt travel moves a circle, interpolation endpoints are the
single images, loopback stays close, exports read back, parameters, argument errors, cancel and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from workbench import GenerationCancelled
from workbench.__main__ import main
from workbench.frames import frame_consistency, frame_positions, make_frames, slerp, write_video
from workbench.metadata import read_parameters
from workbench.shapesworld.evaluate import read_image

LEFT = "a red circle at the left on a white background"
RIGHT = "a red circle at the right on a white background"
FAST = dict(num_inference_steps=4, height=96, width=96)
TRAVEL = dict(num_inference_steps=8, height=96, width=96)
QUICK = dict(num_inference_steps=2, height=96, width=96)
PLAIN = dict(layout_guidance=0.0, layout_control=0.0)  # as frames are made unless asked: no planned layout


@pytest.fixture(scope="module")
def pipe(embedded_pipeline):
    return embedded_pipeline


def _max_pixel_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _red_centre_x(image: Image.Image) -> float | None:
    """Centre x (fraction of the width) of the largest red object read off the pixels, or None."""
    reds = [obj for obj in read_image(image)["objects"] if obj["colour"] == "red"]
    return reds[0]["cx"] if reds else None


# ------------------------------------------------------------------------------------------------ model-free parts


def test_frame_positions_spread_evenly_and_hit_the_keys():
    assert frame_positions(5, 2) == [(0, 0.0), (0, 0.25), (0, 0.5), (0, 0.75), (1, 0.0)]
    assert [j for j, t in frame_positions(5, 3) if t == 0] == [0, 1, 2]
    cosine = [t for _, t in frame_positions(5, 2, "cosine")]
    assert cosine[0] == 0 and cosine[2] == pytest.approx(0.5) and cosine[1] < 0.25


def test_slerp_endpoints_exact_and_norm_kept():
    a, b = torch_randn(0), torch_randn(1)
    assert slerp(a, b, 0.0).equal(a) and slerp(a, b, 1.0).equal(b)
    middle = slerp(a, b, 0.5)
    assert abs(float(middle.norm()) / float(a.norm()) - 1) < 0.05
    assert float((a + b).div(2).norm()) / float(a.norm()) < 0.8


def torch_randn(seed: int) -> torch.Tensor:
    return torch.randn((1, 16, 12, 12), generator=torch.Generator().manual_seed(seed))


def test_consistency_figures_on_known_sequences():
    still = [np.full((8, 8, 3), 100, np.uint8)] * 4
    assert frame_consistency(still) == {
        "mean_abs_change": 0.0,
        "max_abs_change": 0.0,
        "mean_second_difference": 0.0,
        "flicker": 0.0,
    }
    fade = [np.full((8, 8, 3), 10 * i, np.uint8) for i in range(5)]
    figures = frame_consistency(fade)
    assert figures["mean_abs_change"] == pytest.approx(10 / 255)
    assert figures["mean_second_difference"] == pytest.approx(0, abs=1e-7) and figures["flicker"] == 0
    moving = []
    for i in range(6):
        frame = np.zeros((8, 16, 3), np.uint8)
        frame[:, 2 * i : 2 * i + 4] = 255
        moving.append(frame)
    assert frame_consistency(moving)["flicker"] == 0.0
    assert frame_consistency(moving)["mean_second_difference"] > 0
    alternating = [np.full((4, 4, 3), 200 if i % 2 else 50, np.uint8) for i in range(6)]
    assert frame_consistency(alternating)["flicker"] == pytest.approx(1.0)
    rounding = [np.full((8, 8, 3), 100 + i % 2, np.uint8) for i in range(6)]
    rounding[-1][:4] = 200
    assert frame_consistency(rounding)["flicker"] == 0.0
    assert frame_consistency(rounding, flicker_tolerance=0)["flicker"] > 0.1
    rng = np.random.default_rng(0)
    noisy = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(6)]
    assert 0.3 < frame_consistency(noisy)["flicker"] < 0.9


# ----------------------------------------------------------------------------------------------- on the model


def test_travel_moves_the_circle_left_to_right(pipe):
    sequence = make_frames(pipe, [LEFT, RIGHT], mode="travel", num_frames=12, seed=0, **TRAVEL)
    centres = [_red_centre_x(frame) for frame in sequence.frames]
    assert all(c is not None for c in centres), f"a frame without a red object: centres {centres}"
    # Almost monotonic: no frame moves back by more than 2 % of the width (2 px at 96², rounding of the edge).
    assert np.diff(centres).min() > -0.02, f"centres {centres}"
    assert centres[0] < 0.4 and centres[-1] > 0.6, f"centres {centres}"
    assert sequence.consistency["flicker"] < 0.2, sequence.consistency


def test_travel_moves_the_background_white_to_black(pipe):
    black = LEFT.replace("white background", "black background")
    sequence = make_frames(pipe, [LEFT, black], mode="travel", num_frames=8, seed=0, **FAST)
    borders = [float(np.asarray(frame, dtype=np.float64)[[0, -1]].mean()) for frame in sequence.frames]
    assert [read_image(sequence.frames[k])["background"] for k in (0, -1)] == ["white", "black"], borders
    assert all(later <= earlier + 10 for earlier, later in zip(borders, borders[1:])), borders
    assert sequence.consistency["flicker"] < 0.2, sequence.consistency


def test_travel_endpoints_equal_the_single_images(pipe):
    sequence = make_frames(pipe, [LEFT, RIGHT], mode="travel", num_frames=3, seed=5, **FAST)
    assert _max_pixel_difference(sequence.frames[0], pipe(LEFT, seed=5, **FAST, **PLAIN).images[0]) <= 1
    assert _max_pixel_difference(sequence.frames[-1], pipe(RIGHT, seed=5, **FAST, **PLAIN).images[0]) <= 1
    assert _max_pixel_difference(sequence.frames[1], sequence.frames[0]) > 1


def test_walk_endpoints_equal_the_seed_images(pipe):
    sequence = make_frames(pipe, [LEFT], mode="walk", num_frames=3, seed=[3, 11], **FAST)
    assert _max_pixel_difference(sequence.frames[0], pipe(LEFT, seed=3, **FAST, **PLAIN).images[0]) <= 1
    assert _max_pixel_difference(sequence.frames[-1], pipe(LEFT, seed=11, **FAST, **PLAIN).images[0]) <= 1
    assert min(_max_pixel_difference(sequence.frames[1], sequence.frames[k]) for k in (0, 2)) > 1
    params = read_parameters(sequence.frames[1])
    assert params["Mode"] == "walk" and params["Frame"] == "1/3" and params["Walk to seed"] == "11"


def test_loopback_changes_little_and_exports_read_back(pipe, tmp_path):
    import imageio.v2 as imageio

    sequence = make_frames(pipe, [LEFT], mode="loopback", num_frames=4, seed=2, loopback_strength=0.35, **FAST)
    independent = frame_consistency([pipe(LEFT, seed=s, **FAST, **PLAIN).images[0] for s in range(2, 6)])
    figures = sequence.consistency
    assert 0.001 < figures["mean_abs_change"] and figures["max_abs_change"] < 0.06, (figures, independent)
    assert figures["flicker"] < 0.6 * independent["flicker"], (figures, independent)
    assert all(_max_pixel_difference(a, b) > 0 for a, b in zip(sequence.frames, sequence.frames[1:]))

    paths = sequence.save(tmp_path / "pngs", tmp_path / "loop.mp4", fps=8)
    assert [p.name for p in paths[:-1]] == [f"{i:04d}.png" for i in range(4)]
    params = read_parameters(paths[3])
    assert params["Mode"] == "loopback" and params["Frame"] == "3/4" and params["strength"] == 0.35
    assert params["prompt"] == LEFT and params["seed"] == 2
    reader = imageio.get_reader(paths[-1], format="FFMPEG")
    try:
        video_frames = [frame for frame in reader]
        assert reader.get_meta_data()["fps"] == 8
    finally:
        reader.close()
    assert len(video_frames) == 4 and video_frames[0].shape == (96, 96, 3)
    assert np.abs(video_frames[2].astype(int) - np.asarray(sequence.frames[2], dtype=int)).mean() < 8

    gif = write_video(sequence.frames, tmp_path / "loop.gif", fps=5)
    with Image.open(gif) as opened:
        assert opened.n_frames == 4 and opened.info["loop"] == 0 and opened.info["duration"] == 200


def test_travel_frames_carry_their_position(pipe):
    sequence = make_frames(pipe, [LEFT, RIGHT], num_frames=4, seed=1, easing="cosine", **QUICK)
    params = [read_parameters(frame) for frame in sequence.frames]
    assert [p["Frame"] for p in params] == ["0/4", "1/4", "2/4", "3/4"]
    assert params[1]["Mode"] == "travel" and params[1]["Easing"] == "cosine" and params[1]["Travel to"] == RIGHT
    assert float(params[1]["Travel"]) == pytest.approx(0.25, abs=1e-4)
    assert params[0]["prompt"] == LEFT and params[-1]["prompt"] == RIGHT and params[-1]["Travel"] == "0"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prompts=[LEFT, RIGHT], num_frames=1), "num_frames"),
        (dict(prompts=[LEFT, RIGHT], mode="zoom"), "mode"),
        (dict(prompts=[LEFT]), "prompts"),
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[LEFT, RIGHT], mode="walk"), "prompts"),
        (dict(prompts=[LEFT], mode="loopback", loopback_strength=0.0), "loopback_strength"),
        (dict(prompts=[LEFT], mode="loopback", loopback_strength=1.5), "loopback_strength"),
        (dict(prompts=[LEFT], mode="walk", seed=[4]), "seed"),
        (dict(prompts=[LEFT, RIGHT], seed=-1), "seed"),
        (dict(prompts=[LEFT, RIGHT], seed="3"), "seed"),
        (dict(prompts=[LEFT, RIGHT], seed=True), "seed"),
        (dict(prompts=[LEFT], mode="walk", seed=2**32 - 1), "seed"),  # its walk partner 2**32 is out of range
        (dict(prompts=[LEFT], mode="loopback", loopback_strength=float("nan")), "loopback_strength"),
        (dict(prompts=[LEFT, RIGHT], easing="bounce"), "easing"),
        (dict(prompts=[LEFT, RIGHT], image=None), "image"),
        (dict(prompts=[LEFT, RIGHT], height=100), "height"),
    ],
)
def test_bad_arguments_name_the_parameter(pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_frames(pipe, **kwargs)


def test_bad_export_arguments(pipe, tmp_path):
    sequence = make_frames(pipe, [LEFT], mode="walk", num_frames=2, **QUICK)
    with pytest.raises(ValueError, match="video_path"):
        sequence.save(tmp_path, tmp_path / "clip.avi")
    for fps in (0, 61):
        with pytest.raises(ValueError, match="fps"):
            sequence.save(tmp_path, tmp_path / "clip.gif", fps=fps)
    assert not list(tmp_path.iterdir())


def test_progress_and_cancel(pipe):
    seen = []
    make_frames(pipe, [LEFT], mode="loopback", num_frames=3, callback=lambda i, n: seen.append((i, n)), **QUICK)
    assert seen == [(0, 3), (1, 3), (2, 3)]
    done = []
    with pytest.raises(GenerationCancelled):
        make_frames(pipe, [LEFT, RIGHT], num_frames=5, callback=lambda i, n: done.append(i) or i < 1, **QUICK)
    assert done == [0, 1]
    with pytest.raises(GenerationCancelled):
        make_frames(pipe, [LEFT], mode="walk", step_callback=lambda step, sigma, x: False, **QUICK)


def test_command_line(tmp_path, capsys):
    out_dir, gif = tmp_path / "frames", tmp_path / "travel.gif"
    argv = ["frames", "--prompt", LEFT, "--prompt-end", RIGHT, "--frames", "3", "--steps", "2", "--fps", "4"]
    argv += ["--height", "96", "--width", "96", "--out-dir", str(out_dir), "--out", str(gif)]
    assert main(argv) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["0000.png", "0001.png", "0002.png"]
    with Image.open(gif) as opened:
        assert opened.size == (96, 96)
    assert "flicker" in capsys.readouterr().out
    assert main(["frames", "--prompt", LEFT, "--mode", "walk", "--strength", "0.5"]) == 2
    assert "--strength" in capsys.readouterr().err
    assert main(["frames", "--prompt", LEFT, "--prompt-end", RIGHT, "--out", str(tmp_path / "x.webm")]) == 2
    assert "--out" in capsys.readouterr().err
