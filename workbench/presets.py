"""Known model families: transformer configs, VAE config and generation defaults of SD3 / SD3.5 checkpoints.

Configs are normally read from the checkpoint; presets name them for building random-weight models (benchmarks)
and fill what a single-file checkpoint does not store.
"""

from __future__ import annotations

SD3_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "sample_size": 1024,
}

_COMMON = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
}

TRANSFORMER_PRESETS: dict[str, dict] = {
    "sd3-medium": {
        **_COMMON,
        "num_layers": 24,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pos_embed_max_size": 192,
    },
    "sd3.5-medium": {
        **_COMMON,
        "num_layers": 24,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "dual_attention_layers": list(range(13)),
    },
    "sd3.5-large": {
        **_COMMON,
        "num_layers": 38,
        "num_attention_heads": 38,
        "caption_projection_dim": 2432,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
    },
}

GENERATION_DEFAULTS: dict[str, dict] = {
    "sd3-medium": {"num_inference_steps": 28, "guidance_scale": 7.0, "shift": 3.0, "height": 1024, "width": 1024},
    "sd3.5-medium": {"num_inference_steps": 40, "guidance_scale": 4.5, "shift": 3.0, "height": 1024, "width": 1024},
    "sd3.5-large": {"num_inference_steps": 28, "guidance_scale": 3.5, "shift": 3.0, "height": 1024, "width": 1024},
}


def transformer_preset(name: str, **overrides: object) -> dict:
    """A preset's transformer config with ``overrides`` applied (e.g. ``num_layers=2`` for a reduced-depth model)."""
    if name not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(TRANSFORMER_PRESETS)}")
    return {**TRANSFORMER_PRESETS[name], **overrides}


def guess_family(config: dict) -> str | None:
    """The preset whose defining sizes match ``config`` (depth, width, qk-norm, dual attention), else None."""
    for name, preset in TRANSFORMER_PRESETS.items():
        keys = ("num_layers", "num_attention_heads", "qk_norm")
        if all(config.get(k) == preset.get(k) for k in keys) and bool(config.get("dual_attention_layers")) == bool(
            preset.get("dual_attention_layers")
        ):
            return name
    return None
