"""SD3 ControlNets: the model against diffusers' SD3ControlNetModel, the residual hook in MMDiT.forward, the pipeline
against StableDiffusion3ControlNetPipeline on tiny random weights, and the single-file key mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from workbench import ModelFormatError, load_pipeline
from workbench.__main__ import main
from workbench.controlnet import file_sha256
from workbench.metadata import parse_parameters, read_parameters
from workbench.models.controlnet import ControlNetConfig, SD3ControlNet
from workbench.models.mmdit import MMDiT, MMDiTConfig, control_block_index
from workbench.preprocess import preprocess

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=32, patch_size=2, in_channels=16, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, pooled_projection_dim=64, out_channels=16)  # fmt: skip
SD3_LAYOUT = dict(joint_attention_dim=32, pos_embed_max_size=32)
SD35_LAYOUT = dict(joint_attention_dim=None, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
                   force_zeros_for_pooled_projection=False)  # fmt: skip


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add N(0, 0.1²) noise to every parameter (diffusers zero-initialises the ControlNet's output heads)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def reference_controlnet(layout: str, num_layers: int, seed: int = 0, **overrides):
    """A random diffusers SD3ControlNetModel of the tiny size: ``layout`` "sd3" (own pos_embed, joint blocks) or
    "sd35" (image-only blocks, the transformer's pos_embed)."""
    torch.manual_seed(seed)
    config = {**TINY, **(SD3_LAYOUT if layout == "sd3" else SD35_LAYOUT), "num_layers": num_layers, **overrides}
    return _perturbed(diffusers.SD3ControlNetModel(**config), seed)


@pytest.mark.parametrize(("layout", "num_layers"), [("sd3", 1), ("sd3", 2), ("sd35", 2)])
def test_controlnet_and_residuals_equal_diffusers(layout, num_layers):
    torch.manual_seed(5)
    transformer = _perturbed(diffusers.SD3Transformer2DModel(**TINY, num_layers=3, joint_attention_dim=32,
                                                               pos_embed_max_size=32), 1)  # fmt: skip
    reference = reference_controlnet(layout, num_layers, seed=2)
    ours = SD3ControlNet(ControlNetConfig.from_dict(dict(reference.config)))
    ours.load_state_dict(reference.state_dict(), strict=True)
    mmdit = MMDiT(MMDiTConfig.from_dict(dict(transformer.config)))
    mmdit.load_state_dict(transformer.state_dict(), strict=True)
    if layout == "sd35":
        reference.pos_embed = reference._get_pos_embed_from_transformer(transformer)
    g = torch.Generator().manual_seed(0)
    x, control = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 16, 8, 6, generator=g)
    text, pooled, t = torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g), torch.tensor([500.0, 30.0])
    with torch.no_grad():
        expected = reference(hidden_states=x, controlnet_cond=control, conditioning_scale=0.7, timestep=t,
                             encoder_hidden_states=text if layout == "sd3" else None, pooled_projections=pooled,
                             return_dict=False)[0]  # fmt: skip
        got = ours(x, control, text, pooled, t, 0.7, pos_embed=mmdit.pos_embed)
        assert len(got) == len(expected) == num_layers
        for a, b in zip(got, expected):
            assert (a - b).abs().max() < 1e-5
        expected_v = transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                                 block_controlnet_hidden_states=expected, return_dict=False)[0]  # fmt: skip
        got_v = mmdit(x, text, pooled, t, block_controls=got)
        assert (got_v - expected_v).abs().max() < 1e-5
        assert (mmdit(x, text, pooled, t) - expected_v).abs().max() > 1e-2  # the residuals changed the output


