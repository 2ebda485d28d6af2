"""The command line: generate (single and batch), convert, and errors as messages with exit code 2."""

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from workbench.__main__ import main
from workbench.metadata import read_parameters


def test_generate_single_prompt(tiny_sd3_folder, tmp_path):
    folder, _ = tiny_sd3_folder
    out = tmp_path / "one.png"
    args = ["generate", "--model", str(folder), "--prompt", "a red circle", "--steps", "2", "--seed", "9"]
    assert main(args + ["--height", "32", "--width", "48", "--max-sequence-length", "32", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (48, 32)
    params = read_parameters(out)
    assert params["prompt"] == "a red circle" and params["seed"] == 9 and params["steps"] == 2
    guided = tmp_path / "guided.png"
    extra = ["--guidance", "3", "--guidance-interval", "0.3", "1", "--skip-layers", "0", "--slg-stop", "0.6"]
    assert main(args + ["--height", "32", "--width", "32", "--out", str(guided)] + extra) == 0
    params = read_parameters(guided)
    assert params["guidance_interval"] == [0.3, 1.0] and params["skip_guidance_layers"] == [0]
    assert params["skip_layer_guidance_stop"] == 0.6


def test_generate_prompts_file_uses_seed_plus_line(tiny_sd3_folder, tmp_path):
    folder, _ = tiny_sd3_folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \na green star\n")
    out_dir = tmp_path / "batch"
    args = ["generate", "--model", str(folder), "--prompts-file", str(prompts), "--out-dir", str(out_dir)]
    assert main(args + ["--steps", "1", "--seed", "100", "--height", "32", "--width", "32"]) == 0
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["0000.png", "0001.png", "0002.png"]
    params = [read_parameters(out_dir / f) for f in files]
    assert [p["seed"] for p in params] == [100, 101, 102]
    assert [p["prompt"] for p in params] == ["a red circle", "a blue square", "a green star"]


def test_generate_inpainting_repaints_the_masked_part(tiny_sd3_folder, tmp_path):
    from workbench import load_pipeline

    folder, _ = tiny_sd3_folder
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (0, 0, 24, 16))
    mask.save(tmp_path / "mask.png")
    args = ["generate", "--model", str(folder), "--prompt", "a red circle", "--steps", "3", "--seed", "4"]
    args += ["--init-image", str(tmp_path / "in.png"), "--strength", "0.8"]
    assert main(args + ["--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.png")]) == 0
    params = read_parameters(tmp_path / "out.png")
    assert params["mask_size"] == "48x32" and params["mask_coverage"] == 0.25 and params["strength"] == 0.8
    direct = load_pipeline(folder)(
        "a red circle",
        image=Image.open(tmp_path / "in.png"),
        mask_image=mask,
        strength=0.8,
        num_inference_steps=3,
        seed=4,
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(direct.images[0]))
    assert main(args + ["--out", str(tmp_path / "plain.png")]) == 0
    plain, out = (np.asarray(Image.open(tmp_path / name), dtype=np.int16) for name in ("plain.png", "out.png"))
    assert np.abs(plain - out).max() > 20
    assert (
        main(args + ["--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--out", str(tmp_path / "kept.png")])
        == 0
    )
    kept, start = (np.asarray(Image.open(tmp_path / n).convert("RGB"), dtype=np.int16) for n in ("kept.png", "in.png"))
    assert np.array_equal(kept[16:], start[16:]) and np.array_equal(kept[:16, :24], out[:16, :24])
    assert read_parameters(tmp_path / "kept.png")["mask_blur"] == 0
    assert main(args + ["--mask-blur", "4", "--out", str(tmp_path / "x.png")]) == 2


def test_mask_without_init_image_or_of_another_size_is_a_message(tiny_sd3_folder, tmp_path, capsys):
    folder, _ = tiny_sd3_folder
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    Image.new("RGB", (48, 32)).save(tmp_path / "in.png")
    args = ["generate", "--model", str(folder), "--prompt", "x", "--steps", "1", "--mask", str(tmp_path / "mask.png")]
    assert main(args + ["--out", str(tmp_path / "x.png")]) == 2
    assert "--mask needs --init-image" in capsys.readouterr().err
    assert main(args + ["--init-image", str(tmp_path / "in.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "mask_image is 32x32, image is 48x32" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bad_input_is_a_message_not_a_traceback(tiny_sd3_folder, tmp_path, capsys):
    folder, _ = tiny_sd3_folder
    code = main(
        ["generate", "--model", str(folder), "--prompt", "x", "--height", "33", "--out", str(tmp_path / "x.png")]
    )
    assert code == 2
    assert "height must be a positive multiple of 16, got 33" in capsys.readouterr().err
    code = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    code = main(["generate", "--model", str(folder), "--prompt", "x", "--skip-layers", "7;8"])
    assert code == 2
    assert "--skip-layers must be comma-separated block indices such as 7,8,9, got '7;8'" in capsys.readouterr().err


def test_convert_pickle_to_safetensors(tmp_path):
    checkpoint = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.ones(2, 2)}}, checkpoint)
    assert main(["convert", str(checkpoint)]) == 0
    tensors = load_file(str(tmp_path / "old.safetensors"))
    assert torch.equal(tensors["layer.weight"], torch.ones(2, 2))
