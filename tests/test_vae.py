"""Tests for workbench.models.vae: parity with diffusers' AutoencoderKL, tiling, previews, (de)serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.loading import load_vae, save_vae
from workbench.models.vae import (
    SD3_LATENT_RGB_BIAS,
    SD3_LATENT_RGB_FACTORS,
    AutoencoderKL,
    LatentDistribution,
    VAEConfig,
    _tile_spans,
    fit_latent_rgb_factors,
    latent_to_rgb_preview,
)

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5

SD3_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.29.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

SMALL = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
CONFIGS = {
    "sd3_small": SMALL,
    "quant_conv": {**SMALL, "use_quant_conv": True, "use_post_quant_conv": True},
    "four_levels": {**SMALL, "block_out_channels": (32, 32, 64, 64)},
    "no_mid_attention": {**SMALL, "mid_block_add_attention": False},
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small convolutions are far slower with two intra-op threads on the 2-core CI machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _diffusers_vae(seed: int = 0, **kwargs) -> nn.Module:
    levels = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels, **kwargs
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def _ours_from(reference: nn.Module) -> AutoencoderKL:
    model = AutoencoderKL(VAEConfig.from_dict(dict(reference.config))).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _waves(c: int, h: int, w: int, period: float = 1.0) -> torch.Tensor:
    """Smooth, roughly stationary test signal (1, c, h, w): one plane wave per channel."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h) / period, torch.arange(w) / period, indexing="ij")
    planes = []
    for _ in range(c):
        a, b, phase = torch.rand(3, generator=g)
        planes.append(torch.sin(2 * math.pi * (xx * (0.12 + 0.1 * a) + yy * (0.12 + 0.1 * b)) + 6 * phase))
    return torch.stack(planes)[None]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name: str) -> None:
    reference = _diffusers_vae(**CONFIGS[name])
    ours = _ours_from(reference)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert (ours.quant_conv is not None) == CONFIGS[name]["use_quant_conv"]
    x = _images(2, 32, 48)
    with torch.no_grad():
        ref_post = reference.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, ref_post.mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=ATOL, rtol=0)
        torch.testing.assert_close(post.std, ref_post.std, atol=ATOL, rtol=0)
        torch.testing.assert_close(post.mode(), ref_post.mode(), atol=ATOL, rtol=0)
        sample = post.sample(torch.Generator().manual_seed(7))
        ref_sample = ref_post.sample(torch.Generator().manual_seed(7))
        torch.testing.assert_close(sample, ref_sample, atol=ATOL, rtol=0)
        f = ours.downsample_factor
        assert sample.shape == (2, 16, 32 // f, 48 // f)
        torch.testing.assert_close(ours.decode(sample), reference.decode(sample).sample, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x), reference(x).sample, atol=ATOL, rtol=0)


def test_sample_generator_list_and_deterministic() -> None:
    params = torch.randn(3, 32, 4, 5)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    ref = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(params)
    expected = ref.sample([torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    torch.testing.assert_close(LatentDistribution(params).sample(gens), expected)
    det = LatentDistribution(params, deterministic=True)
    torch.testing.assert_close(det.sample(torch.Generator().manual_seed(0)), det.mode())
    assert LatentDistribution(params).kl().shape == (3,)


def test_latent_scaling_roundtrip() -> None:
    model = AutoencoderKL(VAEConfig(**SMALL))
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(model.scale_latents(z), (z - 0.0609) * 1.5305)
    torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)


def test_from_dict_with_diffusers_config() -> None:
    reference = _diffusers_vae(**CONFIGS["quant_conv"])
    config = VAEConfig.from_dict(dict(reference.config))
    assert config.block_out_channels == (32, 64)
    assert config.down_block_types == ("DownEncoderBlock2D",) * 2
    assert config.use_quant_conv and config.use_post_quant_conv
    assert config.scaling_factor == pytest.approx(1.5305) and config.shift_factor == pytest.approx(0.0609)
    assert "_use_default_values" in config.extra
    assert VAEConfig.from_dict(config.to_dict()) == config
    json.dumps(config.to_dict())

    sd3 = VAEConfig.from_dict(SD3_CONFIG)
    assert sd3 == VAEConfig()
    assert sd3.downsample_factor == 8 and sd3.extra["_class_name"] == "AutoencoderKL"
    with torch.device("meta"):
        ours = AutoencoderKL(sd3)
        reference = diffusers.AutoencoderKL.from_config(SD3_CONFIG)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        VAEConfig(block_out_channels=(32, 64), down_block_types=("AttnDownEncoderBlock2D",) * 2)
    with pytest.raises(ValueError):
        VAEConfig(block_out_channels=(32, 64), up_block_types=("UpDecoderBlock2D",) * 3)
    with pytest.raises(ValueError):
        VAEConfig(act_fn="tanhshrink")


def test_save_and_load_roundtrip(tmp_path) -> None:
    model = _ours_from(_diffusers_vae(**CONFIGS["quant_conv"]))
    save_vae(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_vae(tmp_path)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    x = _images(1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
        reference = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reference(x).sample, model(x), atol=ATOL, rtol=0)
    half = load_vae(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_loads_diffusers_save_pretrained(tmp_path) -> None:
    reference = _diffusers_vae(**SMALL)
    reference.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    assert not ours.config.use_quant_conv
    x = _images(1, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x).sample, atol=ATOL, rtol=0)


def test_load_vae_infers_quant_conv_when_config_lacks_it(tmp_path) -> None:
    model = AutoencoderKL(VAEConfig(**{**SMALL, "use_quant_conv": True, "use_post_quant_conv": True}))
    save_vae(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["use_quant_conv"], config["use_post_quant_conv"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_vae(tmp_path)
    assert loaded.quant_conv is not None and loaded.post_quant_conv is not None


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(10, 16, 4), (16, 16, 4), (17, 16, 4), (45, 16, 4), (100, 64, 16)]
)
def test_tile_spans_cover_with_overlap(length: int, tile: int, overlap: int) -> None:
    spans = _tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == min(tile, length) for start, end in spans)
    assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))


