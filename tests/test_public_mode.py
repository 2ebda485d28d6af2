"""The app hosted publicly, driven as an anonymous client (gradio_client and raw HTTP to the queue endpoints): no
model, LoRA or quantization change through any ``fn_index``; errors that reveal nothing about the server's files;
every limit refused with its message; NaN / inf / text refused in every number field; the app serves the next
request after all of it. Runs on the embedded model (or a micro model) at a few steps, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import struct
import time
import uuid
import zlib
from types import SimpleNamespace

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_app import PROMPT, app_model, first_image, free_port

from workbench.limits import MB, Limits, check_work, prune_outputs
from workbench.loading import EMBEDDED_MODEL
from workbench.metadata import read_parameters
from workbench.ui.builder import build_app, launch_options
from workbench.ui.hosting import Catalog, HostingPolicy, NotAllowedError, parse_auth, resolve_policy
from workbench.ui.session import MODEL_CHANGES_OFF, Workbench, page_errors

LIMITS = Limits(
    queue_max_size=2,
    jobs_per_session=1,
    max_file_size=1 * MB,
    max_image_pixels=1024 * 1024,
    max_work=20_000_000,
    output_max_age_s=3600,
    output_max_bytes=512 * MB,
)
GENERIC = "upstream Gradio app has raised an exception"
LEAKS = ("bytes", "exist", "directory", "is a file", "Traceback", "SECRET", "No such file", "root:")


def public_policy(**changes) -> HostingPolicy:
    fields = dict(public=True, model_changes=False, free_paths=False, catalog=Catalog.scan([], []), limits=LIMITS)
    return HostingPolicy(**{**fields, **changes})


HTTP = httpx.Client(timeout=120)
"""One keep-alive connection pool for the raw HTTP calls (a fresh connection per call cost ~60 ms)."""


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    demo = build_app(app_model(), output_dir=tmp_path_factory.mktemp("outputs"), policy=public_policy())
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_options(demo))
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(public):
    return Client(public[1], verbose=False)


# ------------------------------------------------------------------------------------------------------ raw HTTP


def fn_index(demo: gr.Blocks, api_name: str) -> int:
    return next(i for i, fn in demo.fns.items() if fn.api_name == api_name)


def api_data(demo: gr.Blocks, api_name: str, **values) -> list:
    """The raw ``data`` list of an API endpoint: each input's default, ``values`` by parameter name."""
    index = fn_index(demo, api_name)
    names = list(inspect.signature(demo.fns[index].fn).parameters)
    data = [component.value for component in demo.fns[index].inputs]
    for name, value in values.items():
        data[names.index(name)] = value
    return data


def join(url: str, index: int, data: list, session: str | None = None) -> tuple[int, str, str]:
    """POST /gradio_api/queue/join (NaN and inf written as JSON's NaN / Infinity); (status, event id or detail,
    session hash)."""
    session = session or uuid.uuid4().hex
    body = json.dumps({"data": data, "fn_index": index, "session_hash": session, "event_data": None}, allow_nan=True)
    reply = HTTP.post(url + "gradio_api/queue/join", content=body, headers={"Content-Type": "application/json"})
    payload = reply.json()
    return reply.status_code, payload.get("event_id") or str(payload.get("detail")), session


def outcome(url: str, session: str, event_id: str, timeout: float = 120) -> dict:
    """The ``process_completed`` message of ``event_id`` from the session's event stream."""
    params = {"session_hash": session}
    with HTTP.stream("GET", url + "gradio_api/queue/data", params=params, timeout=timeout) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                return message
    raise AssertionError(f"no result for {event_id}")


def call(url: str, index: int, data: list) -> dict:
    status, event_id, session = join(url, index, data)
    assert status == 200, event_id
    return outcome(url, session, event_id)


def error_text(message: dict) -> str:
    return str((message.get("output") or {}).get("error"))


def model_state(wb: Workbench) -> tuple:
    linear_types = sorted({type(m).__name__ for m in wb.pipe.transformer.modules()})
    return id(wb.pipe), wb.pipe.loras.describe(), linear_types, wb.pipe.dtype


# ------------------------------------------------------------------------------------------------------ policy


