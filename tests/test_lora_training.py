"""LoRA training: the loss falls and the image moves toward the data, the file loads in diffusers with the same
image as ours, resume continues the step count, and bad input names what is wrong."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from workbench import load_pipeline
from workbench.lora_training import LoRATrainConfig, read_image_folder, train_lora

diffusers = pytest.importorskip("diffusers")

CAPTION = "a green picture"
GREEN = (40, 200, 60)
KWARGS = dict(height=32, width=32, num_inference_steps=4, guidance_scale=3.0, max_sequence_length=32)


def _data(folder, count: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.clip(np.array(GREEN) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(CAPTION)
    return folder


def _distance_to_data(pipe, images) -> float:
    """Mean |per-channel mean of the generated latents − that of the data's latents| (the tiny random VAE does not
    reproduce colours, so the test compares in its latent space)."""
    from workbench.pipeline import image_to_tensor

    with torch.no_grad():
        target = pipe.vae.scale_latents(pipe.encode_image(image_to_tensor(images[0], 32, 32)).mode()).float()
    latents = pipe(CAPTION, seed=3, **KWARGS).latents
    return float((latents.mean((2, 3)) - target.mean((2, 3))).abs().mean())


def test_training_moves_the_model_toward_the_data_and_loads_in_diffusers(tiny_sd3_folder, tmp_path):
    folder, _ = tiny_sd3_folder
    pipe = load_pipeline(folder)
    images, captions = read_image_folder(_data(tmp_path / "data"))
    before = _distance_to_data(pipe, images)
    out = tmp_path / "green.safetensors"
    config = LoRATrainConfig(rank=4, alpha=8, resolution=32, steps=80, batch_size=4, lr=1e-2, save_every=0)
    losses = train_lora(pipe, images, captions, config, out, progress=False)
    assert len(losses) == 80
    assert np.mean(losses[-20:]) < 0.9 * np.mean(losses[:20])
    assert _distance_to_data(pipe, images) < 0.8 * before  # measured: 0.70
    trained = pipe(CAPTION, seed=3, **KWARGS).images[0]

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in handle.keys()
    assert metadata["workbench_step"] == "80"
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 8

    ours = load_pipeline(folder)
    ours.loras.load(out)
    got = np.asarray(ours(CAPTION, seed=3, **KWARGS).images[0], dtype=np.int16)
    assert np.array_equal(got, np.asarray(trained, dtype=np.int16))
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(out))
    generator = torch.Generator("cpu").manual_seed(3)
    expected = np.asarray(reference(CAPTION, generator=generator, **KWARGS).images[0], dtype=np.int16)
    assert np.abs(got - expected).max() <= 2


def test_resume_continues_from_the_saved_step(tiny_sd3_folder, tmp_path):
    folder, _ = tiny_sd3_folder
    images, captions = read_image_folder(_data(tmp_path / "data", 2))
    out = tmp_path / "lora.safetensors"
    first = LoRATrainConfig(rank=2, resolution=32, steps=6, batch_size=2, lr=1e-2, save_every=3)
    assert len(train_lora(load_pipeline(folder), images, captions, first, out, progress=False)) == 6
    longer = LoRATrainConfig(rank=2, resolution=32, steps=10, batch_size=2, lr=1e-2, save_every=3)
    resumed = load_pipeline(folder)
    assert len(train_lora(resumed, images, captions, longer, out, resume=True, progress=False)) == 4
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["workbench_step"] == "10"
    other_rank = LoRATrainConfig(rank=3, resolution=32, steps=12, batch_size=2)
    with pytest.raises(ValueError, match="cannot resume"):
        train_lora(load_pipeline(folder), images, captions, other_rank, out, resume=True, progress=False)


def test_bad_training_input_names_the_problem(tiny_sd3_folder, tmp_path, capsys):
    from workbench.__main__ import main

    folder, _ = tiny_sd3_folder
    with pytest.raises(ValueError, match="holds no images"):
        read_image_folder(tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "lonely.png")
    with pytest.raises(ValueError, match="lonely.png has no caption"):
        read_image_folder(tmp_path)
    assert read_image_folder(tmp_path, caption="x")[1] == ["x"]
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, 1024\\], got 0"):
        LoRATrainConfig(rank=0).validate()
    pipe = load_pipeline(folder)
    with pytest.raises(ValueError, match="match no linear layer"):
        train_lora(
            pipe,
            [Image.new("RGB", (32, 32))],
            ["x"],
            LoRATrainConfig(targets=("nothing",), resolution=32),
            tmp_path / "a",
        )
    data = _data(tmp_path / "data", 1)
    args = ["train-lora", "--model", str(folder), "--data", str(data), "--steps", "2", "--resolution", "32"]
    assert main(args + ["--out", str(tmp_path / "x.pt")]) == 2
    assert "--out must end with .safetensors" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "x.safetensors"), "--resolution", "33"]) == 2
    assert "height must be a positive multiple of 16, got 33" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "ok.safetensors"), "--batch-size", "2"]) == 0
    assert (tmp_path / "ok.safetensors").is_file()