class _PointwiseDecoder(nn.Module):
    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Conv2d(16, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.proj(z), scale_factor=self.factor, mode="nearest")


class _PointwiseEncoder(nn.Module):
    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Conv2d(3, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.factor, x.shape[-1] // self.factor
        return self.proj(x[..., :: self.factor, :: self.factor][..., :h, :w])


def test_tiling_is_exact_for_a_local_model() -> None:
    model = AutoencoderKL(VAEConfig(**{**SMALL, "block_out_channels": (32, 32, 64, 64)}, tile_sample_size=64)).eval()
    model.encoder, model.decoder = _PointwiseEncoder(8), _PointwiseDecoder(8)
    z = torch.randn(2, 16, 37, 29)
    x = torch.randn(2, 3, 37 * 8 + 5, 29 * 8 + 3)
    with torch.no_grad():
        tiled = model.decode(z, tiled=True)
        assert tiled.shape == (2, 3, 37 * 8, 29 * 8)
        torch.testing.assert_close(tiled, model.decode(z, tiled=False), atol=1e-5, rtol=0)
        tiled_moments = model.encode(x, tiled=True).parameters
        assert tiled_moments.shape == (2, 32, 37, 29)
        torch.testing.assert_close(tiled_moments, model.encode(x, tiled=False).parameters, atol=1e-5, rtol=0)


def test_tiled_close_to_untiled_on_smooth_input() -> None:
    model = _ours_from(_diffusers_vae(**SMALL))
    model.tile_sample_size = 64
    with torch.no_grad():
        z = _waves(16, 44, 37)
        full, tiled = model.decode(z, tiled=False), model.decode(z, tiled=True)
        assert tiled.shape == full.shape == (1, 3, 88, 74)
        assert ((tiled - full).pow(2).mean() / full.pow(2).mean()).sqrt() < 0.35
        x = _waves(3, 89, 75, period=2.0)
        full, tiled = model.encode(x, tiled=False).mean, model.encode(x, tiled=True).mean
        assert tiled.shape == full.shape == (1, 16, 44, 37)
        assert ((tiled - full).pow(2).mean() / full.pow(2).mean()).sqrt() < 0.35


def test_tiling_mode_selection() -> None:
    model = _ours_from(_diffusers_vae(**SMALL))
    model.tile_sample_size = 32
    with torch.no_grad():
        small = torch.randn(1, 16, 12, 12)[..., :10, :10]
        assert torch.equal(model.decode(small, tiled=True), model.decode(small, tiled=False))
        z = torch.randn(1, 16, 24, 20)
        untiled, tiled = model.decode(z, tiled=False), model.decode(z, tiled=True)
        assert not torch.equal(untiled, tiled)
        model.tile_threshold = 23
        assert torch.equal(model.decode(z), tiled)
        model.tile_threshold = 24
        assert torch.equal(model.decode(z), untiled)
        x = _images(1, 48, 40)
        model.tile_threshold = 23
        assert torch.equal(model.encode(x).mean, model.encode(x, tiled=True).mean)
        model.tile_threshold = 24
        assert torch.equal(model.encode(x).mean, model.encode(x, tiled=False).mean)


def test_latent_to_rgb_preview() -> None:
    latents = torch.randn(2, 16, 6, 5)
    preview = latent_to_rgb_preview(latents)
    assert isinstance(preview, np.ndarray) and preview.dtype == np.uint8 and preview.shape == (2, 6, 5, 3)
    gray = latent_to_rgb_preview(torch.zeros(1, 16, 2, 2))
    expected = np.round((np.asarray(SD3_LATENT_RGB_BIAS) + 1) * 127.5).astype(np.uint8)
    assert (gray == expected).all()
    images = latent_to_rgb_preview(latents, as_pil=True)
    assert len(images) == 2 and images[0].size == (5, 6) and images[0].mode == "RGB"
    assert np.array_equal(np.asarray(images[1]), preview[1])
    custom = latent_to_rgb_preview(torch.ones(1, 4, 3, 3), factors=torch.zeros(4, 3), bias=[1.0, -1.0, 0.0])
    assert custom[0, 0, 0].tolist() == [255, 0, 128]
    assert len(SD3_LATENT_RGB_FACTORS) == 16 and all(len(row) == 3 for row in SD3_LATENT_RGB_FACTORS)


def test_fit_latent_rgb_factors_recovers_linear_map() -> None:
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(16, 3, generator=g) * 0.1
    bias = torch.randn(3, generator=g) * 0.1
    latents = torch.randn(4, 16, 8, 6, generator=g)
    rgb = torch.einsum("bchw,ck->bkhw", latents, matrix) + bias[None, :, None, None]
    images = F.interpolate(rgb, scale_factor=8, mode="nearest")
    fitted_matrix, fitted_bias = fit_latent_rgb_factors(latents, images)
    assert fitted_matrix.shape == (16, 3) and fitted_bias.shape == (3,)
    torch.testing.assert_close(fitted_matrix, matrix, atol=1e-5, rtol=0)
    torch.testing.assert_close(fitted_bias, bias, atol=1e-5, rtol=0)
    noisy_matrix, _ = fit_latent_rgb_factors(latents, images + 0.01 * torch.randn(images.shape, generator=g))
    torch.testing.assert_close(noisy_matrix, matrix, atol=5e-3, rtol=0)
