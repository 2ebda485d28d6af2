"""Builders of tiny random SD3 / SD3.5 components for tests, fully offline.

The objects are diffusers' and transformers' own classes (SD3Transformer2DModel, AutoencoderKL,
CLIPTextModelWithProjection, T5EncoderModel, FlowMatchEulerDiscreteScheduler) with word-level tokenizers from
`workbench.shapesworld.tokenizer`, so the same folder is read by diffusers' StableDiffusion3Pipeline and by the
workbench.

Sizes: CLIP-L and CLIP-G have hidden 16 and projection 32 (pooled 32 + 32 = 64 = pooled_projection_dim; sequence
channels 16 + 16 zero-padded to joint_attention_dim 32), T5 has d_model 32 = joint_attention_dim. CLIP tokenizers pad to
CLIP_MAX_LENGTH tokens, the T5 tokenizer to at most T5_MAX_LENGTH.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from workbench.shapesworld.tokenizer import WordTokenizers, build_word_tokenizers, tiny_clip_config, tiny_t5_config

CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 32
JOINT_ATTENTION_DIM = 32
POOLED_PROJECTION_DIM = 64

VOCABULARY: list[str] = (
    "a an the of on at in to and with , . "
    "small large big tiny "
    "red orange yellow green blue purple white gray grey black "
    "circle square triangle star shape shapes "
    "top bottom left right center middle above below "
    "background picture photo image drawing "
    "cat dog astronaut riding horse"
).split()


def make_tokenizers(folder: str | Path | None = None) -> WordTokenizers:
    """The CLIP-style and T5-style word tokenizers over VOCABULARY; saved to `folder`/clip and `folder`/t5 if given."""
    tokenizers = build_word_tokenizers(VOCABULARY, clip_max_length=CLIP_MAX_LENGTH, t5_max_length=T5_MAX_LENGTH)
    if folder is not None:
        tokenizers.clip.save_pretrained(Path(folder) / "clip")
        tokenizers.t5.save_pretrained(Path(folder) / "t5")
    return tokenizers


def make_clip_tokenizer(folder: str | Path | None = None):
    """A CLIP-compatible word tokenizer (BOS, EOS, pad = EOS, model_max_length CLIP_MAX_LENGTH), saved to `folder`."""
    tokenizer = make_tokenizers().clip
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def make_t5_tokenizer(folder: str | Path | None = None):
    """A T5-compatible word tokenizer (EOS appended, pad id 0, model_max_length T5_MAX_LENGTH), saved to `folder`."""
    tokenizer = make_tokenizers().t5
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_sd3_components(seed: int = 0, variant: str = "sd3", with_t5: bool = True) -> dict[str, Any]:
    """Tiny random components of a StableDiffusion3Pipeline, keyed as its constructor's arguments.

    variant "sd3": 2 joint blocks; "sd35": 3 joint blocks with RMS q/k norm and a dual-attention (MMDiT-X) block 0.
    `with_t5=False` leaves text_encoder_3 and tokenizer_3 None. Each module is initialised from its own seed derived
    from `seed`, inside a forked RNG, so the result depends on `seed` only and the global RNG is left untouched.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if variant not in ("sd3", "sd35"):
        raise ValueError(f"variant must be 'sd3' or 'sd35', not {variant!r}")
    tokenizers = make_tokenizers()
    tokenizers_2 = make_tokenizers()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            num_layers=3 if variant == "sd35" else 2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=JOINT_ATTENTION_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=POOLED_PROJECTION_DIM,
            out_channels=16,
            pos_embed_max_size=32,
            dual_attention_layers=(0,) if variant == "sd35" else (),
            qk_norm="rms_norm" if variant == "sd35" else None,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModelWithProjection(
            tiny_clip_config(tokenizers.clip_info, hidden_size=16, layers=2, heads=2, projection_dim=32)
        )
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_clip_config(tokenizers_2.clip_info, hidden_size=16, layers=2, heads=2, projection_dim=32)
        )
        text_encoder_3 = None
        if with_t5:
            torch.manual_seed(seed + 4)
            text_encoder_3 = T5EncoderModel(tiny_t5_config(tokenizers.t5_info, d_model=JOINT_ATTENTION_DIM))

    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        if module is not None:
            module.eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizers.clip,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizers_2.clip,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizers.t5 if with_t5 else None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def save_tiny_sd3_pipeline(folder: str | Path, **kwargs: Any):
    """Build a tiny StableDiffusion3Pipeline (kwargs go to build_tiny_sd3_components), save it and return it.

    The folder has diffusers' layout (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/),
    weights in safetensors, and reloads with `StableDiffusion3Pipeline.from_pretrained(folder)`; without T5 diffusers
    needs `from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`.
    """
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**build_tiny_sd3_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def random_shapesworld(
    micro: bool = True, seed: int = 0, noise_seed: int = 0, experts: bool = True, sharp_routers: bool = False
):
    """A random ShapesWorld pipeline (the workbench's own SD3-layout model, ``ShapesWorldSpec.micro()`` or the full
    spec) whose output depends on its weights: every transformer parameter gets N(0, 0.05²) noise (the stock init
    zeroes the output projections, so an untouched model predicts 0). ``sharp_routers`` draws the MoE routers from
    N(0, 1), so that top-k routing really drops experts; ``experts=False`` builds it dense. The one builder of random
    ShapesWorld models for the tests."""
    from workbench.shapesworld.model import ShapesWorldSpec, build_pipeline

    spec = ShapesWorldSpec.micro() if micro else ShapesWorldSpec()
    if not experts:
        spec.moe_layers = ()
    pipe = build_pipeline(spec, seed=seed)
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for parameter in pipe.transformer.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        if sharp_routers:
            for moe in pipe.transformer.moe_layers:
                moe.router.weight.normal_(0, 1, generator=generator)
    return pipe
