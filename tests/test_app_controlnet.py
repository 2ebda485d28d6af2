"""The app's ControlNet section (Text → Image and Image → Image) and GGUF loading in the Model tab, on tiny random
models: the section changes the image and records the ControlNet in the PNG, its preview is the preprocessor's
output, visitors choose among the operator's ControlNets that fit the model by name only, bad input is a message
naming the field, and a GGUF transformer loads through the Model tab with its companion folder."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_sd3 import random_shapesworld

from workbench.controlnet import file_sha256
from workbench.limits import Limits
from workbench.metadata import read_parameters
from workbench.models.controlnet import ControlNetConfig, SD3ControlNet
from workbench.preprocess import preprocess
from workbench.ui import hosting, img2img, model_tab, text2img
from workbench.ui.builder import build_app
from workbench.ui.controlnet_panel import ControlNetLibrary, control_picture
from workbench.ui.hosting import Catalog, HostingPolicy
from workbench.ui.session import Workbench

PROMPT = "a large red circle at the top left on a white background"
RUN = dict(steps=4, width=64, height=64, seed=5, guidance_scale=3.0)


def save_controlnet(folder: Path, heads: int = 1, seed: int = 0) -> Path:
    """A random one-block SD3 ControlNet for the micro ShapesWorld transformer (width 64 = 1 head × 64; ``heads``
    2: too wide for it), saved as a diffusers folder; its weights perturbed (the output heads start at zero)."""
    config = ControlNetConfig(sample_size=16, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64,
                              num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=64 * heads,
                              pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16)  # fmt: skip
    torch.manual_seed(seed)
    model = SD3ControlNet(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors")
    )
    return folder


def shape_image(size: int = 64) -> Image.Image:
    """A blue square on white."""
    image = Image.new("RGB", (size, size), (245, 245, 245))
    image.paste((40, 90, 220), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def controls(**changes) -> dict:
    return {"control_image": None, "preprocessor": "canny", "controlnet": "none",
            "controlnet_conditioning_scale": 1.0, "control_guidance_start": 0.0, "control_guidance_end": 1.0,
            **changes}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A ControlNet folder with one that fits the micro model ("edges") and one that does not ("wide")."""
    root = tmp_path_factory.mktemp("controlnets")
    save_controlnet(root / "edges", seed=1)
    save_controlnet(root / "wide", heads=2, seed=2)
    return root


@pytest.fixture(scope="module")
def pipe():
    return random_shapesworld()


@pytest.fixture(scope="module")
def app(folders, pipe, tmp_path_factory):
    policy = HostingPolicy(catalog=Catalog.scan([], [], [folders]))
    return build_app(pipe, output_dir=tmp_path_factory.mktemp("outputs"), policy=policy)


def component(demo: gr.Blocks, elem_id: str) -> gr.components.Component:
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def event(demo: gr.Blocks, name: str):
    return next(fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == name)


# ----------------------------------------------------------------------------------------------- generation


def test_controlnet_changes_the_image_and_the_png_names_it(app, folders, pipe, caplog):
    wb = app.workbench
    library = ControlNetLibrary(wb.policy.catalog.controlnets)
    with caplog.at_level(logging.INFO, logger="workbench.ui"):
        assert library.available(pipe) == ["edges"]  # "wide" does not fit the transformer: left out, logged
    assert "'wide' is not offered" in caplog.text and "width is 2 heads × 64 = 128" in caplog.text
    for prefix in ("t2i", "i2i"):
        assert [c[0] for c in component(app, f"{prefix}-controlnet-name").choices] == ["none", "edges"]
    handler = text2img.api_function(wb, library)
    plain, _, plain_parameters = handler(PROMPT, **RUN)  # the API without a control image
    assert "ControlNet" not in plain_parameters
    window = dict(controlnet_conditioning_scale=0.8, control_guidance_start=0.1, control_guidance_end=0.9)
    editor = {"background": shape_image(), "layers": [], "composite": shape_image()}
    gallery, _, parameters = handler(PROMPT, **RUN, **controls(control_image=editor, controlnet="edges", **window))
    assert np.abs(pixels(gallery[0][0]) - pixels(plain[0][0])).max() > 10
    params = read_parameters(gallery[0][0])
    digest = file_sha256(folders / "edges" / "diffusion_pytorch_model.safetensors")[:10]
    assert params["controlnets"] == f"edges:1:{digest}" and params["controlnet_preprocessors"] == "canny"
    assert params["controlnet_conditioning_scale"] == 0.8
    assert params["control_guidance_start"] == 0.1 and params["control_guidance_end"] == 0.9
    assert len(pipe.controlnets) == 0  # attached for that request only
    # the same image as the Python API with the same ControlNet and preprocessed control image
    pipe.controlnets.load(folders / "edges")
    try:
        kwargs = dict(num_inference_steps=4, width=64, height=64, seed=5, guidance_scale=3.0)
        same = pipe(PROMPT, control_image=preprocess(shape_image(), "canny"), **window, **kwargs).images[0]
    finally:
        pipe.controlnets.clear()
    assert np.array_equal(pixels(same), pixels(gallery[0][0]))


