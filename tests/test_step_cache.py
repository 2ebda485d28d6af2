"""Step caching (workbench.step_cache, ``cache_threshold``): threshold 0 changes nothing, a positive one skips
evaluations (never the first or the last), records them, and the setting is validated everywhere it enters."""

import math

import pytest
import torch
from tiny_sd3 import random_shapesworld

from workbench import flow
from workbench.metadata import parse_parameters
from workbench.settings import GenerationSettings
from workbench.step_cache import StepCache, relative_l1

SIZE, STEPS = 64, 12


@pytest.fixture(scope="module")
def pipe():
    return random_shapesworld()


def _run(pipe, **kwargs):
    return pipe("a red circle", seed=1, num_inference_steps=STEPS, height=SIZE, width=SIZE, **kwargs)


def _forward_sequence(model, cache: StepCache | None) -> list[torch.Tensor]:
    """The transformer's output along an Euler path, with ``cache`` attached (None: no caching)."""
    torch.manual_seed(0)
    config = model.config
    x = torch.randn(2, config.in_channels, 8, 8)
    text, pooled = torch.randn(2, 5, config.joint_attention_dim), torch.randn(2, config.pooled_projection_dim)
    sigmas = [float(s) for s in flow.sigma_schedule(6, 3.0)]

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return model(x, text, pooled, torch.full((2,), sigma * 1000))

    if cache is not None:
        velocity = cache.velocity(velocity)
    model.step_cache = cache
    outputs = []
    try:
        with torch.no_grad():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                v = velocity(x, s)
                outputs.append(v)
                x = x + (s_next - s) * v
    finally:
        model.step_cache = None
    return outputs


def test_threshold_zero_is_bit_identical_to_no_caching(pipe):
    plain = _forward_sequence(pipe.transformer, None)
    cache = StepCache(0.0)
    cached = _forward_sequence(pipe.transformer, cache)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert cache.computed == len(plain) and cache.skipped == 0 and cache.skipped_steps == []
    # through the pipeline: threshold 0 and a threshold too small to skip anything take the same blocks
    off, tiny = _run(pipe), _run(pipe, cache_threshold=1e-9)
    assert torch.equal(off.latents, tiny.latents)
    assert off.skipped_steps == tiny.skipped_steps == []
    assert off.transformer_evaluations == tiny.transformer_evaluations == STEPS


def test_a_positive_threshold_skips_steps_and_changes_the_image_a_little(pipe):
    off, cached = _run(pipe), _run(pipe, cache_threshold=0.3)
    assert cached.skipped_steps, "nothing was skipped"
    assert cached.transformer_evaluations == STEPS - len(cached.skipped_steps)
    change = float((cached.latents - off.latents).abs().max())
    assert 0 < change < 0.25 * float(off.latents.abs().max())
    assert parse_parameters(cached.images[0].info["parameters"])["cache_threshold"] == 0.3
    assert "Cache threshold" not in off.images[0].info["parameters"]


def test_the_first_and_last_steps_are_never_skipped(pipe):
    out = _run(pipe, cache_threshold=10.0)
    assert out.skipped_steps == list(range(1, STEPS - 1))
    assert out.transformer_evaluations == 2


def test_the_decision_sums_relative_changes_since_the_last_full_evaluation():
    cache = StepCache(0.25, always=(0.0,))
    tokens, base = torch.ones(1, 4, 2), torch.ones(1, 4, 2)
    velocity = cache.velocity(lambda x, sigma: x)
    decisions = []
    for step, factor in enumerate([1.0, 1.1, 1.2, 1.3, 1.4, 1.4]):  # changes ≈ 0.1, 0.09, 0.08, 0.08, 0
        sigma = 0.0 if step == 5 else 1.0 - step / 10
        velocity(tokens, sigma)
        reused = cache.reuse(tokens, lambda factor=factor: base * factor)
        decisions.append(reused is not None)
        if reused is None:
            cache.store(tokens, tokens * 3)
        else:
            assert torch.equal(reused, tokens * 3)  # tokens + the cached residual
    # step 1: 0.1 < 0.25 skip; step 2: 0.19 skip; step 3: 0.27 compute; step 4: 0.077 skip; step 5: forced (σ = 0)
    assert decisions == [False, True, True, False, True, False]
    assert cache.skipped_steps == [1, 2, 4] and cache.computed == 3
    assert relative_l1(base * 1.1, base) == pytest.approx(0.1)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, "0.1"])
def test_the_setting_is_validated(pipe, value):
    with pytest.raises(ValueError, match="cache_threshold"):
        GenerationSettings(cache_threshold=value)
    with pytest.raises(ValueError, match="cache_threshold"):
        _run(pipe, cache_threshold=value)
    with pytest.raises(ValueError, match="cache_threshold"):
        StepCache(value)


def test_the_command_line_and_sweep_take_the_setting(tmp_path):
    import argparse

    from workbench import sweep
    from workbench.cli.common import add_sampling_arguments

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert parser.parse_args(["--cache-threshold", "0.2"]).cache_threshold == 0.2
    config = sweep.parse_config({"output_dir": str(tmp_path), "prompts": ["a red circle"], "cache_threshold": [0, 0.2]})
    assert sorted(cell.settings["cache_threshold"] for cell in sweep.expand(config)) == [0, 0.2]


def test_the_flow_tab_lists_the_skipped_steps(pipe):
    pytest.importorskip("gradio")
    from workbench.ui.flow_view import cache_line

    out = _run(pipe, cache_threshold=0.3)
    line = cache_line(out, 0.3)
    assert f"skipped steps {', '.join(map(str, out.skipped_steps))};" in line
    assert f"{STEPS - len(out.skipped_steps)} transformer evaluations" in line
    assert cache_line(_run(pipe), 0.0) == ""
