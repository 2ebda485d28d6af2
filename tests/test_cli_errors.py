"""The command line's user errors: each is one ``error:`` line on stderr with exit code 2, never a traceback; `frames`
writes only where ``--out`` / ``--out-dir`` say; fuzzed sampling flags give a PNG or such a line. Runs on the embedded
model (or a micro one) at 64² and 1–3 steps."""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_app import app_model

import workbench.cli.generate as generate_command
from workbench.__main__ import main
from workbench.metadata import read_parameters

SMALL = ["--steps", "1", "--width", "64", "--height", "64"]


class Opaque:
    """Pickled by reference: the safe loader refuses it."""


def huge_png(path: Path, width: int, height: int) -> Path:
    """A small PNG file whose header claims ``width`` × ``height`` pixels."""
    Image.new("L", (8, 8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture(scope="module")
def pipe():
    from workbench import load_pipeline

    model = app_model()
    return load_pipeline() if model is None else model


@pytest.fixture
def cached_model(pipe, monkeypatch):
    """`generate` and `frames` on the already loaded model (the flags are what is tested, not loading)."""
    import workbench.cli.frames as frames_command

    monkeypatch.setattr(generate_command, "load_from_args", lambda args: pipe)
    monkeypatch.setattr(frames_command, "load_from_args", lambda args: pipe)
    return pipe


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def user_error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp_path / "text.png"
    text.write_text("not an image")
    whole = tmp_path / "whole.png"
    Image.new("RGB", (64, 64), "red").save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:70])
    bomb = huge_png(tmp_path / "bomb.png", 20000, 20000)  # 400 megapixels in 70 bytes
    opaque = tmp_path / "opaque.ckpt"
    opaque.write_bytes(pickle.dumps({"model": Opaque()}))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a pickle at all")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    gen = ["generate", "--prompt", "a red circle", *SMALL]
    return {
        "out is a folder": ([*gen, "--out", str(folder)], "is a folder"),
        "init image is text": ([*gen, "--init-image", str(text), "--out", str(tmp_path / "o.png")], "not an image"),
        "init image truncated": ([*gen, "--init-image", str(truncated)], "damaged or truncated"),
        "init image of 400 megapixels": ([*gen, "--init-image", str(bomb)], "more pixels"),
        "init image missing": ([*gen, "--init-image", str(tmp_path / "nope.png")], "no such file"),
        "prompts file missing": (["generate", "--prompts-file", str(tmp_path / "none.txt")], "No such file"),
        "shift nan": ([*gen, "--shift", "nan", "--out", str(tmp_path / "n.png")], "shift"),
        "guidance inf": ([*gen, "--guidance", "inf", "--out", str(tmp_path / "i.png")], "guidance"),
        "convert an opaque pickle": (["convert", str(opaque)], "not a plain tensor checkpoint"),
        "convert garbage": (["convert", str(garbage)], "not a plain tensor checkpoint"),
        "frames out is a folder": (["frames", "--prompt", "a", "--mode", "walk", "--out", str(folder)], "must end in"),
        "frames out-dir is a file": (["frames", "--prompt", "a", "--mode", "walk", "--out-dir", str(whole)], "a file"),
    }


def test_every_user_error_is_one_line_and_exit_code_2(cached_model, tmp_path, capsys):
    for name, (argv, expected) in user_error_cases(tmp_path).items():
        assert main(argv) == 2, name
        line = one_error_line(capsys)
        assert expected in line, (name, line)
    assert not list(Path(tmp_path).glob("*.safetensors"))


def test_flag_type_errors_are_argparse_errors_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "a", "--seed", "abc"])
    assert exit_info.value.code == 2 and "invalid int value: 'abc'" in capsys.readouterr().err


def test_frames_writes_only_where_out_says(cached_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["frames", "--prompt", "a red circle", "--mode", "walk", "--frames", "2", *SMALL]
    assert main([*argv, "--out", "clips/walk.gif"]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["clips/walk.gif", "clips/walk_frames/0000.png", "clips/walk_frames/0001.png"]
    assert main([*argv, "--out-dir", "pngs", "--out", "v/walk.gif"]) == 0
    assert (tmp_path / "pngs" / "0001.png").is_file() and (tmp_path / "v" / "walk.gif").is_file()
    assert not (tmp_path / "frames").exists()


numbers = st.one_of(
    st.integers(-3, 2).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["abc", "", "1e400", "-0", "nan", "0x10"]),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.one_of(st.sampled_from(["1", "2"]), numbers),
    size=st.one_of(st.sampled_from(["32", "64", "48"]), numbers),
    guidance=numbers,
    shift=numbers,
    seed=st.one_of(st.integers(-2, 2**32).map(str), numbers),
    sampler=st.sampled_from(["euler", "heun", "dpmpp_2m", "bogus"]),
)
def test_fuzzed_generate_flags_give_a_png_or_one_error_line(
    cached_model, tmp_path, capsys, steps, size, guidance, shift, seed, sampler
):
    capsys.readouterr()  # the fixture lives across examples
    out = tmp_path / "fuzz.png"
    out.unlink(missing_ok=True)
    argv = ["generate", "--prompt", "a red circle", "--out", str(out), "--steps", steps, "--width", size]
    argv += ["--height", size, "--guidance", guidance, "--shift", shift, f"--seed={seed}", "--sampler", sampler]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse: a flag of the wrong type or choice
        assert exit_info.code == 2
        assert "error:" in capsys.readouterr().err
        return
    if code == 0:
        assert read_parameters(out)["prompt"] == "a red circle"
    else:
        assert code == 2
        one_error_line(capsys)


def test_shapesworld_commands_report_user_errors_in_one_line(capsys):
    from workbench.shapesworld.__main__ import main as shapesworld_main

    cases = {
        ("sensitivity", "--n", "2", "--layout-control", "50"): "layout_control must be between 0 and 10, got 50.0",
        ("eval", "--n", "2", "--size", "100"): "height must be a positive multiple of 16, got 100",
    }
    for argv, message in cases.items():
        assert shapesworld_main(list(argv)) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: {message}"] and "Traceback" not in err, err