def test_control_block_index_spreads_fewer_residuals():
    assert [control_block_index(i, 24, 12) for i in range(24)] == [i // 2 for i in range(24)]
    assert [control_block_index(i, 3, 2) for i in range(3)] == [0, 0, 1]
    assert [control_block_index(i, 4, 4) for i in range(4)] == [0, 1, 2, 3]


def test_controlnet_config_refuses_a_mismatched_caption_width():
    config = ControlNetConfig(**TINY, **SD3_LAYOUT, num_layers=1)
    config.caption_projection_dim = 16
    with pytest.raises(ValueError, match=r"caption_projection_dim \(16\).*\(32\)"):
        SD3ControlNet(config)


# ------------------------------------------------------------------------------------------- pipeline parity


PROMPT = "a red circle at the top left on a white background"
NEGATIVE = "a blue square"


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _control_image(seed: int, size: tuple[int, int] = (48, 64)) -> Image.Image:
    """A random RGB control image of ``size`` (width, height)."""
    array = np.random.default_rng(seed).random((size[1], size[0], 3)) * 255
    return Image.fromarray(array.astype(np.uint8))


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers draws the control latent from the VAE posterior with the unseeded global RNG; the workbench uses
    the posterior mean. Make diffusers' draw the mean too, so that the two can be compared."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


@pytest.fixture(scope="module")
def ours(tiny_sd3_folder):
    return load_pipeline(tiny_sd3_folder[0])


def _saved(controlnet, folder: Path) -> Path:
    controlnet.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _reference_pipe(tiny_sd3_folder, controlnet):
    pipe = diffusers.StableDiffusion3ControlNetPipeline(**tiny_sd3_folder[1].components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(ours, reference, **kwargs) -> tuple[Image.Image, int]:
    """Run both pipelines with the same arguments; (our image, the largest pixel difference)."""
    seed = kwargs.pop("seed")
    scale = kwargs.pop("reference_scale", kwargs.get("controlnet_conditioning_scale", 1.0))
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "controlnet_conditioning_scale"}
    expected = reference(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(seed),
                         controlnet_conditioning_scale=scale, **ref_kwargs).images[0]  # fmt: skip
    got = ours(PROMPT, negative_prompt=NEGATIVE, seed=seed, **kwargs).images[0]
    assert got.size == expected.size
    return got, int(np.abs(_pixels(got) - _pixels(expected)).max())


BASE = dict(height=64, width=48, num_inference_steps=4, max_sequence_length=32)


@pytest.mark.parametrize(
    ("layout", "num_layers", "guidance", "window"),
    [("sd3", 1, 4.5, (0.0, 1.0)), ("sd3", 2, 1.0, (0.0, 1.0)), ("sd35", 2, 4.5, (0.25, 0.75))],
)
def test_pipeline_equals_diffusers_controlnet_pipeline(
    ours, tiny_sd3_folder, tmp_path, posterior_mean, layout, num_layers, guidance, window
):
    reference_cn = reference_controlnet(layout, num_layers, seed=3)
    name = ours.controlnets.load(_saved(reference_cn, tmp_path / "cn"))
    try:
        reference = _reference_pipe(tiny_sd3_folder, reference_cn)
        control = _control_image(1, size=(40, 56))  # resized to 48x64 by both
        kwargs = dict(BASE, guidance_scale=guidance, control_image=control, controlnet_conditioning_scale=0.8,
                      control_guidance_start=window[0], control_guidance_end=window[1])  # fmt: skip
        got, difference = _compare(ours, reference, seed=7, **kwargs)
        assert difference <= 2
        plain = ours(PROMPT, negative_prompt=NEGATIVE, seed=7, guidance_scale=guidance, **BASE).images[0]
        assert np.abs(_pixels(plain) - _pixels(got)).max() > 10  # the ControlNet changed the image
        assert got.info["parameters"]  # metadata still written
    finally:
        ours.controlnets.remove(name)


def test_two_controlnets_equal_diffusers_multi_controlnet(ours, tiny_sd3_folder, tmp_path, posterior_mean):
    first, second = reference_controlnet("sd3", 1, seed=4), reference_controlnet("sd3", 2, seed=5)
    ours.controlnets.load(_saved(first, tmp_path / "a"), scale=0.5)
    ours.controlnets.load(_saved(second, tmp_path / "b"), scale=0.7)
    try:
        reference = _reference_pipe(tiny_sd3_folder, [first, second])
        images = [_control_image(2), _control_image(3)]
        _, difference = _compare(ours, reference, seed=5, guidance_scale=3.0, control_image=images,
                                 reference_scale=[0.5, 0.7], **BASE)  # fmt: skip
        assert difference <= 2
        with pytest.raises(ValueError, match="control_image lists 3 images for 2 ControlNets"):
            ours(PROMPT, seed=0, control_image=images + images[:1], **BASE)
    finally:
        ours.controlnets.clear()


def test_image_to_image_and_inpainting_keep_working_with_a_controlnet(ours, tmp_path):
    init = _control_image(6, size=(48, 64))
    mask = Image.new("L", (48, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    kwargs = dict(BASE, guidance_scale=3.0, image=init, strength=0.7)
    plain_i2i = ours(PROMPT, seed=2, **kwargs).images[0]
    plain_inpaint = ours(PROMPT, seed=2, mask_image=mask, mask_blur=0, **kwargs).images[0]
    ours.controlnets.load(_saved(reference_controlnet("sd3", 1, seed=6), tmp_path / "cn"))
    try:
        # attached but without a control image: nothing changes
        assert np.array_equal(_pixels(ours(PROMPT, seed=2, **kwargs).images[0]), _pixels(plain_i2i))
        control = _control_image(7)
        i2i = ours(PROMPT, seed=2, control_image=control, **kwargs).images[0]
        assert np.abs(_pixels(i2i) - _pixels(plain_i2i)).max() > 10
        inpaint = ours(PROMPT, seed=2, mask_image=mask, mask_blur=0, control_image=control, **kwargs).images[0]
        kept = np.asarray(mask) == 0
        assert np.array_equal(_pixels(inpaint)[kept], _pixels(init)[kept])  # pasted back outside the mask
        assert np.abs(_pixels(inpaint) - _pixels(plain_inpaint)).max() > 10
    finally:
        ours.controlnets.clear()


def test_controlnet_errors_name_the_problem(ours, tmp_path):
    with pytest.raises(ValueError, match=r"control_image needs a ControlNet: .*pipe.controlnets.load"):
        ours(PROMPT, seed=0, control_image=_control_image(0), **BASE)
    wide = reference_controlnet("sd3", 1, seed=0, num_attention_heads=8, caption_projection_dim=64)  # width 64 vs 32
    with pytest.raises(ValueError, match=r"width is 8 heads × 8 = 64, the transformer's 4 × 8 = 32"):
        ours.controlnets.load(_saved(wide, tmp_path / "wide"))
    assert len(ours.controlnets) == 0
    with pytest.raises(ValueError, match="control_guidance_start and control_guidance_end"):
        ours(PROMPT, seed=0, control_guidance_start=0.6, control_guidance_end=0.4, **BASE)
    with pytest.raises(ValueError, match=r"controlnet_conditioning_scale must be between 0 and 10"):
        ours(PROMPT, seed=0, controlnet_conditioning_scale=-1.0, **BASE)
    with pytest.raises(ModelFormatError, match="no such ControlNet"):
        ours.controlnets.load(tmp_path / "missing")


# ---------------------------------------------------------------------------------------- Stability single files


def _original_key_names(num_layers: int) -> set[str]:
    """The key names of Stability's SD3.5 ControlNet files (stabilityai/stable-diffusion-3.5-controlnets,
    e.g. sd3.5_large_controlnet_canny.safetensors), as diffusers' convert_sd3_controlnet_to_diffusers.py reads them."""
    names = {"pos_embed_input.proj.weight", "pos_embed_input.proj.bias"}
    for embedder in ("timestep_embedder", "text_embedder"):
        for layer in ("linear_1", "linear_2"):
            names |= {f"time_text_embed.{embedder}.{layer}.{kind}" for kind in ("weight", "bias")}
    for i in range(num_layers):
        names |= {f"controlnet_blocks.{i}.{kind}" for kind in ("weight", "bias")}
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            names |= {f"transformer_blocks.{i}.{part}.{kind}" for kind in ("weight", "bias")}
    return names


def _to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' names → Stability's (the inverse of the conversion script): q, k, v fused into qkv."""
    renames = {"attn.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
               "norm1.linear": "adaLN_modulation.1"}  # fmt: skip
    out = {}
    for key, tensor in state.items():
        if ".attn.to_k." in key or ".attn.to_v." in key:
            continue
        if ".attn.to_q." in key:
            kind = key.rsplit(".", 1)[1]
            prefix = key.split(".attn.")[0]
            parts = [state[f"{prefix}.attn.to_{n}.{kind}"] for n in "qkv"]
            out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts)
            continue
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = tensor
    return out


def test_stability_single_file_loads_and_equals_diffusers(ours, tiny_sd3_folder, tmp_path, posterior_mean):
    # Single files do not store the head width: 64 (Stability's), or the whole width when 64 does not divide it.
    reference_cn = reference_controlnet("sd35", 2, seed=8, num_attention_heads=1, attention_head_dim=32)
    original = _to_original(reference_cn.state_dict())
    assert set(original) == _original_key_names(2)
    path = tmp_path / "sd3.5_tiny_controlnet_blur.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    name = ours.controlnets.load(path, scale=0.9)
    try:
        assert name == "sd3.5_tiny_controlnet_blur"
        model = ours.controlnets.entries[name].model
        assert model.config.joint_attention_dim is None and not model.config.use_pos_embed
        assert not model.config.force_zeros_for_pooled_projection
        reference = _reference_pipe(tiny_sd3_folder, reference_cn)
        got, difference = _compare(ours, reference, seed=9, guidance_scale=4.0, control_image=_control_image(4),
                                   reference_scale=0.9, **BASE)  # fmt: skip
        assert difference <= 2
    finally:
        ours.controlnets.clear()


def test_single_file_with_unknown_keys_is_refused(ours, tmp_path):
    state = _to_original(reference_controlnet("sd35", 1, seed=0, num_attention_heads=1, attention_head_dim=32)
                         .state_dict())  # fmt: skip
    state["transformer_blocks.0.attn.ln_q.weight"] = torch.ones(32)
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ModelFormatError, match=r"unexpected keys .*attn.ln_q"):
        ours.controlnets.load(path)


# --------------------------------------------------------------------------- preprocessors, CLI, PNG parameters


def _square(size: int = 32) -> Image.Image:
    """A white square (px 8–23) on black."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[8:24, 8:24] = 255
    return Image.fromarray(array)


def test_preprocessors():
    edges = np.asarray(preprocess(_square(), "canny"))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[8:24, 7:9].any() and not edges[12:20, 12:20].any() and not edges[:4].any()  # the border only
    green_on_gray = np.full((32, 32, 3), 128, dtype=np.uint8)
    green_on_gray[8:24, 8:24] = (50, 170, 70)  # about as bright as the gray: a grayscale Canny sees no edge
    assert np.asarray(preprocess(Image.fromarray(green_on_gray), "canny"))[8:24, 7:9].any()
    half = np.zeros((64, 64, 3), dtype=np.uint8)
    half[:, :32] = 255  # white left half
    blurred = np.asarray(preprocess(Image.fromarray(half), "blur"), dtype=np.int16)
    assert 60 < blurred[32, 32, 0] < 195 and blurred[32, 2, 0] > 250 and blurred[32, 61, 0] < 5  # edge softened
    assert np.array_equal(np.asarray(preprocess(_square().convert("L"), "none")), np.asarray(_square()))
    assert preprocess(_square(), None).mode == "RGB"
    with pytest.raises(ValueError, match="preprocessor must be one of canny, blur, none"):
        preprocess(_square(), "depth")


def test_cli_generate_with_a_controlnet_and_its_png_parameters(ours, tiny_sd3_folder, tmp_path, capsys):
    folder = _saved(reference_controlnet("sd3", 1, seed=9), tmp_path / "edges")
    _square(64).save(tmp_path / "control.png")
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(tiny_sd3_folder[0]), "--prompt", PROMPT, "--steps", "3", "--seed", "4",
            "--height", "64", "--width", "48", "--max-sequence-length", "32", "--guidance", "3"]  # fmt: skip
    control = ["--control", str(tmp_path / "control.png"), "--controlnet", f"{folder}:0.6", "--preprocess", "canny"]
    assert main(args + control + ["--control-end", "0.7", "--out", str(out)]) == 0
    params = read_parameters(out)
    digest = file_sha256(folder / "diffusion_pytorch_model.safetensors")[:10]
    assert params["controlnets"] == f"edges:0.6:{digest}"
    assert params["controlnet_preprocessors"] == "canny" and params["control_guidance_end"] == 0.7
    assert params["controlnet_conditioning_scale"] == 1.0
    # the same image from the Python API
    ours.controlnets.load(folder, scale=0.6)
    try:
        canny_image = preprocess(Image.open(tmp_path / "control.png"), "canny")
        size = {k: BASE[k] for k in ("height", "width", "max_sequence_length")}
        same = ours(PROMPT, seed=4, num_inference_steps=3, guidance_scale=3.0, control_image=canny_image,
                    control_guidance_end=0.7, **size)  # fmt: skip
        assert np.array_equal(_pixels(same.images[0]), _pixels(Image.open(out).convert("RGB")))
        assert parse_parameters(same.images[0].info["parameters"])["controlnets"] == f"edges:0.6:{digest}"
    finally:
        ours.controlnets.clear()
    assert main(args + control[:2] + ["--out", str(tmp_path / "x.png")]) == 2
    assert "--control and --controlnet go together" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sweep_controlnet_conditioning_scale_axis(ours, tiny_sd3_folder, tmp_path):
    from workbench import sweep

    folder = _saved(reference_controlnet("sd3", 2, seed=10), tmp_path / "cn")
    _square(32).save(tmp_path / "control.png")
    data = {"model": str(tiny_sd3_folder[0]), "output_dir": str(tmp_path / "out"), "prompts": [PROMPT], "seeds": [5]}
    data.update(steps=3, guidance=3.0, height=32, width=32, max_sequence_length=32, grids=False)
    control = {"controlnet": str(folder), "control_image": str(tmp_path / "control.png"), "preprocess": "blur"}
    config = sweep.parse_config({**data, **control, "controlnet_conditioning_scale": [0.0, 0.8]})
    summary = sweep.run_sweep(config, progress=False)
    assert summary.generated == 2
    files = {row["settings"]["controlnet_conditioning_scale"]: row["file"] for row in summary.rows}
    got = {scale: _pixels(Image.open(tmp_path / "out" / file).convert("RGB")) for scale, file in files.items()}
    kwargs = dict(seed=5, num_inference_steps=3, guidance_scale=3.0, height=32, width=32, max_sequence_length=32)
    ours.controlnets.load(folder)
    try:
        blurred = preprocess(Image.open(tmp_path / "control.png"), "blur")
        expected = ours(PROMPT, control_image=blurred, controlnet_conditioning_scale=0.8, **kwargs).images[0]
    finally:
        ours.controlnets.clear()
    assert np.array_equal(got[0.8], _pixels(expected))
    assert np.array_equal(got[0.0], _pixels(ours(PROMPT, **kwargs).images[0]))  # scale 0: no control
    assert read_parameters(tmp_path / "out" / files[0.8])["controlnet_preprocessors"] == "blur"
    plain_ids = {c.id for c in sweep.expand(sweep.parse_config(data))}
    assert plain_ids.isdisjoint(c.id for c in sweep.expand(config))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale 0.5 given without a controlnet"):
        sweep.parse_config({**data, "controlnet_conditioning_scale": 0.5})
    with pytest.raises(ValueError, match="controlnet and control_image go together"):
        sweep.parse_config({**data, "controlnet": str(folder)})