def test_public_mode_is_on_whenever_the_app_is_reachable():
    assert not resolve_policy(host="127.0.0.1", env={}).public
    assert resolve_policy(host="127.0.0.1", env={}).free_paths
    for options, env in (({"host": "0.0.0.0"}, {}), ({"share": True}, {}), ({}, {"SPACE_ID": "me/app"})):
        policy = resolve_policy(**options, env=env)
        assert policy.public and not policy.model_changes and not policy.free_paths
        assert policy.limits.max_work is not None
    assert resolve_policy(host="127.0.0.1", env={"WORKBENCH_PUBLIC": "1"}).public
    private = resolve_policy(host="0.0.0.0", public=False, env={})
    assert not private.public and private.model_changes and not private.free_paths  # names, never paths
    opted_in = resolve_policy(host="0.0.0.0", allow_model_changes=True, env={})
    assert opted_in.public and opted_in.model_changes and not opted_in.free_paths
    assert resolve_policy(host="0.0.0.0", env={"WORKBENCH_QUEUE_MAX": "5"}).limits.queue_max_size == 5
    assert parse_auth("ann:pw,bob:x") == [("ann", "pw"), ("bob", "x")]
    with pytest.raises(ValueError, match="user:password"):
        parse_auth("nopassword")


def test_app_command_line_launches_with_the_policy(monkeypatch, tmp_path):
    import app

    seen: dict = {}

    def fake_build(model, output_dir, policy):
        seen["policy"] = policy
        wb = SimpleNamespace(policy=policy, output_dir=tmp_path)
        return SimpleNamespace(workbench=wb, launch=lambda **options: seen.update(options))

    monkeypatch.setattr(app, "build_app", fake_build)
    for variable in (
        "SPACE_ID",
        "GRADIO_SERVER_NAME",
        "WORKBENCH_PUBLIC",
        "WORKBENCH_ALLOW_MODEL_CHANGES",
        "WORKBENCH_AUTH",
    ):
        monkeypatch.delenv(variable, raising=False)
    app.main(["--host", "0.0.0.0", "--auth", "ann:pw", "--outputs", str(tmp_path)])
    assert seen["policy"].public and not seen["policy"].model_changes
    assert seen["auth"] == [("ann", "pw")] and seen["max_file_size"] == 10 * MB
    app.main(["--host", "0.0.0.0", "--allow-model-changes", "--lora-dir", str(tmp_path)])
    assert seen["policy"].public and seen["policy"].model_changes and not seen["policy"].free_paths
    app.main([])
    assert not seen["policy"].public and seen["policy"].free_paths and seen["auth"] is None


def test_public_app_has_no_model_events_and_says_the_model_is_shared(public):
    demo, _ = public
    names = {getattr(fn.fn, "__name__", "") for fn in demo.fns.values()}
    assert not names & {"load", "attach", "remove"}
    texts = [str(c["props"].get("value")) for c in demo.config["components"]]
    assert any("shared by every visitor" in text for text in texts)
    assert demo.delete_cache == (LIMITS.cache_check_every_s, int(LIMITS.output_max_age_s))
    assert demo._queue.max_size == LIMITS.queue_max_size


def test_no_fn_index_changes_the_model_and_no_error_leaks(public):
    """Every event with junk inputs: queued ones through the queue (and not directly), the others directly."""
    demo, url = public
    wb = demo.workbench
    before = model_state(wb)
    for index, fn in demo.fns.items():
        if fn.fn is None:
            continue
        junk = [
            "/etc/shadow" if isinstance(c, (gr.Textbox, gr.Dropdown)) else 1 if isinstance(c, gr.Slider) else None
            for c in fn.inputs
        ]
        direct = httpx.post(
            url + "gradio_api/run/predict", json={"data": junk, "fn_index": index, "session_hash": uuid.uuid4().hex}
        )
        if fn.queue:
            assert direct.status_code == 404 and "join the queue" in direct.text
            text = error_text(call(url, index, junk))
        else:
            text = direct.text
        assert not any(leak in text for leak in LEAKS), (index, text)
    assert model_state(wb) == before


def test_the_workbench_itself_refuses_model_changes_in_public_mode(public):
    wb = public[0].workbench
    for change in (lambda: wb.load(None), lambda: wb.load("/etc", "int8"), lambda: wb.attach_lora("/tmp/x", 1.0)):
        with pytest.raises(gr.Error, match=MODEL_CHANGES_OFF):
            with page_errors("Model"):
                change()
    with pytest.raises(NotAllowedError):
        wb.remove_loras()


def test_allowed_folders_answer_without_revealing_files(public, tmp_path):
    evil = tmp_path / "models" / "evil.safetensors"
    evil.parent.mkdir()
    header = json.dumps({"w": {"dtype": "SECRET_CONTENT_XYZ", "shape": [1], "data_offsets": [0, 4]}}).encode()
    evil.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    policy = public_policy(model_changes=True, catalog=Catalog.scan([evil.parent], [tmp_path / "loras"]))
    wb = Workbench(public[0].workbench.pipe, tmp_path / "out", policy=policy)
    messages = []
    for name in ("/etc/shadow", "/etc", "/no/such/thing", str(evil)):
        with pytest.raises(gr.Error) as err:
            with page_errors("Loading the model"):
                wb.load(name)
        messages.append(err.value.message.partition(" is ")[2])
    assert len(set(messages)) == 1 and messages[0].startswith("not an allowed model")
    with pytest.raises(gr.Error) as err:
        with page_errors("Loading the model"):
            wb.load("evil.safetensors")
    assert "could not be loaded" in err.value.message and not any(leak in err.value.message for leak in LEAKS)
    with pytest.raises(gr.Error, match="not an allowed LoRA"):
        with page_errors("LoRA"):
            wb.attach_lora("/tmp/gradio/0123/lora.safetensors", 1.0)
    assert wb.pipe.loras.describe() == []


