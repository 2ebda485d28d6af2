"""Layout guidance and layout control (workbench/layout_guidance.py, workbench/shapesworld/layout.py, the layout
ControlNet of workbench/controlnet.py): the guidance step lowers the token loss it follows; off, or with no layout, it
is the plain sampler bit for bit; a model without a layout source refuses it by name; the embedded model's caption
layouts put each object's words and region where the caption says; routing records and step counts are untouched;
on the embedded model it fixes relations. Layout control gives each image its own layout's control image, leaves
images without a layout alone, adds to a user's ControlNet, is refused by name without a layout ControlNet, and is
the embedded model's default together with layout guidance (off when its ControlNet is missing). The pipeline's
conditional velocity is the one the sampler takes, with the layout control; the sensitivity probe can measure it."""

from __future__ import annotations

import pytest
import torch
from tiny_sd3 import random_shapesworld

from workbench.layout_guidance import AttentionProbe, Layout, layout_constraint, token_loss
from workbench.metadata import read_parameters
from workbench.shapesworld.controlnet_training import controlnet_from_transformer, save_controlnet
from workbench.shapesworld.evaluate import score
from workbench.shapesworld.layout import CaptionLayouts, attach_caption_layouts
from workbench.shapesworld.world import random_canonical_captions, tokenize

TWO = "a red circle to the left of a blue square on a white background"
RUN = dict(num_inference_steps=4, height=64, width=64, guidance_scale=4.0)


@pytest.fixture(scope="module")
def micro():
    pipe = random_shapesworld(seed=3, noise_seed=3)
    assert attach_caption_layouts(pipe)  # word-level tokenizers with the captions' words
    return pipe