def test_png_info_sends_the_controlnet_to_text_to_image(app, pipe):
    """A PNG made with a ControlNet, sent from PNG info: Text → Image's ControlNet section gets its name,
    preprocessor, scale, start and end, and the note asks for the control image; a PNG without one sets it to none."""
    handler = text2img.api_function(app.workbench, ControlNetLibrary(app.workbench.policy.catalog.controlnets))
    window = dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.2, control_guidance_end=0.8)
    editor = {"background": shape_image(), "layers": [], "composite": shape_image()}
    values = controls(control_image=editor, controlnet="edges", preprocessor="blur", **window)
    gallery, _, _ = handler(PROMPT, **RUN, **values)
    send = next(fn.fn for fn in app.fns.values() if getattr(fn.fn, "__qualname__", "") == "wire_send.<locals>.send"
                and any(getattr(c, "elem_id", None) == "pnginfo-note" for c in fn.outputs))  # fmt: skip
    values = sent_values(send(read_parameters(gallery[0][0])))
    assert values["t2i-controlnet-name"] == "edges" and values["t2i-preprocess"] == "blur"
    assert [values[label] for label in ("ControlNet scale", "ControlNet start", "ControlNet end")] == [0.7, 0.2, 0.8]
    assert "control image" in values["pnginfo-note"] and "'edges'" in values["pnginfo-note"]
    plain, _, _ = handler(PROMPT, **RUN)
    values = sent_values(send(read_parameters(plain[0][0])))
    assert values["t2i-controlnet-name"] == "none" and "ControlNet" not in values["pnginfo-note"]


def sent_values(updates: dict) -> dict:
    """The values of a handler's ``{component: update}`` by elem_id (or label, for components without one)."""
    values = {}
    for component, update in updates.items():
        key = getattr(component, "elem_id", None) or str(getattr(component, "label", ""))
        values[key] = update.get("value") if isinstance(update, dict) else update
    return values


def test_image_to_image_takes_the_controlnet_too(app):
    handler = img2img.api_function(app.workbench)  # its own library, from the policy
    start = shape_image()
    common = dict(**RUN, strength=0.8)
    plain, _, _ = handler(PROMPT, start, **common)
    drawn = Image.new("RGBA", (96, 96), (0, 0, 0, 0))  # an outline drawn on the empty canvas
    drawn.paste((0, 0, 0, 255), (20, 20, 76, 26))
    values = controls(control_image={"composite": drawn}, controlnet="edges", preprocessor="none")
    gallery, _, _ = handler(PROMPT, start, **common, **values)
    assert read_parameters(gallery[0][0])["controlnet_preprocessors"] == "none"
    assert np.abs(pixels(gallery[0][0]) - pixels(plain[0][0])).max() > 10


def test_preview_is_the_preprocessor_output(app):
    show = event(app, "show")
    image = shape_image(96)
    editor = {"background": image, "layers": [], "composite": image}
    for name in ("canny", "blur", "none"):
        assert np.array_equal(pixels(show(editor, name)), pixels(preprocess(image, name)))
    assert show(None, "canny") is None and show({"background": None, "layers": [], "composite": None}, "blur") is None
    blank = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert control_picture({"composite": blank}) is None  # an empty canvas is no control image
    stroke = blank.copy()
    stroke.paste((0, 0, 0, 255), (10, 10, 50, 14))
    on_white = control_picture({"composite": stroke})
    assert on_white.mode == "RGB" and on_white.getpixel((0, 0)) == (255, 255, 255)
    assert on_white.getpixel((20, 12)) == (0, 0, 0)


