"""Whole-pipeline equality with diffusers' StableDiffusion3Pipeline on a random tiny SD3 model, and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from workbench import GenerationCancelled, load_pipeline
from workbench.metadata import parse_parameters

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle at the top left on a white background"
NEGATIVE = "a blue square"


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def pipes(tiny_sd3_folder):
    folder, reference = tiny_sd3_folder
    return load_pipeline(folder), reference


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_text_to_image_equals_diffusers(pipes, guidance):
    ours, reference = pipes
    kwargs = dict(height=64, width=48, num_inference_steps=4, guidance_scale=guidance, max_sequence_length=32)
    expected = reference(
        PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(7), **kwargs
    ).images[0]
    got = ours(PROMPT, negative_prompt=NEGATIVE, seed=7, **kwargs).images[0]
    assert got.size == expected.size == (48, 64)
    assert np.abs(_pixels(got) - _pixels(expected)).max() <= 2


def test_image_to_image_equals_diffusers(pipes):
    ours, reference = pipes
    reference_i2i = diffusers.StableDiffusion3Img2ImgPipeline(**reference.components)
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    kwargs = dict(num_inference_steps=5, guidance_scale=3.0, max_sequence_length=32, strength=0.6, height=64, width=64)
    expected = reference_i2i(
        PROMPT, image=init, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(3), **kwargs
    ).images[0]
    got = ours(PROMPT, image=init, negative_prompt=NEGATIVE, seed=3, **kwargs).images[0]
    assert np.abs(_pixels(got) - _pixels(expected)).max() <= 2


def test_skip_layer_guidance_equals_diffusers(pipes):
    ours, reference = pipes
    kwargs = dict(height=32, width=32, num_inference_steps=5, guidance_scale=3.0, max_sequence_length=32)
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_scale=2.0)
    slg.update(skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.9)
    expected = reference(PROMPT, generator=torch.Generator("cpu").manual_seed(4), **kwargs, **slg).images[0]
    got = ours(PROMPT, seed=4, **kwargs, **slg).images[0]
    plain = ours(PROMPT, seed=4, **kwargs).images[0]
    assert np.abs(_pixels(got) - _pixels(expected)).max() <= 2
    assert np.abs(_pixels(plain) - _pixels(expected)).max() > 10  # skip-layer guidance changed the image
    params = parse_parameters(got.info["parameters"])
    assert params["skip_guidance_layers"] == [0] and params["skip_layer_guidance_stop"] == 0.9


def test_guidance_interval_limits_guidance_to_its_sigmas(pipes):
    ours, _ = pipes
    common = dict(height=32, width=32, num_inference_steps=4, seed=9, negative_prompt=NEGATIVE)
    nowhere = ours(PROMPT, guidance_scale=4.0, guidance_interval=(0.0, 0.0), **common)
    unguided = ours(PROMPT, guidance_scale=1.0, **common)
    assert torch.allclose(nowhere.latents, unguided.latents, atol=1e-5)
    everywhere = ours(PROMPT, guidance_scale=4.0, guidance_interval=(0.0, 1.0), **common)
    default = ours(PROMPT, guidance_scale=4.0, **common)
    assert torch.equal(everywhere.latents, default.latents)
    partial = ours(PROMPT, guidance_scale=4.0, guidance_interval=(0.5, 1.0), **common)
    assert not torch.allclose(partial.latents, default.latents, atol=1e-3)
    assert not torch.allclose(partial.latents, unguided.latents, atol=1e-3)
    assert parse_parameters(partial.images[0].info["parameters"])["guidance_interval"] == [0.5, 1.0]
    assert "Guidance interval" not in default.images[0].info["parameters"]


def test_metadata_reproduces_the_image(pipes):
    ours, _ = pipes
    first = ours(PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=2.0, seed=11)
    params = parse_parameters(first.images[0].info["parameters"])
    assert params["seed"] == 11 and params["steps"] == 2 and params["guidance_scale"] == 2.0
    again = ours(
        params["prompt"],
        height=params["height"],
        width=params["width"],
        num_inference_steps=params["steps"],
        guidance_scale=params["guidance_scale"],
        seed=params["seed"],
        shift=params["shift"],
    )
    assert np.array_equal(_pixels(first.images[0]), _pixels(again.images[0]))


def test_samplers_trajectory_and_cancel(pipes):
    ours, _ = pipes
    common = dict(height=32, width=32, guidance_scale=2.0, seed=1)
    euler = ours(PROMPT, num_inference_steps=6, record_trajectory=True, **common)
    trajectory = euler.trajectory
    assert len(trajectory.latents) == len(trajectory.velocities) == len(trajectory.x0) == 6
    assert torch.allclose(trajectory.x0[0], trajectory.latents[0] - trajectory.sigmas[0] * trajectory.velocities[0])
    assert trajectory.straightness().shape == (1,)
    for sampler in ("heun", "dpmpp_2m"):
        other = ours(PROMPT, num_inference_steps=6, sampler=sampler, **common)
        assert other.images[0].size == (32, 32)
        assert "Sampler: " + sampler in other.images[0].info["parameters"]
    seen = []

    def stop_at_two(step, sigma, latents):
        seen.append((step, sigma, tuple(latents.shape)))
        return False if step == 1 else None

    with pytest.raises(GenerationCancelled):
        ours(PROMPT, num_inference_steps=6, callback=stop_at_two, **common)
    assert [s[0] for s in seen] == [0, 1] and seen[0][2] == (1, 16, 4, 4)


def test_flow_temperature_and_thresholding_change_the_result(pipes):
    ours, _ = pipes
    common = dict(height=32, width=32, num_inference_steps=3, guidance_scale=2.0, seed=5)
    base = ours(PROMPT, **common).latents
    cooler = ours(PROMPT, flow_temperature=0.5, **common).latents
    clamped = ours(PROMPT, dynamic_thresholding_ratio=0.5, **common).latents
    assert not torch.allclose(base, cooler) and not torch.allclose(base, clamped)


def test_batch_seeds_follow_seed_plus_index(pipes):
    ours, _ = pipes
    batch = ours([PROMPT, "a green star"], height=32, width=32, num_inference_steps=2, seed=20)
    assert batch.seeds == [20, 21]
    single = ours("a green star", height=32, width=32, num_inference_steps=2, seed=21)
    assert np.array_equal(_pixels(batch.images[1]), _pixels(single.images[0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=40), "height must be a positive multiple of 16, got 40"),
        (dict(width=0), "width must be a positive multiple of 16"),
        (dict(height=4096), "exceeds this model's position table"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer between 1 and 1000, got 0"),
        (dict(strength=1.5, image=Image.new("RGB", (32, 32))), r"strength must be in \(0, 1\], got 1.5"),
        (dict(sampler="ddim"), "sampler must be one of"),
        (dict(guidance_scale=-1), "guidance_scale must be between 0 and 100, got -1"),
        (dict(flow_temperature=0), "flow_temperature must be in"),
        (dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio must be in"),
        (dict(expert_weights=[1, 1]), "no Mixture-of-Experts layers"),
        (dict(seed=[1, 2]), "seed lists 2 seeds for 1 images"),
        (dict(guidance_interval=(0.6, 0.2)), r"guidance_interval must satisfy 0 <= low <= high <= 1, got \(0.6, 0.2\)"),
        (dict(guidance_interval=0.5), "guidance_interval must be a pair"),
        (dict(skip_guidance_layers=[5]), r"skip_guidance_layers must be a non-empty list of block indices in \[0, 1\]"),
        (dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2), "start=0.5"),
        (dict(skip_guidance_layers=[0], skip_layer_guidance_scale=-1), "skip_layer_guidance_scale must be"),
    ],
)
def test_bad_input_names_parameter_and_value(pipes, kwargs, match):
    ours, _ = pipes
    args = dict(height=32, width=32, num_inference_steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ours(PROMPT, **args)
    assert ours(PROMPT, height=32, width=32, num_inference_steps=1).images