def test_opted_in_model_tab_loads_names_from_the_allowed_folders_only(tmp_path):
    policy = public_policy(model_changes=True, catalog=Catalog.scan([tmp_path], [tmp_path]))
    demo = build_app(app_model(), output_dir=tmp_path / "out", policy=policy)
    load = next(fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "load")
    choices = next(c for c in demo.config["components"] if c["props"].get("elem_id") == "model-path")["props"]
    assert [choice[0] for choice in choices["choices"]] == ["embedded (ShapesWorld)"]
    refused = asyncio.run(load("/etc/shadow", "None", "None"))
    assert list(refused.values()) == ["**Not loaded:** '/etc/shadow' is not an allowed model; choose one from the list"]
    if (EMBEDDED_MODEL / "model_index.json").is_file():
        before = demo.workbench.pipe
        loaded = asyncio.run(load("embedded (ShapesWorld)", "None", "None"))
        assert demo.workbench.pipe is not before and any("Loaded" in str(v) for v in loaded.values())


# ------------------------------------------------------------------------------------------------------ limits


def test_cancelling_an_api_job_stops_it_within_a_step_and_the_session_limit_holds(public):
    demo, url = public
    wb = demo.workbench
    index = fn_index(demo, "text2img")
    long_job = api_data(demo, "text2img", prompt=PROMPT, steps=150, width=128, height=128, seed=1)
    calls: list[float] = []
    handle = wb.pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(time.monotonic()))
    try:
        status, event_id, session = join(url, index, long_job)
        assert status == 200
        deadline = time.monotonic() + 60
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = join(url, index, api_data(demo, "text2img", prompt=PROMPT, steps=1), session)
        assert second[0] == 503 and "Too many jobs" in second[1]
        others = [join(url, index, api_data(demo, "text2img", prompt=PROMPT, steps=1)) for _ in range(3)]
        assert [o[0] for o in others] == [200, 200, 503] and "Queue is full" in others[2][1]
        for _, other_id, other_session in others[:2]:
            httpx.post(
                url + "gradio_api/cancel", json={"session_hash": other_session, "fn_index": index, "event_id": other_id}
            )
        step = (calls[-1] - calls[0]) / (len(calls) - 1)
        cancelled_at = time.monotonic()
        cancel = {"session_hash": session, "fn_index": index, "event_id": event_id}
        assert httpx.post(url + "gradio_api/cancel", json=cancel).status_code == 200
        while wb.lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        after = [t for t in calls if t > cancelled_at]
        assert not wb.lock.locked() and len(after) <= 2, (len(after), step)
        assert len(calls) < 100
    finally:
        handle.remove()


def test_upload_size_pixels_and_broken_images_are_refused_with_a_message(public, client, tmp_path):
    demo, url = public
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 * MB))
    reply = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
    assert reply.status_code == 413 and "File size exceeded" in reply.text
    bomb = tmp_path / "bomb.png"
    Image.new("L", (16, 16)).save(bomb)
    raw = bytearray(bomb.read_bytes())
    raw[16:24] = struct.pack(">II", 12000, 12000)  # IHDR width and height: 144 megapixels
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    bomb.write_bytes(bytes(raw))
    text = tmp_path / "text.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    expected = {bomb: "more pixels than this app accepts", text: "not an image", truncated: "damaged or truncated"}
    for path, message in expected.items():
        with pytest.raises(AppError, match=message):
            client.predict(prompt=PROMPT, image=handle_file(str(path)), steps=1, api_name="/img2img")
        with pytest.raises(AppError) as err:  # a truncated PNG may still show its header's text chunks
            client.predict(image=handle_file(str(path)), api_name="/png_info")
        assert GENERIC not in str(err.value) and "Traceback" not in str(err.value)


def test_work_limit_refuses_the_largest_requests(client):
    with pytest.raises(AppError, match="too large for this app"):
        client.predict(prompt="a\nb", num_frames=96, steps=150, width=256, height=256, api_name="/frames")
    with pytest.raises(AppError, match="too large for this app"):
        client.predict(prompt=PROMPT, steps=150, width=256, height=256, batch_count=4, api_name="/text2img")
    with pytest.raises(ValueError, match="20 M"):
        check_work(LIMITS, steps=100, width=512, height=512)