def test_bad_input_names_the_field_and_the_app_serves_the_next_request(app, pipe):
    wb = app.workbench
    handler = text2img.api_function(wb, ControlNetLibrary(wb.policy.catalog.controlnets))
    image = shape_image()
    cases = {
        "ControlNet: choose one for the control image (edges)": controls(control_image=image),
        "ControlNet: 'wide' is not one of this app's ControlNets; choose one of: edges": controls(
            control_image=image, controlnet="wide"
        ),
        "ControlNet: '/etc/passwd' is not one of": controls(control_image=image, controlnet="/etc/passwd"),
        "ControlNet scale (controlnet_conditioning_scale): must be a finite number in [0, 10], got 11": controls(
            control_image=image, controlnet="edges", controlnet_conditioning_scale=11
        ),
        "ControlNet preprocessor: must be one of canny, blur, none, got 'depth'": controls(
            control_image=image, controlnet="edges", preprocessor="depth"
        ),
        "ControlNet start and end: must satisfy 0 <= start < end <= 1": controls(
            control_image=image, controlnet="edges", control_guidance_start=0.7, control_guidance_end=0.3
        ),
    }
    for message, values in cases.items():
        with pytest.raises(gr.Error) as err:
            handler(PROMPT, **RUN, **values)
        assert message in err.value.message, err.value.message
    small = Workbench(
        pipe, wb.output_dir, policy=replace(wb.policy, limits=replace(Limits.local(), max_image_pixels=32 * 32))
    )
    with pytest.raises(gr.Error, match=r"control image: 64×64 px is more than this app accepts"):
        text2img.api_function(small)(PROMPT, **RUN, **controls(control_image=image, controlnet="edges"))
    assert len(pipe.controlnets) == 0
    gallery, seed, _ = handler(PROMPT, **RUN, **controls(control_image=image, controlnet="edges"))
    assert seed == 5 and read_parameters(gallery[0][0])["controlnets"].startswith("edges:1:")


# --------------------------------------------------------------------------------------------------- hosting


def test_public_mode_offers_the_operators_controlnets_by_name_only(folders, pipe, tmp_path):
    policy = HostingPolicy(public=True, model_changes=False, free_paths=False,
                           catalog=Catalog.scan([], [], [folders]), limits=Limits.public({}))  # fmt: skip
    demo = build_app(pipe, output_dir=tmp_path / "out", policy=policy)
    dropdown = component(demo, "t2i-controlnet-name")
    assert [c[0] for c in dropdown.choices] == ["none", "edges"]
    assert str(folders) not in json.dumps(demo.config, default=str)  # names, never paths
    with pytest.raises(gr.Error, match="ControlNet: Value: /etc/passwd is not in the list of choices"):
        dropdown.preprocess("/etc/passwd")  # refused before any handler runs
    assert dropdown.preprocess("edges") == "edges"
    handler = text2img.api_function(demo.workbench)
    with pytest.raises(gr.Error, match="'wide' is not one of this app's ControlNets"):
        handler(PROMPT, **RUN, **controls(control_image=shape_image(), controlnet="wide"))
    gallery, _, _ = handler(PROMPT, **RUN, **controls(control_image=shape_image(), controlnet="edges"))
    assert read_parameters(gallery[0][0])["controlnets"].startswith("edges:1:")


def test_controlnet_sources_flags_folders_and_shipped(folders, tmp_path, monkeypatch):
    import app as app_module

    args = app_module.parse_args(["--controlnet", str(folders / "edges"), "--controlnet-dir", str(tmp_path)])
    assert args.controlnet == [str(folders / "edges")] and args.controlnet_dir == [str(tmp_path)]
    models = tmp_path / "models"
    save_controlnet(models / "shapesworld-controlnet-canny")
    (models / "shapesworld-controlnet-unfinished").mkdir()  # no config.json yet: not listed
    single = tmp_path / "single"
    single.mkdir()
    save_file({"x": torch.zeros(1)}, str(single / "file_cn.safetensors"))
    monkeypatch.setattr(hosting, "default_model_dirs", lambda: [models])
    env = {"WORKBENCH_CONTROLNET_DIRS": str(single)}
    policy = hosting.resolve_policy(controlnets=[folders / "wide"], controlnet_dirs=[folders], env=env)
    assert list(policy.catalog.controlnets) == ["wide", "shapesworld-controlnet-canny", "edges", "file_cn"]
    assert "shapesworld-controlnet-canny" not in policy.catalog.models
    library = ControlNetLibrary(policy.catalog.controlnets)
    assert library.available(random_shapesworld()) == ["shapesworld-controlnet-canny", "edges"]  # file_cn: no CN
    monkeypatch.setattr(hosting, "default_model_dirs", lambda: [tmp_path / "nothing"])
    assert list(hosting.resolve_policy(env={}).catalog.controlnets) == []


