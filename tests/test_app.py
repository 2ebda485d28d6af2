"""The Gradio workbench through gradio_client: each API endpoint, PNG metadata, errors as messages, concurrency;
plus the UI helpers (widget values ↔ pipeline arguments, Stop, model loading errors, dense models).

The app runs in-process on the embedded model when ``models/shapesworld-moe`` exists, else on a random micro
ShapesWorld MoE model (output layers randomised so that images depend on prompt, seed and routing)."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from tiny_sd3 import random_shapesworld

from workbench import GenerationCancelled
from workbench.loading import EMBEDDED_MODEL
from workbench.metadata import read_parameters
from workbench.ui import controls, experts, img2img, pnginfo, video
from workbench.ui.session import Finished, page_errors

STEPS = 4
PROMPT = "a large red circle at the top left on a white background"


def micro_pipeline(experts_on: bool = True):
    """A random micro ShapesWorld pipeline whose output does depend on its weights."""
    return random_shapesworld(experts=experts_on)


def app_model():
    """The embedded model's path when it is there, else a micro pipeline."""
    return None if (EMBEDDED_MODEL / "model_index.json").is_file() else micro_pipeline()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_app(output_dir: Path):
    """Build and launch the app in this process; returns (demo, url)."""
    from app import build_app

    demo = build_app(app_model(), output_dir=output_dir)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    demo, url = launch_app(tmp_path_factory.mktemp("outputs"))
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def first_image(result) -> str:
    gallery = result[0]
    assert isinstance(gallery, list) and gallery, f"no images returned: {result!r}"
    return gallery[0]["image"]


# ------------------------------------------------------------------------------------------------------ endpoints