def batch_loss(pipe, latents, layouts, embeds, pooled, sigma: float) -> float:
    """The mean token loss over all blocks of ``latents`` for ``layouts`` (as the guidance computes it)."""
    from workbench.layout_guidance import _batch_targets

    grid = (latents.shape[-2] // 2, latents.shape[-1] // 2)
    words, masks = _batch_targets(layouts, embeds.shape[1], grid)
    with torch.no_grad(), AttentionProbe(pipe.transformer) as probe:
        pipe.transformer(latents, embeds, pooled, torch.full((latents.shape[0],), sigma * 1000))
    maps = probe.maps()
    return float(sum(token_loss(m, words, masks) for m in maps).detach() / len(maps))


def test_a_guidance_step_lowers_the_token_loss(micro):
    prompts = [TWO, "a green triangle above a yellow star on a black background"]
    embeds, pooled = micro.encode_prompts(prompts, None, 256)
    layouts = micro.layout_source(prompts, [0, 1], 64, 64, embeds.shape[1])
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = 0.9
    before = batch_loss(micro, latents, layouts, embeds, pooled, sigma)
    constraint = layout_constraint(micro.transformer, layouts, embeds, pooled, strength=0.5)
    after = batch_loss(micro, constraint(0, sigma, latents), layouts, embeds, pooled, sigma)
    assert after < before - 1e-4, (before, after)
    assert torch.equal(constraint(1, sigma, latents), latents)  # only after the first step


def test_off_or_without_layouts_it_is_the_plain_sampler(micro):
    plain = micro(TWO, seed=4, **RUN)
    assert torch.equal(micro(TWO, seed=4, layout_guidance=0.0, **RUN).latents, plain.latents)
    free_text = micro("a picture of something", seed=4, layout_guidance=0.3, **RUN)  # no canonical caption: no layout
    assert torch.equal(free_text.latents, micro("a picture of something", seed=4, **RUN).latents)
    guided = micro(TWO, seed=4, layout_guidance=0.3, **RUN)
    assert not torch.equal(guided.latents, plain.latents)
    assert read_parameters(guided.images[0])["layout_guidance"] == 0.3
    assert "layout_guidance" not in read_parameters(plain.images[0])


def test_routing_record_and_evaluations_are_untouched(micro):
    kwargs = dict(seed=5, record_routing=True, cache_threshold=0.0, **RUN)
    plain = micro([TWO, TWO], **kwargs)
    guided = micro([TWO, TWO], layout_guidance=0.3, **kwargs)
    assert guided.transformer_evaluations == plain.transformer_evaluations
    assert guided.routing.steps() == plain.routing.steps() and len(guided.routing.entries) == len(plain.routing.entries)
    assert micro.transformer.step_cache is None and micro.transformer.routing_record is None


def test_a_model_without_a_layout_source_refuses_it(micro):
    other = random_shapesworld(seed=3, noise_seed=3)  # no source attached
    with pytest.raises(ValueError, match=r"layout_guidance=0\.2 needs a layout source"):
        other(TWO, seed=0, layout_guidance=0.2, **RUN)
    with pytest.raises(ValueError, match="layout_guidance"):
        micro(TWO, seed=0, layout_guidance=-1, **RUN)


def test_bpe_text_encoders_get_no_caption_layouts(tiny_sd3_folder):
    from workbench import load_pipeline

    pipe = load_pipeline(tiny_sd3_folder[0])
    assert not attach_caption_layouts(pipe) and pipe.layout_source is None


def test_caption_layouts_put_words_and_regions_where_the_caption_says():
    source = CaptionLayouts(clip_length=24)
    layouts = source([TWO, "the circle is red"], [7, 7], 128, 128, 48)
    assert layouts[1] is None  # not canonical
    layout = layouts[0]
    assert isinstance(layout, Layout) and layout.words.shape == (2, 48) and layout.regions.shape == (2, 128, 128)
    tokens = tokenize(TWO)
    for o, names in enumerate((("red", "circle"), ("blue", "square"))):
        positions = torch.nonzero(layout.words[o]).flatten().tolist()
        expected = [1 + tokens.index(w, 0 if o == 0 else 5) for w in names]
        assert positions == sorted(expected + [24 + p - 1 for p in expected])  # CLIP copy, then T5 copy
    columns = [float((region.sum(0) * torch.arange(128)).sum() / region.sum()) for region in layout.regions]
    assert columns[0] < columns[1]  # a is left of b
    again = source([TWO], [7], 128, 128, 48)[0]
    assert torch.equal(again.regions, layout.regions)  # the image's seed fixes its layout


def two_object_scores(pipe, caption_seed: int, attribute: str, **settings) -> int:
    """How many of 16 fixed two-object captions (seeds 0–15) the embedded model gets right in ``attribute``."""
    captions = random_canonical_captions(16, caption_seed, "two")
    images = pipe(captions, seed=list(range(16)), **settings).images
    return sum(score(caption, image)[attribute] for caption, image in zip(captions, images))


@pytest.mark.slow
def test_on_the_embedded_model_relations_come_out_right_more_often(embedded_pipeline):
    relation = {
        s: two_object_scores(embedded_pipeline, 7, "relation", layout_guidance=s, layout_control=0.0)
        for s in (0.0, 0.1)
    }
    assert relation[0.1] >= relation[0.0] + 6, relation  # 3 → 12 of 16 on the EPYC of the README


def test_cli_takes_the_flag(tmp_path):
    from workbench.__main__ import main

    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", TWO, "--steps", "2", "--layout-guidance", "0.1", "--out", str(out)]) == 0
    assert read_parameters(out)["layout_guidance"] == 0.1


def random_controlnet(pipe, seed: int):
    """A ControlNet for ``pipe`` whose residuals are not zero (the stock init zeroes its output heads)."""
    model = controlnet_from_transformer(pipe.transformer, layers=1, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """A random ShapesWorld pipeline with caption layouts and a random layout ControlNet read from its folder."""
    pipe = random_shapesworld(seed=3, noise_seed=3)
    folder = save_controlnet(random_controlnet(pipe, 1), tmp_path_factory.mktemp("cn") / "layout-cn", torch.float32)
    assert attach_caption_layouts(pipe, folder)
    return pipe


def test_layout_control_draws_each_image_its_own_layout(controlled):
    prompts, seeds = [TWO, "a picture of something"], [4, 5]
    plain = controlled(prompts, seed=seeds, **RUN)
    drawn = controlled(prompts, seed=seeds, layout_control=1.0, **RUN)
    assert not torch.allclose(drawn.latents[0], plain.latents[0], atol=1e-3)
    # free text: no layout, no control (a zero residual; AMX kernels round the other batch row's sums differently)
    torch.testing.assert_close(drawn.latents[1], plain.latents[1], atol=1e-6, rtol=0)
    alone = controlled(TWO, seed=4, layout_control=1.0, **RUN)
    torch.testing.assert_close(alone.latents[0], drawn.latents[0], atol=1e-4, rtol=1e-4)
    other_seed = (
        controlled(TWO, seed=6, layout_control=1.0, **RUN).latents[0] - controlled(TWO, seed=6, **RUN).latents[0]
    )
    assert not torch.allclose(other_seed, drawn.latents[0] - plain.latents[0], atol=1e-3)  # another seed, layout
    params = read_parameters(drawn.images[0])
    assert params["layout_control"] == 1.0 and params["layout_controlnet"].startswith("layout-cn:")  # name:sha256
    assert "layout_control" not in read_parameters(plain.images[0])


def test_layout_control_adds_to_a_users_controlnet(controlled):
    controlled.controlnets.attach(random_controlnet(controlled, 2), "user")
    try:
        edges = torch.zeros(3, 64, 64)
        edges[:, 20:44, 20] = 1.0
        user = controlled(TWO, seed=4, control_image=edges, **RUN).latents
        layout = controlled(TWO, seed=4, layout_control=1.0, **RUN).latents
        both = controlled(TWO, seed=4, control_image=edges, layout_control=1.0, **RUN)
        assert not torch.allclose(both.latents, user, atol=1e-3) and not torch.allclose(both.latents, layout, atol=1e-3)
        params = read_parameters(both.images[0])
        assert params["controlnets"].startswith("user:1") and params["layout_controlnet"].startswith("layout-cn:")
    finally:
        controlled.controlnets.remove("user")


def test_conditional_velocity_is_what_the_sampler_gets(controlled):
    from workbench.settings import GenerationSettings

    one_step = dict(RUN, num_inference_steps=1, guidance_scale=1.0, sampler="euler")
    settings = GenerationSettings.resolve(controlled.defaults, layout_control=1.0, **one_step)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    velocity = controlled.conditional_velocity([TWO], settings, [4])(noise, 1.0)
    drawn = controlled(TWO, seed=4, layout_control=1.0, **one_step).latents  # one Euler step from σ = 1 to 0
    torch.testing.assert_close(drawn, noise - velocity, atol=1e-5, rtol=1e-5)
    plain = controlled.conditional_velocity([TWO], GenerationSettings.resolve(controlled.defaults, **one_step), [4])
    embeds, pooled = controlled.encode_prompts([TWO], None, 256)
    with torch.no_grad():
        alone = controlled.transformer(noise, embeds, pooled, torch.full((1,), 1000.0))
    torch.testing.assert_close(plain(noise, 1.0), alone)
    assert not torch.allclose(velocity, alone, atol=1e-3)


def test_the_probe_with_layout_control_sees_the_planned_layouts(controlled):
    from workbench.shapesworld.sensitivity import caption_sensitivity

    weights = caption_sensitivity(controlled, n=4, seed=1, sigmas=(0.9,), size=64)
    system = caption_sensitivity(controlled, n=4, seed=1, sigmas=(0.9,), size=64, layout_control=1.0)
    for edit in ("relation flipped", "shapes swapped"):  # edits that move the planned objects
        assert system["two"][edit][0.9] != pytest.approx(weights["two"][edit][0.9], rel=1e-3)


def test_layout_control_needs_a_layout_controlnet_and_a_source(micro):
    with pytest.raises(ValueError, match=r"layout_control=1 needs a layout ControlNet"):
        micro(TWO, seed=0, layout_control=1.0, **RUN)
    other = random_shapesworld(seed=3, noise_seed=3)
    with pytest.raises(ValueError, match=r"layout_control=0\.5 needs a layout source"):
        other(TWO, seed=0, layout_control=0.5, **RUN)
    with pytest.raises(ValueError, match="layout_control"):
        micro(TWO, seed=0, layout_control=11, **RUN)


def test_the_embedded_model_plans_layouts_by_default_and_needs_its_controlnet(tmp_path):
    import shutil

    from workbench import load_pipeline
    from workbench.loading import EMBEDDED_CONTROLNET, EMBEDDED_MODEL

    pipe = load_pipeline()
    assert (pipe.defaults.layout_guidance, pipe.defaults.layout_control) == (0.1, 1.0)
    assert pipe.controlnets.layout.name == EMBEDDED_CONTROLNET.name and not pipe.controlnets.names
    alone = shutil.copytree(EMBEDDED_MODEL, tmp_path / EMBEDDED_MODEL.name)  # without the ControlNet beside it
    with pytest.warns(UserWarning, match="layout ControlNet '../shapesworld-controlnet-canny' is missing"):
        copy = load_pipeline(alone)
    assert (copy.defaults.layout_guidance, copy.defaults.layout_control) == (0.1, 0.0)
    assert copy.controlnets.layout is None


@pytest.mark.slow
def test_on_the_embedded_model_planned_layouts_draw_two_objects_right(embedded_pipeline):
    alone = two_object_scores(embedded_pipeline, 11, "all", layout_guidance=0.0, layout_control=0.0)
    planned = two_object_scores(embedded_pipeline, 11, "all")  # the defaults: guidance 0.1, control 1
    assert planned >= alone + 4, (alone, planned)  # 3 → 9 of 16 on the EPYC of the README


def test_quantized_layers_without_a_backward_are_guided_like_full_precision():
    """bitsandbytes' nf4 layers have no backward of their own; the guidance moves their latents the way it moves
    the full-precision model's, and the PNG records it."""
    from workbench import memory

    full = random_shapesworld(seed=3, noise_seed=3)
    nf4 = memory.prepare(random_shapesworld(seed=3, noise_seed=3), quantization="nf4")
    moves = []
    for pipe in (full, nf4):
        assert attach_caption_layouts(pipe)
        guided = pipe(TWO, seed=4, layout_guidance=0.3, **RUN)
        moves.append((guided.latents - pipe(TWO, seed=4, layout_guidance=0.0, **RUN).latents).flatten())
        assert read_parameters(guided.images[0])["layout_guidance"] == 0.3
    assert moves[1].norm() > 0.5 * moves[0].norm()
    assert torch.nn.functional.cosine_similarity(*moves, dim=0) > 0.9, moves