# ------------------------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def companion(tmp_path_factory):
    """A tiny SD3 diffusers folder whose transformer is 2 heads × 64 wide (GGUF files do not store the head width:
    the loader takes 64) and too wide for the "edges" ControlNet."""
    pytest.importorskip("diffusers")
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny_sd3 import JOINT_ATTENTION_DIM, POOLED_PROJECTION_DIM, build_tiny_sd3_components

    components = build_tiny_sd3_components(seed=3, with_t5=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        components["transformer"] = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=JOINT_ATTENTION_DIM, caption_projection_dim=128,
            pooled_projection_dim=POOLED_PROJECTION_DIM, out_channels=16, pos_embed_max_size=32,
        ).eval()  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny_sd3_128")
    StableDiffusion3Pipeline(**components).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def gguf_file(companion, tmp_path_factory):
    """The companion's transformer as a Q8_0 GGUF file (as tests/test_gguf.py writes them)."""
    pytest.importorskip("gguf")
    from test_gguf import write_gguf
    from test_loading import to_original_transformer

    from workbench import load_pipeline

    state = load_pipeline(companion).transformer.state_dict()
    folder = tmp_path_factory.mktemp("gguf")
    return write_gguf(folder / "tiny-Q8_0.gguf", to_original_transformer(state, 2), "Q8_0")


def test_model_tab_loads_a_gguf_with_its_companion_folder(app, gguf_file, companion):
    from workbench.formats.gguf import GGUFLinear

    wb = app.workbench
    before = wb.pipe
    load = event(app, "load")
    refused = asyncio.run(load(str(gguf_file), "None", "None", ""))
    text = " ".join(str(v) for v in refused.values())
    assert "**Not loaded:** Text encoders / VAE from: 'tiny-Q8_0.gguf' is a GGUF transformer alone" in text
    assert wb.pipe is before
    loaded = asyncio.run(load(str(gguf_file), "None", "None", str(companion)))
    try:
        assert any("Loaded" in str(v) for v in loaded.values())
        assert isinstance(wb.pipe.transformer.transformer_blocks[0].attn.to_q, GGUFLinear)
        dropdown = component(app, "t2i-controlnet-name")
        assert loaded[dropdown]["choices"] == ["none"]  # "edges" does not fit the tiny SD3 transformer
        out = wb.pipe(PROMPT, seed=1, num_inference_steps=2, height=32, width=32)
        assert out.images[0].size == (32, 32)
    finally:
        wb.pipe = before


def test_allowed_folders_give_the_gguf_companion_by_name(pipe, gguf_file, companion, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(gguf_file, models / gguf_file.name)
    os.symlink(companion, models / "tiny-sd3")
    policy = HostingPolicy(public=True, model_changes=True, free_paths=False, catalog=Catalog.scan([models], []))
    assert policy.catalog.model_folders == [hosting.EMBEDDED_NAME, "tiny-sd3"]
    wb = Workbench(pipe, tmp_path / "out", policy=policy)
    with pytest.raises(ValueError, match="'tiny-Q8_0.gguf' is a GGUF transformer alone.*one of the model folders"):
        model_tab.check_companion(wb, gguf_file.name, None)
    with pytest.raises(ValueError, match="'/etc' is not an allowed model folder"):
        wb.load(gguf_file.name, text_encoders_from="/etc")
    with pytest.raises(ValueError, match="'tiny-Q8_0.gguf' is not an allowed model folder"):
        wb.load("tiny-sd3", text_encoders_from=gguf_file.name)
    loaded = wb.load(gguf_file.name, text_encoders_from="tiny-sd3")
    assert loaded is wb.pipe and loaded.name == "tiny-Q8_0"