def test_api_endpoints_need_only_prompt_and_image(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name, required in (("/text2img", set()), ("/img2img", {"image"}), ("/frames", set())):
        params = endpoints[name]["parameters"]
        assert params[0]["parameter_name"] == "prompt"
        assert {p["parameter_name"] for p in params if not p["parameter_has_default"]} == required, name


def test_text2img_returns_png_with_parameters_equal_to_the_pipeline(served, client):
    result = client.predict(prompt=PROMPT, steps=STEPS, seed=5, api_name="/text2img")
    path = first_image(result)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (served[0].workbench.pipe.defaults.width, served[0].workbench.pipe.defaults.height)
    params = read_parameters(path)
    assert (params["prompt"], params["seed"], params["steps"]) == (PROMPT, 5, STEPS)
    assert result[1] == 5 and result[2] == Image.open(path).info["parameters"]
    direct = served[0].workbench.pipe(PROMPT, seed=5, num_inference_steps=STEPS)
    np.testing.assert_array_equal(pixels(path), np.asarray(direct.images[0]))


def test_png_settings_regenerate_the_same_image(served, client):
    settings = dict(
        negative_prompt="a blue square",
        steps=3,
        guidance_scale=3.0,
        seed=11,
        sampler="heun",
        shift=2.0,
        flow_temperature=0.9,
        dynamic_thresholding=0.99,
        guidance_interval_low=0.1,
        guidance_interval_high=0.9,
        skip_layers="1,2",
        skip_layer_scale=2.0,
        skip_layer_start=0.0,
        skip_layer_stop=0.5,
    )
    original = first_image(client.predict(prompt=PROMPT, api_name="/text2img", **settings))
    parsed = client.predict(handle_file(original), api_name="/png_info")
    assert parsed["sampler"] == "heun" and parsed["seed"] == 11
    values = controls.parameters_to_settings(parsed, served[0].workbench.pipe)
    assert {k: values[k] for k in settings} == settings
    again = first_image(client.predict(api_name="/text2img", **values))
    np.testing.assert_array_equal(pixels(original), pixels(again))


def test_img2img_endpoint(client, tmp_path):
    start = Image.new("RGB", (128, 128), (245, 245, 245))
    start.paste((40, 90, 220), (20, 20, 60, 60))
    start.save(tmp_path / "start.png")
    result = client.predict(
        prompt=PROMPT, image=handle_file(tmp_path / "start.png"), steps=STEPS, strength=0.5, seed=2, api_name="/img2img"
    )
    params = read_parameters(first_image(result))
    assert params["strength"] == 0.5 and params["seed"] == 2
    with pytest.raises(AppError, match="image"):
        client.predict(prompt=PROMPT, image=None, steps=STEPS, api_name="/img2img")


def test_img2img_handler_inpaints_only_the_painted_region(served, client, tmp_path):
    """A painted mask (editor layers, alpha > 0 = repaint) changes that region and leaves the rest close to the start
    image; the /img2img API takes the same editor value; an unpainted editor is plain image→image."""
    handler = img2img.api_function(served[0].workbench)
    start = Image.new("RGB", (128, 128), (245, 245, 245))
    start.paste((40, 90, 220), (72, 72, 112, 112))
    layer = Image.new("RGBA", start.size, (0, 0, 0, 0))
    layer.paste((255, 0, 255, 150), (0, 0, 64, 64))
    common = dict(steps=STEPS, seed=3, strength=1.0)
    gallery, _, parameters = handler(PROMPT, start, mask={"background": start, "layers": [layer]}, **common)
    assert "Mask size: 128x128, Mask coverage: 0.25" in parameters
    change = np.abs(pixels(gallery[0][0]).astype(int) - np.asarray(start, dtype=int)).mean(-1)
    outside = np.ones(change.shape, bool)
    outside[:80, :80] = False  # a margin around the painted 64 × 64 corner
    inside_change, outside_change = change[:64, :64].mean(), change[outside].mean()
    assert inside_change > 40 and outside_change < 16, (inside_change, outside_change)
    assert change[outside].max() == 0  # pasted back (the default), exact away from the feathered edge
    unpasted, _, _ = handler(PROMPT, start, mask={"layers": [layer]}, paste_back=False, **common)
    assert np.abs(pixels(unpasted[0][0]).astype(int) - np.asarray(start, dtype=int))[outside].max() > 0
    start.save(tmp_path / "start.png")
    layer.save(tmp_path / "layer.png")
    mask = {"background": None, "layers": [handle_file(tmp_path / "layer.png")], "composite": None}
    result = client.predict(
        prompt=PROMPT, image=handle_file(tmp_path / "start.png"), mask=mask, **common, api_name="/img2img"
    )
    np.testing.assert_array_equal(pixels(first_image(result)), pixels(gallery[0][0]))

    unpainted = {"background": start, "layers": [Image.new("RGBA", start.size)], "composite": start}
    plain, _, plain_parameters = handler(PROMPT, start, mask=unpainted, **common)
    direct = served[0].workbench.pipe(PROMPT, image=start, strength=1.0, num_inference_steps=STEPS, seed=3)
    np.testing.assert_array_equal(pixels(plain[0][0]), np.asarray(direct.images[0]))
    assert "Mask" not in plain_parameters
    with pytest.raises(gr.Error, match="mask_image is 64x64, image is 128x128"):
        handler(PROMPT, start, mask={"layers": [layer.resize((64, 64))]}, **common)
    assert handler(PROMPT, start, mask={"layers": [layer]}, **common)[1] == 3


@pytest.mark.parametrize("video_format", ["mp4", "gif"])
def test_frames_endpoint(client, video_format):
    prompts = f"{PROMPT}\na blue square at the bottom right on a white background"
    video_path, frames, consistency = client.predict(
        prompt=prompts, num_frames=3, steps=2, video_format=video_format, api_name="/frames"
    )
    assert Path(video_path).suffix == f".{video_format}" and Path(video_path).stat().st_size > 0
    assert len(frames) == 3
    params = read_parameters(frames[1]["image"])
    assert params["Frame"] == "1/3" and params["Mode"] == "travel"
    assert "flicker" in consistency
    if video_format == "gif":
        with Image.open(video_path) as gif:
            assert gif.n_frames == 3


def test_bad_size_is_a_message_and_the_next_call_works(client):
    with pytest.raises(AppError, match="width must be a positive multiple of 16"):
        client.predict(prompt=PROMPT, width=100, steps=2, api_name="/text2img")
    with pytest.raises(AppError, match="walk"):
        client.predict(prompt="one\ntwo", mode="walk", num_frames=2, steps=1, api_name="/frames")
    assert read_parameters(first_image(client.predict(prompt=PROMPT, steps=2, seed=1, api_name="/text2img")))


def test_eight_simultaneous_clients_all_get_their_images(served):
    def call(seed: int) -> dict:
        result = Client(served[1], verbose=False).predict(prompt=PROMPT, steps=1, seed=seed, api_name="/text2img")
        return read_parameters(first_image(result))

    with ThreadPoolExecutor(max_workers=8) as pool:
        params = list(pool.map(call, range(100, 108)))
    assert [p["seed"] for p in params] == list(range(100, 108))


def test_batch_count_gives_consecutive_seeds(client):
    gallery, seed, _ = client.predict(prompt=PROMPT, steps=2, seed=40, batch_count=2, api_name="/text2img")
    assert seed == 40
    assert [read_parameters(item["image"])["seed"] for item in gallery] == [40, 41]


# --------------------------------------------------------------------------------------------- state and helpers


def test_stop_cancels_within_one_step(served):
    wb = served[0].workbench
    executed: list[int] = []
    at_stop: list[int] = []

    def work(callback):
        def counting(step, sigma, latents):
            executed.append(step)
            return callback(step, sigma, latents)

        return wb.pipe(PROMPT, seed=0, num_inference_steps=30, callback=counting)

    with pytest.raises(GenerationCancelled):
        for event in wb.stream("test-session", work, total=30):
            assert not isinstance(event, Finished) and event.preview is not None
            if not at_stop:
                at_stop.append(len(executed))
                wb.stop("test-session")
    assert len(executed) <= at_stop[0] + 1 < 30
    assert not wb.lock.locked()


def test_stop_answers_after_the_run_sent_its_last_update(served):
    """Stop's "Stopped." and the job's progress travel apart: Stop answers only once the run can send nothing more."""
    wb = served[0].workbench
    assert wb.wait_ended("idle-session", timeout=0)
    events: list[object] = []
    started = threading.Event()

    def work(callback):
        return wb.pipe(PROMPT, seed=0, num_inference_steps=30, callback=callback)

    def consume() -> None:
        try:
            for event in wb.stream("stopped-session", work, total=30, preview=False):
                events.append(event)
                started.set()
        except GenerationCancelled as err:
            events.append(err)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert started.wait(60)
    wb.stop("stopped-session")
    assert wb.wait_ended("stopped-session", timeout=60)
    answered = len(events)
    consumer.join(60)
    assert isinstance(events[-1], GenerationCancelled) and len(events) == answered
    assert not any(isinstance(event, Finished) for event in events) and len(events) < 30


def test_wrong_model_path_is_a_message_and_the_model_stays(served, tmp_path):
    wb = served[0].workbench
    before = wb.pipe
    with pytest.raises(gr.Error, match="not a model folder"):
        with page_errors("Loading the model"):
            wb.load(str(tmp_path))
    with pytest.raises(gr.Error, match="pickle"):
        with page_errors("Loading the model"):
            (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
            wb.load(str(tmp_path / "model.ckpt"))
    assert wb.pipe is before


def test_unexpected_errors_become_messages():
    with pytest.raises(gr.Error, match="Thing failed: RuntimeError") as err:  # its text may name server paths
        with page_errors("Thing"):
            raise RuntimeError("boom /srv/secret")
    assert "boom" not in err.value.message and "server log" in err.value.message


def test_generation_kwargs_map_widget_values():
    kwargs = controls.generation_kwargs("neg", 7.0, 3.5, 144.0, 96.0, -1, 2.0, "dpmpp_2m", 2.0, 1.1, 0.0, 0.2, 1.0, "")
    assert kwargs == {
        "negative_prompt": "neg",
        "num_inference_steps": 7,
        "guidance_scale": 3.5,
        "width": 144,
        "height": 96,
        "seed": None,
        "num_images": 2,
        "sampler": "dpmpp_2m",
        "shift": 2.0,
        "flow_temperature": 1.1,
        "dynamic_thresholding_ratio": None,
        "guidance_interval": (0.2, 1.0),
        "skip_guidance_layers": None,
        "skip_layer_guidance_scale": 2.8,
        "skip_layer_guidance_start": 0.01,
        "skip_layer_guidance_stop": 0.2,
        "layout_guidance": 0.0,
        "layout_control": 0.0,
    }
    assert controls.generation_kwargs(layout_guidance=0.1)["layout_guidance"] == 0.1
    assert controls.generation_kwargs(skip_layers=" 7, 8,9")["skip_guidance_layers"] == [7, 8, 9]
    with pytest.raises(ValueError, match="steps must be a whole number"):
        controls.generation_kwargs(steps=2.5)
    with pytest.raises(ValueError, match="skip_layers must be comma-separated block indices such as 7,8,9, got '7;8'"):
        controls.generation_kwargs(skip_layers="7;8")


def test_parameters_of_other_tools_fit_the_model(served):
    pipe = served[0].workbench.pipe
    values = controls.parameters_to_settings(
        {"prompt": "p", "sampler": "DPM++ 2M", "width": 1024, "height": 100, "seed": 3}, pipe
    )
    assert values["sampler"] == "dpmpp_2m"
    assert values["width"] == pipe.max_image_side and values["height"] == 96
    assert values["steps"] == pipe.defaults.num_inference_steps


def test_expert_and_seed_helpers():
    assert experts.expert_weights([1.0, 1.0, 1.0, 1.0, 1.0], 4) is None
    assert experts.expert_weights([0.0, 1.0], 4) == [0.0, 1.0, 1.0, 1.0]
    assert (
        experts.resolve_seed(-1, 77) == 77 and experts.resolve_seed(5, 77) == 5 and experts.resolve_seed(-1, None) == -1
    )
    values, temperature, note = pnginfo.expert_settings({"expert_weights": [0, 1, 1, 1], "router_temperature": 2}, 4)
    assert values == [0.0, 1.0, 1.0, 1.0] and temperature == 2.0 and "Experts" in note
    assert pnginfo.expert_settings({}, 4) == ([1.0] * 4, 1.0, "")
    assert "an inpainting mask" in pnginfo.expert_settings({"strength": 0.8, "mask_size": "128x128"}, 4)[2]


def test_frames_request_modes():
    one = video.frames_request("a\n\n", "", "auto", 4, "3", 0.35, "linear", 2, 1.0, 128, 128)
    assert one["mode"] == "walk" and one["prompts"] == ["a"] and one["seed"] == 3
    two = video.frames_request("a\nb", "", "auto", 4, "0, 5", 0.35, "cosine", 2, 1.0, 128, 128)
    assert two["mode"] == "travel" and two["seed"] == [0, 5]
    loop = video.frames_request("a", "", "loopback", 3, "0", 0.5, "linear", 10, 1.0, 128, 128)
    assert video.total_steps(loop) == 10 + 2 * 5
    with pytest.raises(ValueError, match="seed"):
        video.parse_seeds("x")


def test_dense_model_says_so_on_the_experts_tab(tmp_path):
    from app import build_app

    demo = build_app(micro_pipeline(experts_on=False), output_dir=tmp_path)
    notices = [
        c
        for c in demo.config["components"]
        if c["props"].get("value") == experts.DENSE_NOTICE and c["props"].get("visible") is not False
    ]
    assert demo.workbench.pipe.num_experts == 0 and len(notices) == 1


def test_stream_reports_errors_of_the_work(served):
    wb = served[0].workbench

    def work(callback):
        raise ValueError("bad thing")

    with pytest.raises(ValueError, match="bad thing"):
        list(wb.stream("s", work, total=1))
    assert not wb.lock.locked()
