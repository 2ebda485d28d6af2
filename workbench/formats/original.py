"""The original (Stability) single-file layout of SD3 checkpoints and its conversion to diffusers names.

``model.diffusion_model.*`` (MMDiT: ``joint_blocks.N.x_block…``, ``x_embedder``, ``final_layer``…) and
``first_stage_model.*`` (VAE) keys map to the diffusers parameter names our models use; ``text_encoders.*`` groups
stay in transformers' names. The original adaLN modulation is (shift, scale) where diffusers has (scale, shift), and
the original attention fuses q/k/v into one ``qkv`` linear.
"""

from __future__ import annotations

import re

import torch

from workbench.formats.files import ModelFormatError
from workbench.models.mmdit import MMDiTConfig
from workbench.models.vae import VAEConfig
from workbench.presets import SD3_VAE

_BLOCK_RULES = [
    (r"x_block\.attn\.proj\.", "attn.to_out.0."),
    (r"x_block\.attn\.ln_q\.", "attn.norm_q."),
    (r"x_block\.attn\.ln_k\.", "attn.norm_k."),
    (r"x_block\.attn2\.proj\.", "attn2.to_out.0."),
    (r"x_block\.attn2\.ln_q\.", "attn2.norm_q."),
    (r"x_block\.attn2\.ln_k\.", "attn2.norm_k."),
    (r"context_block\.attn\.proj\.", "attn.to_add_out."),
    (r"context_block\.attn\.ln_q\.", "attn.norm_added_q."),
    (r"context_block\.attn\.ln_k\.", "attn.norm_added_k."),
    (r"x_block\.adaLN_modulation\.1\.", "norm1.linear."),
    (r"context_block\.adaLN_modulation\.1\.", "norm1_context.linear."),
    (r"x_block\.mlp\.fc1\.", "ff.net.0.proj."),
    (r"x_block\.mlp\.fc2\.", "ff.net.2."),
    (r"context_block\.mlp\.fc1\.", "ff_context.net.0.proj."),
    (r"context_block\.mlp\.fc2\.", "ff_context.net.2."),
]
_TOP_RULES = {
    "x_embedder.proj.": "pos_embed.proj.",
    "t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
    "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.",
    "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2.",
    "context_embedder.": "context_embedder.",
    "final_layer.linear.": "proj_out.",
    "final_layer.adaLN_modulation.1.": "norm_out.linear.",
}
_QKV = {
    "x_block.attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
    "x_block.attn2.qkv.": ("attn2.to_q.", "attn2.to_k.", "attn2.to_v."),
    "context_block.attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
}


def original_module_map(depth: int) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Original MMDiT module names (``joint_blocks.3.x_block.attn.qkv``) → the diffusers modules that hold their
    output rows, in order (three for a fused q/k/v), and whether the two row halves swap (the adaLN modulation of
    the final layer and of the last block's context stream: the original is (shift, scale), diffusers (scale,
    shift)). Used to read LoRAs written against the original layout."""
    names: dict[str, tuple[tuple[str, ...], bool]] = {}
    for old, new in _TOP_RULES.items():
        names[old.rstrip(".")] = ((new.rstrip("."),), old.startswith("final_layer.adaLN"))
    for i in range(depth):
        for pattern, new in _BLOCK_RULES:
            old = pattern.replace("\\.", ".").rstrip(".")
            swap = i == depth - 1 and old.startswith("context_block.adaLN_modulation")
            names[f"joint_blocks.{i}.{old}"] = ((f"transformer_blocks.{i}.{new.rstrip('.')}",), swap)
        for old, split in _QKV.items():
            targets = tuple(f"transformer_blocks.{i}.{name.rstrip('.')}" for name in split)
            names[f"joint_blocks.{i}.{old.rstrip('.')}"] = (targets, False)
    return names


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) → (scale, shift) along the output axis; the original and diffusers orders differ."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def convert_original_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original MMDiT keys (``joint_blocks.*``, ``x_embedder.*``, …, prefix already stripped) → diffusers keys."""
    out: dict[str, torch.Tensor] = {}
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k)))
    for key, value in state.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        if key.startswith("final_layer.adaLN_modulation.1."):
            out[_TOP_RULES["final_layer.adaLN_modulation.1."] + key.rsplit(".", 1)[1]] = _swap_halves(value)
            continue
        top = next((new for old, new in _TOP_RULES.items() if key.startswith(old)), None)
        if top is not None:
            out[top + key.split(".")[-1]] = value
            continue
        match = re.match(r"joint_blocks\.(\d+)\.(.*)$", key)
        if match is None:
            raise ModelFormatError(f"unknown key in the original MMDiT layout: {key}")
        index, rest = int(match.group(1)), match.group(2)
        prefix = f"transformer_blocks.{index}."
        qkv = next((names for old, names in _QKV.items() if rest.startswith(old)), None)
        if qkv is not None:
            for name, chunk in zip(qkv, value.chunk(3, dim=0)):
                out[prefix + name + rest.rsplit(".", 1)[1]] = chunk.contiguous()
            continue
        for pattern, new in _BLOCK_RULES:
            if re.match(pattern, rest):
                converted = re.sub(pattern, new, rest, count=1)
                last_context = index == depth - 1 and rest.startswith("context_block.adaLN_modulation")
                out[prefix + converted] = _swap_halves(value) if last_context else value
                break
        else:
            raise ModelFormatError(f"unknown key in the original MMDiT layout: {key}")
    return out