def test_outputs_are_pruned_by_age_and_size(tmp_path):
    now = time.time()
    for i, age in enumerate((7200, 10, 5, 1)):
        path = tmp_path / "text2img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - age, now - age))
    assert prune_outputs(tmp_path, 3600, 2500, now=now) == 2
    assert sorted(p.name for p in (tmp_path / "text2img").iterdir()) == ["2.png", "3.png"]


# ------------------------------------------------------------------------------------------------ number fields

BAD_NUMBERS = (float("nan"), float("inf"), float("-inf"), "abc")


def test_nan_inf_and_text_are_refused_in_every_number_field(public, capfd):
    """Every number field of every event (API endpoints, the tabs' runs: experts, router temperature, flow),
    each through the first event that takes it; no traceback in the server's output."""
    demo, url = public
    seen: set[int] = set()
    for index, fn in demo.fns.items():
        if fn.fn is None or not fn.queue:
            continue
        for position, component in enumerate(fn.inputs):
            if not isinstance(component, (gr.Number, gr.Slider)) or component._id in seen:
                continue
            seen.add(component._id)
            for bad in BAD_NUMBERS:
                data = [c.value for c in fn.inputs]
                data[position] = bad
                message = call(url, index, data)
                text = error_text(message)
                assert not message["success"] and str(component.label) in text and "number" in text, (index, text)
    labels = {str(demo.blocks[i].label) for i in seen}
    assert {"Steps", "Shift", "Router temperature", "Frames", "Strength (1 = ignore the image)"} <= labels, labels
    assert "Traceback" not in capfd.readouterr().err


def test_seeds_take_the_full_range_and_refuse_text(client):
    _, seed, _ = client.predict(prompt=PROMPT, steps=1, width=64, height=64, seed=2**32 - 1, api_name="/text2img")
    assert seed == 2**32 - 1
    with pytest.raises(AppError, match="greater than maximum"):
        client.predict(prompt=PROMPT, steps=1, seed=2**32, api_name="/text2img")
    with pytest.raises(AppError, match="seed: must be whole numbers"):
        client.predict(prompt="a", seed="one, two", num_frames=2, steps=1, api_name="/frames")


def test_nan_shift_is_an_error_not_a_black_image(client):
    with pytest.raises(AppError, match="Shift: must be a finite number"):
        client.predict(prompt=PROMPT, steps=1, shift="nan", api_name="/text2img")


# ------------------------------------------------------------------------------------------------------ fuzzing

numbers = st.one_of(
    st.integers(-5, 300),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["abc", "", "1e400", "-0", "nan"]),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.one_of(st.integers(-1, 3), numbers),
    size=st.one_of(st.sampled_from([32, 48, 64]), numbers),
    guidance=numbers,
    shift=numbers,
    seed=st.one_of(st.integers(-2, 2**32), numbers),
    sampler=st.sampled_from(["euler", "heun", "dpmpp_2m", "bogus"]),
)
def test_fuzzed_api_settings_give_an_image_or_a_clear_message(public, steps, size, guidance, shift, seed, sampler):
    demo, url = public
    values = dict(prompt=PROMPT, steps=steps, width=size, height=size, guidance_scale=guidance, shift=shift, seed=seed)
    values["sampler"] = sampler
    message = call(url, fn_index(demo, "text2img"), api_data(demo, "text2img", **values))
    if message["success"]:
        assert read_parameters(message["output"]["data"][0][0]["image"]["path"])
    else:
        text = error_text(message)
        assert text not in ("None", "") and GENERIC not in text and "Traceback" not in text, text


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_frames=st.one_of(st.sampled_from([2, 3]), numbers),
    fps=numbers,
    seed=st.one_of(st.sampled_from(["0", "1, 5", "4294967295", "x", "nan", "1e99", "-7"]), numbers),
    strength=numbers,
    mode=st.sampled_from(["auto", "walk", "loopback", "travel", "bogus"]),
)
def test_fuzzed_frames_settings_give_frames_or_a_clear_message(public, num_frames, fps, seed, strength, mode):
    demo, url = public
    values = dict(prompt="a\nb", num_frames=num_frames, fps=fps, seed=seed, loopback_strength=strength, mode=mode)
    values.update(steps=1, width=32, height=32)
    message = call(url, fn_index(demo, "frames"), api_data(demo, "frames", **values))
    if message["success"]:
        assert len(message["output"]["data"][1]) == int(num_frames)
    else:
        text = error_text(message)
        assert text not in ("None", "") and GENERIC not in text and "Traceback" not in text, text


def test_the_app_serves_the_next_request(client):
    result = client.predict(prompt=PROMPT, steps=2, width=64, height=64, seed=3, api_name="/text2img")
    assert read_parameters(first_image(result))["seed"] == 3
