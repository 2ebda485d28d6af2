"""LoRA adapters: equal to diffusers' ``load_lora_weights`` (diffusers/PEFT format), kohya's original-layout format
checked against diffusers' own single-file converter, stacking, strengths, removal, quantized bases, bad files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workbench import ModelFormatError, load_pipeline
from workbench.lora import LoRAFormatError
from workbench.metadata import parse_parameters

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle at the top left on a white background"
KWARGS = dict(height=32, width=32, num_inference_steps=4, guidance_scale=3.0, max_sequence_length=32)
RANK = 4
TRANSFORMER_TARGETS = ("attn.to_q", "attn.to_v", "attn.add_k_proj", "attn.to_out.0", "ff.net.0.proj", "norm1.linear")


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _random_lora(shapes: dict[str, tuple[int, int]], seed: int, std: float = 0.3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, (out_features, in_features) in shapes.items():
        tensors[f"{stem}.lora_A.weight"] = torch.randn(RANK, in_features, generator=generator) * std
        tensors[f"{stem}.lora_B.weight"] = torch.randn(out_features, RANK, generator=generator) * std
    return tensors


def _diffusers_lora(ours) -> dict[str, torch.Tensor]:
    """Random diffusers-format LoRA on the tiny model: attention, feed-forward and adaLN layers of both blocks and
    CLIP-L's first attention layer."""
    modules = dict(ours.transformer.named_modules())
    shapes = {}
    for index in range(ours.transformer.config.num_layers):
        for name in TRANSFORMER_TARGETS:
            module = modules.get(f"transformer_blocks.{index}.{name}")
            if module is not None:
                shapes[f"transformer.transformer_blocks.{index}.{name}"] = (module.out_features, module.in_features)
    clip = dict(ours.text_encoders.clip_l.named_modules())["text_model.encoder.layers.0.self_attn.q_proj"]
    shapes["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] = (clip.out_features, clip.in_features)
    return _random_lora(shapes, seed=11)


def _save(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def ours(tiny_sd3_folder):
    folder, _ = tiny_sd3_folder
    return load_pipeline(folder)


def _image(pipe, seed: int = 5, **kwargs):
    return _pixels(pipe(PROMPT, seed=seed, **KWARGS, **kwargs).images[0])


def test_diffusers_format_lora_equals_diffusers(ours, tiny_sd3_folder, tmp_path):
    folder, _ = tiny_sd3_folder
    tensors = _diffusers_lora(ours)
    suffix = ".lora_A.weight"
    targets = [
        k[len("transformer.") : -len(suffix)] for k in tensors if k.startswith("transformer.") and k.endswith(suffix)
    ]
    config = {"transformer.r": RANK, "transformer.lora_alpha": 2 * RANK, "transformer.target_modules": targets}
    config.update({"text_encoder.r": RANK, "text_encoder.lora_alpha": RANK, "text_encoder.target_modules": ["q_proj"]})
    file = _save(tensors, tmp_path / "style.safetensors", {"format": "pt", "lora_adapter_metadata": json.dumps(config)})

    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(file), adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.7])
    expected = _pixels(reference(PROMPT, generator=torch.Generator("cpu").manual_seed(5), **KWARGS).images[0])

    base = _image(ours)
    name = ours.loras.load(file, strength=0.7)
    try:
        assert name == "style"
        got = _image(ours)
        described = ours.loras.describe()[0]
        assert described["layers"] == {"transformer": len(tensors) // 2 - 1, "clip_l": 1}
        assert described["rank"] == RANK
    finally:
        ours.loras.remove()
    assert np.abs(got - expected).max() <= 2
    assert np.abs(base - expected).max() > 10  # the LoRA changed the image
    assert np.array_equal(_image(ours), base)  # removing it restores the base model exactly


def test_kohya_original_layout_lora_matches_diffusers_converted_merge(ours, tiny_sd3_folder, tmp_path):
    """A kohya/ComfyUI LoRA written against the original MMDiT (fused q/k/v, (shift, scale) adaLN order) equals
    merging its deltas into the original-layout weights and converting them with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from test_loading import to_original_transformer

    folder, _ = tiny_sd3_folder
    depth = ours.transformer.config.num_layers
    original = to_original_transformer(ours.transformer.state_dict(), depth)
    modules = [
        "joint_blocks.0.x_block.attn.qkv",
        "joint_blocks.0.context_block.attn.qkv",
        "joint_blocks.1.context_block.adaLN_modulation.1",
        "final_layer.adaLN_modulation.1",
        "joint_blocks.1.x_block.mlp.fc1",
    ]
    generator = torch.Generator().manual_seed(3)
    kohya, merged = {}, dict(original)
    for module in modules:
        weight = original[f"{module}.weight"]
        down = torch.randn(RANK, weight.shape[1], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], RANK, generator=generator) * 0.3
        alpha = 2.0
        stem = "lora_unet_" + module.replace(".", "_")
        kohya.update(
            {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
        )
        merged[f"{module}.weight"] = weight + 0.8 * alpha / RANK * up @ down
    file = _save(kohya, tmp_path / "kohya_style.safetensors")

    transformer = diffusers.SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(merged))
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, transformer=transformer)
    reference.set_progress_bar_config(disable=True)
    expected = _pixels(reference(PROMPT, generator=torch.Generator("cpu").manual_seed(5), **KWARGS).images[0])

    ours.loras.load(file, strength=0.8)
    try:
        got = _image(ours)
        assert ours.loras.describe()[0]["layers"] == {"transformer": 3 + 3 + 1 + 1 + 1}
    finally:
        ours.loras.remove()
    assert np.abs(got - expected).max() <= 2
    assert np.abs(_image(ours) - expected).max() > 10


def test_stacking_strength_zero_and_metadata(ours, tmp_path):
    modules = dict(ours.transformer.named_modules())
    shapes = {
        f"transformer.transformer_blocks.0.{n}": (modules[f"transformer_blocks.0.{n}"].out_features, 32)
        for n in ("attn.to_q", "attn.to_k")
    }
    first = _save(_random_lora(shapes, seed=1), tmp_path / "first.safetensors")
    second = _save(_random_lora(shapes, seed=2), tmp_path / "second.safetensors")
    base = _image(ours)
    try:
        ours.loras.load(first, strength=1.0)
        only_first = _image(ours)
        ours.loras.load(second, strength=0.5)
        both = _image(ours)
        ours.loras.set_strength("second", 0.0)
        assert np.array_equal(_image(ours), only_first)  # strength 0 is the same as absent
        ours.loras.set_strength("second", 0.5)
        out = ours(PROMPT, seed=5, **KWARGS)
        assert np.array_equal(_pixels(out.images[0]), both)
        recorded = parse_parameters(out.images[0].info["parameters"])["loras"]
        assert recorded.startswith("first:1:") and "second:0.5:" in recorded
        assert ours.loras.active == {"first": 1.0, "second": 0.5}
    finally:
        ours.loras.remove()
    assert not np.array_equal(only_first, base) and not np.array_equal(both, only_first)
    assert np.array_equal(_image(ours), base)
    assert "loras" not in parse_parameters(ours(PROMPT, seed=5, **KWARGS).images[0].info["parameters"])


def test_lora_on_int8_and_packed_bfloat16_bases(tiny_sd3_folder, tmp_path):
    """Hooks reach quantized layers and oneDNN-packed ones (including a feed-forward linear fused with its GELU),
    and work under sequential offload."""
    folder, _ = tiny_sd3_folder
    full = load_pipeline(folder)
    tensors = _diffusers_lora(full)
    file = _save(tensors, tmp_path / "style.safetensors")
    full.loras.load(file)
    expected = _image(full)
    variants = (dict(quantization="int8", int8_backend="weight_only"), dict(dtype=torch.bfloat16))
    for options in (*variants, dict(offload="sequential")):
        other = load_pipeline(folder, **options)
        base = _image(other)
        other.loras.load(file)
        got = _image(other)
        assert np.abs(got - expected).mean() < np.abs(base - expected).mean() / 3, options


def test_bad_lora_files_name_file_and_key(ours, tmp_path):
    with pytest.raises(ModelFormatError, match="pickle"):
        ours.loras.load(tmp_path / "style.pt")
    truncated = tmp_path / "cut.safetensors"
    _save(_random_lora({"transformer.transformer_blocks.0.attn.to_q": (32, 32)}, 0), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(ModelFormatError, match="truncated"):
        ours.loras.load(truncated)
    wrong_width = _save(_random_lora({"transformer.transformer_blocks.0.attn.to_q": (1536, 1536)}, 0), tmp_path / "w")
    with pytest.raises(LoRAFormatError, match=r"to_q.*1536 → 1536.*32 → 32"):
        ours.loras.load(wrong_width)
    too_deep = _save(_random_lora({"transformer.transformer_blocks.23.attn.to_q": (32, 32)}, 0), tmp_path / "deep")
    with pytest.raises(LoRAFormatError, match="transformer_blocks.23.attn.to_q.*matches no layer"):
        ours.loras.load(too_deep)
    dora = _random_lora({"transformer.transformer_blocks.0.attn.to_q": (32, 32)}, 0)
    dora["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = torch.ones(32)
    with pytest.raises(LoRAFormatError, match="DoRA"):
        ours.loras.load(_save(dora, tmp_path / "dora.safetensors"))
    half = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 32)}
    with pytest.raises(LoRAFormatError, match="no up"):
        ours.loras.load(_save(half, tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="strength must be within"):
        ours.loras.load(
            _save(_random_lora({"transformer.transformer_blocks.0.attn.to_q": (32, 32)}, 0), tmp_path / "s"),
            strength=50,
        )
    with pytest.raises(KeyError, match="no LoRA named 'missing'"):
        ours.loras.set_strength("missing", 1.0)
    assert len(ours.loras) == 0  # failed loads attached nothing


def test_command_line_lora_option(ours, tiny_sd3_folder, tmp_path, capsys):
    from workbench.__main__ import main
    from workbench.lora import parse_lora_spec

    folder, _ = tiny_sd3_folder
    file = _save(_diffusers_lora(ours), tmp_path / "style.safetensors")
    common = ["generate", "--model", str(folder), "--prompt", PROMPT, "--seed", "5", "--steps", "4", "--guidance", "3"]
    common += ["--height", "32", "--width", "32", "--max-sequence-length", "32"]
    assert main(common + ["--lora", f"{file}:0.7", "--out", str(tmp_path / "lora.png")]) == 0
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(common + ["--lora", f"{file}:0.7", "--fuse-loras", "--out", str(tmp_path / "fused.png")]) == 0
    ours.loras.load(file, strength=0.7)
    try:
        expected = _image(ours)
    finally:
        ours.loras.remove()
    from PIL import Image

    assert np.array_equal(_pixels(Image.open(tmp_path / "lora.png").convert("RGB")), expected)
    assert not np.array_equal(_pixels(Image.open(tmp_path / "plain.png").convert("RGB")), expected)
    assert np.abs(_pixels(Image.open(tmp_path / "fused.png").convert("RGB")) - expected).max() <= 1
    assert main(common + ["--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: file not found" in capsys.readouterr().err
    assert parse_lora_spec("C:/loras/a.safetensors") == (Path("C:/loras/a.safetensors"), 1.0)
    assert parse_lora_spec("a.safetensors:-0.5") == (Path("a.safetensors"), -0.5)


def test_app_attaches_and_removes_loras(tiny_sd3_folder, tmp_path):
    from workbench.ui.builder import build_app
    from workbench.ui.session import Workbench

    folder, _ = tiny_sd3_folder
    demo = build_app(folder, tmp_path / "outputs")  # the page with the LoRA controls builds
    wb: Workbench = demo.workbench
    file = _save(_diffusers_lora(wb.pipe), tmp_path / "style.safetensors")
    base = _pixels(wb.generate(PROMPT, seed=5, **KWARGS).images[0])
    assert wb.attach_lora(str(file), 0.7) == "style"
    assert "LoRA **style** × 0.7: rank 4" in wb.describe()
    with_lora = _pixels(wb.generate(PROMPT, seed=5, **KWARGS).images[0])
    with pytest.raises(ValueError, match="LoRA file: give the path"):
        wb.attach_lora("  ", 1.0)
    with pytest.raises(ValueError, match="file not found"):
        wb.attach_lora(str(tmp_path / "nope.safetensors"), 1.0)
    assert np.array_equal(_pixels(wb.generate(PROMPT, seed=5, **KWARGS).images[0]), with_lora)  # still serving
    wb.remove_loras()
    assert "LoRA" not in wb.describe()
    assert np.array_equal(_pixels(wb.generate(PROMPT, seed=5, **KWARGS).images[0]), base)
    assert not np.array_equal(with_lora, base)


def test_sweep_lora_strength_axis(ours, tiny_sd3_folder, tmp_path):
    from PIL import Image

    from workbench import sweep

    folder, _ = tiny_sd3_folder
    file = _save(_diffusers_lora(ours), tmp_path / "style.safetensors")
    data = {"model": str(folder), "output_dir": str(tmp_path / "out"), "prompts": [PROMPT], "seeds": [5]}
    data.update(steps=4, guidance=3.0, height=32, width=32, max_sequence_length=32, grids=False)
    config = sweep.parse_config({**data, "lora": str(file), "lora_strength": [0, 0.7]})
    summary = sweep.run_sweep(config, progress=False)
    assert summary.generated == 2
    images = {row["settings"]["lora_strength"]: tmp_path / "out" / row["file"] for row in summary.rows}
    base = _image(ours)
    ours.loras.load(file, strength=0.7)
    try:
        expected = _image(ours)
    finally:
        ours.loras.remove()
    assert np.array_equal(_pixels(Image.open(images[0.0]).convert("RGB")), base)
    assert np.array_equal(_pixels(Image.open(images[0.7]).convert("RGB")), expected)
    plain_ids = {c.id for c in sweep.expand(sweep.parse_config(data))}
    assert plain_ids.isdisjoint(c.id for c in sweep.expand(config))
    with pytest.raises(ValueError, match="lora_strength 0.5 given without a lora file"):
        sweep.parse_config({**data, "lora_strength": 0.5})
    with pytest.raises(ValueError, match="lora must be the path of a .safetensors LoRA file, got 'style.pt'"):
        sweep.parse_config({**data, "lora": "style.pt"})


def test_fuse_bakes_the_loras_in_and_unfuse_restores(tiny_sd3_folder, tmp_path):
    folder, _ = tiny_sd3_folder
    file = _save(_diffusers_lora(load_pipeline(folder)), tmp_path / "style.safetensors")
    for options in ({}, {"dtype": torch.bfloat16}):
        pipe = load_pipeline(folder, **options)
        weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        base = _image(pipe)
        pipe.loras.load(file, strength=0.7)
        hooked = _image(pipe)
        effect = np.abs(hooked - base).mean()

        def close(a, b, exact=not options, effect=effect):  # float32: rounding; bfloat16: small against the LoRA
            return np.abs(a - b).max() <= 1 if exact else np.abs(a - b).mean() < 0.1 * effect

        pipe.loras.fuse()
        assert close(_image(pipe), hooked), options
        pipe.loras.set_strength("style", 0.0)  # stays fused, at the new strength
        assert pipe.loras.fused and close(_image(pipe), base), options
        pipe.loras.set_strength("style", 0.7)
        pipe.loras.unfuse()
        assert close(_image(pipe), hooked), options
        pipe.loras.remove()
        for key, value in pipe.transformer.state_dict().items():
            tolerance = 1e-6 if not options else 2e-2
            assert torch.allclose(value.float(), weights[key].float(), atol=tolerance), (options, key)
    quantized = load_pipeline(folder, quantization="int8", int8_backend="weight_only")
    quantized.loras.load(file)
    with pytest.raises(ValueError, match="cannot fuse LoRAs into quantized layers"):
        quantized.loras.fuse()
    assert not quantized.loras.fused


def test_shapesworld_eval_takes_a_lora(tmp_path, embedded_pipeline):
    from workbench.shapesworld.__main__ import main

    modules = dict(embedded_pipeline.transformer.named_modules())
    shapes = {}
    for name in ("attn.to_q", "attn.to_k", "attn.add_v_proj"):
        module = modules[f"transformer_blocks.0.{name}"]
        shapes[f"transformer.transformer_blocks.0.{name}"] = (module.out_features, module.in_features)
    file = _save(_random_lora(shapes, seed=4, std=1.0), tmp_path / "noise.safetensors")
    args = ["eval", "--n", "2", "--size", "96", "--steps", "3", "--records"]
    assert main(args + [str(tmp_path / "plain.jsonl")]) == 0
    assert main(args + [str(tmp_path / "lora.jsonl"), "--lora", f"{file}:1.5"]) == 0
    plain, lora = ((tmp_path / f"{n}.jsonl").read_text() for n in ("plain", "lora"))
    assert plain != lora
