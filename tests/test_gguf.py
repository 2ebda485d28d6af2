"""GGUF transformers: files written here with the ``gguf`` package (random tiny SD3.5 weights, original MMDiT names as
ComfyUI-GGUF and stable-diffusion.cpp write them) load with their linears still quantized and compute what
diffusers' GGUF loading of the same file computes; every refusal names what it found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
diffusers = pytest.importorskip("diffusers")

from gguf import quants  # noqa: E402
from test_loading import to_original_transformer  # noqa: E402

from workbench import ModelFormatError, load_pipeline  # noqa: E402
from workbench.formats.gguf import GGUFLinear, load_gguf_transformer, quantized_type_counts  # noqa: E402
from workbench.formats.original import convert_original_transformer  # noqa: E402
from workbench.loading import build_transformer  # noqa: E402
from workbench.memory import tensor_bytes  # noqa: E402

Q = gguf.GGMLQuantizationType
PROMPT = "a red circle at the top left on a white background"
K_SCALES = {
    "Q2_K": ((80, 1.0), (82, 1.5)),
    "Q3_K": ((108, 1.0),),
    "Q4_K": ((0, 1.0), (2, 7.5)),
    "Q5_K": ((0, 1.0), (2, 15.5)),
    "Q6_K": ((208, 1.0),),
}
"""Byte offsets of the float16 super-block scales (d, and dmin where the type has one) in each K-quant block
(ggml's block layouts), and dmin / d: the mean quant, so that the random values centre near zero."""


# ----------------------------------------------------------------------------------------------------- writing


def _k_quant_bytes(values: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Random K-quant blocks for a ``(rows, cols)`` tensor (the gguf package cannot quantize K-quants): random
    quants and sub-block scales, super-block scales set so the values' spread is about that of ``values``."""
    kind = Q[name]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = values.shape
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)

    def set_scales(value: float) -> None:
        for offset, ratio in K_SCALES[name]:
            raw[..., offset : offset + 2] = np.frombuffer(np.float16(value * ratio).tobytes(), np.uint8)

    set_scales(1e-3)
    spread = quants.dequantize(raw.reshape(rows, -1), kind).std()
    set_scales(1e-3 * float(values.std()) / float(spread))
    return raw.reshape(rows, -1)


def write_gguf(path: Path, state: dict, kind: str, arch: str | None = "sd3", prefix: str = "") -> Path:
    """Write original-layout tensors as ComfyUI-GGUF does: 1-D in F32, 2-D in ``kind`` when their rows split into
    whole blocks (else F16), pos_embed and the patch convolution in F16. ``arch=None`` writes no
    ``general.architecture`` (stable-diffusion.cpp's files), ``prefix`` goes before every key."""
    writer = gguf.GGUFWriter(str(path), arch="sd3" if arch is None else arch)
    if arch is None:
        writer.kv_data[0].pop("general.architecture")
    qtype = Q[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for index, (key, value) in enumerate(state.items()):
        data = value.detach().float().numpy()
        name = prefix + key
        if data.ndim == 1:
            writer.add_tensor(name, data)
        elif data.ndim == 2 and data.shape[1] % block == 0 and kind != "F16":
            raw = _k_quant_bytes(data, kind, index) if kind.endswith("_K") else quants.quantize(data, qtype)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the gguf package (ggml's reference), in PyTorch shapes."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        values = quants.dequantize(np.array(tensor.data), tensor.tensor_type)
        out[tensor.name.removeprefix("model.diffusion_model.")] = torch.from_numpy(values.reshape(shape)).float()
    return out


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny SD3.5-layout pipeline (qk-norm, dual-attention block 0) 256 wide, so that K-quants (rows of 256)
    apply to most linears; tiny text encoders and VAE."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny_sd3 import JOINT_ATTENTION_DIM, POOLED_PROJECTION_DIM, build_tiny_sd3_components

    components = build_tiny_sd3_components(seed=3, variant="sd35")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        components["transformer"] = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=JOINT_ATTENTION_DIM,
            caption_projection_dim=256,
            pooled_projection_dim=POOLED_PROJECTION_DIM,
            out_channels=16,
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ).eval()
    path = tmp_path_factory.mktemp("tiny_sd35_wide")
    StableDiffusion3Pipeline(**components).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def original_state(folder):
    state = load_pipeline(folder).transformer.state_dict()
    return to_original_transformer(state, 2)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 16, 8, 8, generator=generator),
        torch.randn(2, 7, 32, generator=generator),
        torch.randn(2, 64, generator=generator),
        torch.tensor([900.0, 250.0]),
    )


