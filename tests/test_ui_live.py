"""What the app shows while the model runs (:mod:`workbench.ui.live`): the x̂0 recovered from the step callbacks and
the progress line (steps, frames, rate, ETA)."""

from __future__ import annotations

import pytest
import torch

from workbench import load_pipeline
from workbench.ui import video
from workbench.ui.live import ProgressLine, X0Tracker, decode_preview, format_seconds

PROMPT = "a large red circle at the top left on a white background"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_x0_tracker_recovers_the_x0_of_each_step(pipe, sampler):
    """Two consecutive step callbacks give the step's velocity; for Euler the tracker's x̂0 is the sampler's own x̂0
    of the step before (as the trajectory records it); for Heun the step's effective one, near the recorded one
    late in the run. A callback at a higher σ starts a new run (the next frame)."""
    tracker, seen = X0Tracker(), []

    def callback(step, sigma, latents):
        seen.append(tracker.latest())

    out = pipe(
        PROMPT, seed=3, num_inference_steps=6, sampler=sampler, record_trajectory=True, callback=tracker.wrap(callback)
    )
    assert seen[:2] == [None, None]
    for calls, (count, x0) in enumerate(seen[2:], start=3):
        assert count == calls
        if sampler == "euler":
            torch.testing.assert_close(x0, out.trajectory.x0[calls - 2], atol=1e-4, rtol=0)
    final_error = (seen[-1][1] - out.latents).abs().mean() / out.latents.abs().mean()
    assert final_error < 0.2
    tracker.observe(1.0, out.latents)  # a new frame starts at σ = 1: nothing mixes the two runs
    tracker.observe(0.8, out.latents)
    assert tracker.latest()[0] == len(seen)


def test_preview_is_decoded_at_output_size(pipe):
    latents = torch.zeros(2, 16, 16, 16)
    images = decode_preview(pipe, latents)
    assert len(images) == 2 and images[0].size == (128, 128)


def test_progress_line_counts_steps_frames_rate_and_eta():
    line = ProgressLine(10)
    first = line.html(1, now=100.0)
    assert "Step 1 of 10" in first and "it/s" not in first
    text = line.html(5, now=104.0)
    assert "Step 5 of 10" in text and "1.00 it/s" in text and "ETA 0:05" in text and 'aria-valuenow="50"' in text
    frames = ProgressLine(6 + 2 * 3, frame_steps=[6, 3, 3])
    assert "Frame 1 of 3 · step 6 of 6" in frames.html(6)
    assert "Frame 2 of 3 · step 1 of 3" in frames.html(7)
    assert "Frame 3 of 3 · step 3 of 3" in frames.html(12)
    assert format_seconds(65) == "1:05" and format_seconds(3723) == "1:02:03"


def test_frame_steps_of_each_mode():
    request = {"num_inference_steps": 10, "num_frames": 3, "mode": "travel", "loopback_strength": 0.5}
    assert video.frame_steps(request) == [10, 10, 10]
    assert video.frame_steps({**request, "mode": "loopback"}) == [10, 5, 5]
    assert video.total_steps({**request, "mode": "loopback"}) == 20