def infer_transformer_config(state: dict[str, torch.Tensor]) -> MMDiTConfig:
    """Transformer config from diffusers-named tensor shapes. The head size is read from the qk-norm weights when
    present, else 64 (every SD3-family model)."""
    proj = state["pos_embed.proj.weight"]
    inner, patch = proj.shape[0], proj.shape[-1]
    norm_q = state.get("transformer_blocks.0.attn.norm_q.weight")
    head_dim = int(norm_q.shape[0]) if norm_q is not None else 64
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    dual = tuple(i for i in range(depth) if f"transformer_blocks.{i}.attn2.to_q.weight" in state)
    pos = state.get("pos_embed.pos_embed")
    return MMDiTConfig(
        sample_size=128,
        patch_size=patch,
        in_channels=proj.shape[1],
        num_layers=depth,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=state["context_embedder.weight"].shape[1],
        caption_projection_dim=state["context_embedder.weight"].shape[0],
        pooled_projection_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        out_channels=state["proj_out.weight"].shape[0] // patch**2,
        pos_embed_max_size=int(round(pos.shape[1] ** 0.5)) if pos is not None else 96,
        dual_attention_layers=dual,
        qk_norm="rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in state else None,
    )


_VAE_RULES = [
    (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", lambda m: f"{m[1]}.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.q\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_q."),
    (r"^(encoder|decoder)\.mid\.attn_1\.k\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_k."),
    (r"^(encoder|decoder)\.mid\.attn_1\.v\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_v."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
    (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
    (r"^(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
]


def convert_original_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM autoencoder keys (``first_stage_model.`` stripped) → diffusers AutoencoderKL keys."""
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        new = key.replace("nin_shortcut", "conv_shortcut")
        up = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", new)
        if up:
            level = levels - 1 - int(up[1])
            rest = f"resnets.{up[3]}" if up[2] == "block" else f"upsamplers.0.{up[3]}"
            new = f"decoder.up_blocks.{level}.{rest}"
        for pattern, repl in _VAE_RULES:
            new = re.sub(pattern, repl, new)
        if ".attentions.0.to_" in new or ".attentions.0.to_out" in new:
            value = value.reshape(value.shape[0], -1) if value.dim() == 4 else value
        out[new] = value
    return out


def infer_vae_config(state: dict[str, torch.Tensor]) -> VAEConfig:
    """VAE config from tensor shapes; GroupNorm's group count is not stored, so it is min(32, narrowest level)
    (32 for every SD3-family VAE)."""
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    channels = [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    per_block = 1 + max(
        int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)", k))
    )
    data = {
        **SD3_VAE,
        "block_out_channels": channels,
        "layers_per_block": per_block,
        "latent_channels": state["encoder.conv_out.weight"].shape[0] // 2,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
        "norm_num_groups": min(32, min(channels)),
    }
    return VAEConfig.from_dict(data)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def split_single_file(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a single-file checkpoint into diffusers-named ``transformer`` and ``vae`` state dicts and the raw
    ``text_encoders.*`` groups (``clip_l``, ``clip_g``, ``t5xxl``) in transformers' own names."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    mmdit = _strip(state, "model.diffusion_model.")
    if not mmdit and any(k.startswith("joint_blocks.") for k in state):
        mmdit = {k: v for k, v in state.items() if not k.startswith(("first_stage_model.", "text_encoders."))}
    if mmdit:
        parts["transformer"] = convert_original_transformer(mmdit)
    elif any(k.startswith("transformer_blocks.") for k in state):
        parts["transformer"] = dict(state)
    vae = _strip(state, "first_stage_model.")
    if vae:
        parts["vae"] = convert_original_vae(vae)
    for name in ("clip_l", "clip_g", "t5xxl"):
        group = _strip(state, f"text_encoders.{name}.transformer.")
        if group:
            parts[name] = group
    return parts