def _diffusers_transformer(path: Path, folder: Path):
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel

    return SD3Transformer2DModel.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(folder),
        subfolder="transformer",
        torch_dtype=torch.float32,
    )


# ------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"])
def test_torch_dequantizers_equal_the_gguf_reference(kind):
    from workbench.formats.gguf import dequantize

    values = np.random.default_rng(1).standard_normal((6, 96)).astype(np.float32)
    raw = quants.quantize(values, Q[kind])
    expected = quants.dequantize(raw, Q[kind])
    got = dequantize(torch.from_numpy(raw), int(Q[kind]), (6, 96))
    assert np.array_equal(got.numpy(), expected)
    assert np.abs(expected - values).max() > 0 or kind in ("F16", "BF16")


@pytest.mark.parametrize(
    "kind", ["F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
)
def test_transformer_equals_reference_and_diffusers(kind, folder, original_state, tmp_path):
    """Our GGUF transformer (i) equals a dense transformer built from the gguf package's dequantization of the
    same file (1e-5 of the output scale) and (ii) matches diffusers' GGUF loading (which dequantizes to float16,
    hence the looser 3e-3)."""
    path = write_gguf(tmp_path / f"tiny-{kind}.gguf", original_state, kind)
    ours = load_gguf_transformer(path)
    counts = quantized_type_counts(ours)
    assert counts.get(kind, 0) >= 20, counts  # the linears of the blocks stay in the file's type
    dense = build_transformer(
        ours.config, convert_original_transformer(dequantized_state(path)), torch.float32, "reference"
    )
    reference = _diffusers_transformer(path, folder)
    latents, context, pooled, t = _inputs()
    with torch.no_grad():
        got = ours(latents, context, pooled, t)
        exact = dense(latents, context, pooled, t)
        theirs = reference(
            hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
        ).sample
    scale = exact.abs().max()
    assert scale > 0.1
    assert (got - exact).abs().max() <= 1e-5 * scale
    assert (got - theirs).abs().max() <= 3e-3 * scale, float((got - theirs).abs().max() / scale)


@pytest.mark.parametrize(
    ("kind", "prefix", "arch"), [("Q8_0", "", "sd3"), ("Q4_K", "", "sd3"), ("Q4_0", "model.diffusion_model.", None)]
)
def test_pipeline_image_equals_diffusers_gguf(kind, prefix, arch, folder, original_state, tmp_path):
    """ComfyUI-GGUF's layout (bare keys, general.architecture = sd3) and stable-diffusion.cpp's (prefixed keys, no
    architecture): the whole image is within 2/255 of diffusers' pipeline on its GGUF transformer."""
    from diffusers import StableDiffusion3Pipeline

    path = write_gguf(tmp_path / f"sd35_tiny-{kind}.gguf", original_state, kind, arch=arch, prefix=prefix)
    ours = load_pipeline(path, text_encoders_from=folder)
    assert isinstance(ours.transformer.transformer_blocks[0].attn.to_q, GGUFLinear)
    reference = StableDiffusion3Pipeline.from_pretrained(
        str(folder), transformer=_diffusers_transformer(path, folder), torch_dtype=torch.float32
    )
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32)
    expected = reference(PROMPT, generator=torch.Generator("cpu").manual_seed(5), **kwargs).images[0]
    got = ours(PROMPT, seed=5, **kwargs).images[0]
    expected, got = np.asarray(expected, dtype=np.int16), np.asarray(got, dtype=np.int16)
    assert expected.std() > 1
    assert np.abs(got - expected).max() <= 2


def test_memory_follows_the_file(original_state, tmp_path):
    """The transformer holds each linear weight as the file's bytes; everything else costs float32 (pos_embed its
    stored float16), so the bytes in memory are computed exactly from the file, and stay near its size."""
    path = write_gguf(tmp_path / "tiny-Q4_0.gguf", original_state, "Q4_0")
    model = load_gguf_transformer(path)
    reader = gguf.GGUFReader(str(path))
    expected = 0
    for tensor in reader.tensors:
        linear = tensor.name.endswith(".weight") and len(tensor.shape) == 2
        stored = int(tensor.n_bytes)
        expected += stored if linear or tensor.name == "pos_embed" else 4 * int(tensor.n_elements)
    in_memory = tensor_bytes(model)["total"]
    assert in_memory == expected
    dense = sum(v.numel() * 4 for v in original_state.values())
    assert in_memory < 0.3 * dense
    assert in_memory < 1.1 * path.stat().st_size
    assert all(m.qweight.dtype in (torch.uint8, torch.float16) for m in model.modules() if isinstance(m, GGUFLinear))


def test_bfloat16_compute_keeps_bf16_weights_dense(original_state, tmp_path):
    """A BF16 file computed in bfloat16 needs no dequantization: its linears load as plain nn.Linear layers."""
    path = write_gguf(tmp_path / "tiny-BF16.gguf", original_state, "BF16")
    model = load_gguf_transformer(path, dtype=torch.bfloat16)
    assert type(model.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert isinstance(model.context_embedder, torch.nn.Linear)


def test_other_architectures_are_named(original_state, tmp_path):
    flux = {"double_blocks.0.img_attn.proj.weight": torch.zeros(64, 64), "img_in.weight": torch.zeros(64, 64)}
    path = write_gguf(tmp_path / "flux1-dev-Q4_0.gguf", flux, "Q4_0", arch="flux")
    with pytest.raises(ModelFormatError, match=r"flux1-dev-Q4_0.gguf: this GGUF file holds a 'flux' model"):
        load_pipeline(path, text_encoders_from=tmp_path)
    sdxl = {"label_emb.0.0.weight": torch.zeros(64, 64), "input_blocks.0.0.weight": torch.zeros(64, 4, 3, 3)}
    path = write_gguf(tmp_path / "sdxl.gguf", sdxl, "Q8_0", arch=None, prefix="model.diffusion_model.")
    with pytest.raises(ModelFormatError, match=r"holds a 'sdxl' model \(from its key names\)"):
        load_gguf_transformer(path)


def test_unsupported_type_names_type_and_supported_list(original_state, tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), arch="sd3")
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    writer.add_tensor("joint_blocks.0.x_block.attn.qkv.weight", np.zeros((4, size), np.uint8), raw_dtype=Q.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match=r"iq.gguf: tensor .*qkv.weight' has GGUF type IQ2_XXS.*F16, Q4_0"):
        load_gguf_transformer(path)


def test_truncated_and_foreign_files_name_the_file(original_state, tmp_path):
    path = write_gguf(tmp_path / "cut.gguf", original_state, "Q8_0")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match=r"cut.gguf: not a readable GGUF file .*truncated"):
        load_pipeline(path)
    other = tmp_path / "renamed.gguf"
    other.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match=r"renamed.gguf: not a readable GGUF file.*no GGUF magic"):
        load_gguf_transformer(other)


def test_gguf_without_a_companion_folder_says_what_is_missing(original_state, tmp_path):
    path = write_gguf(tmp_path / "alone-Q8_0.gguf", original_state, "Q8_0")
    with pytest.raises(ModelFormatError, match="holds no VAE.*text_encoders_from"):
        load_pipeline(path)
