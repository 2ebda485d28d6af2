"""SD3 ControlNet checkpoints: diffusers folders and Stability's single files, read into a config and a state dict
with diffusers' ``SD3ControlNetModel`` names.

* A diffusers folder: ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or sharded with an index), also
  as the ``controlnet/`` sub-folder of a pipeline folder.
* A single ``.safetensors`` file with diffusers' names (a ``save_pretrained`` weights file next to no config: the
  config is inferred), or Stability's original SD3.5 Large layout (``stabilityai/stable-diffusion-3.5-controlnets``:
  ``transformer_blocks.{i}.attn.qkv``, ``attn.proj``, ``mlp.fc1/fc2``, ``adaLN_modulation.1``, image-only blocks of
  head width 64), mapped as diffusers' ``scripts/convert_sd3_controlnet_to_diffusers.py`` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from workbench.formats.files import ModelFormatError, read_json, read_safetensors
from workbench.models.controlnet import ControlNetConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ORIGINAL_HEAD_DIM = 64
"""Head width of Stability's ControlNets; the single files do not store it."""

_ORIGINAL_BLOCK_NAMES = {
    "attn.proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}


def is_original_layout(keys: set[str] | list[str]) -> bool:
    """True for Stability's original key names (fused ``attn.qkv``)."""
    return any(key.endswith(".attn.qkv.weight") for key in keys)


def convert_original(state: dict[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Stability's SD3.5 ControlNet keys → diffusers' (``qkv`` split into ``to_q``, ``to_k``, ``to_v``). Keys of
    neither kind raise :class:`ModelFormatError` naming them."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if key.startswith(("controlnet_blocks.", "pos_embed_input.", "time_text_embed.")):
            out[key] = tensor
        elif match and match.group(2) == "attn.qkv":
            index, kind = match.group(1), match.group(3)
            for name, part in zip(("to_q", "to_k", "to_v"), torch.chunk(tensor, 3, dim=0)):
                out[f"transformer_blocks.{index}.attn.{name}.{kind}"] = part
        elif match and match.group(2) in _ORIGINAL_BLOCK_NAMES:
            index, name, kind = match.group(1), _ORIGINAL_BLOCK_NAMES[match.group(2)], match.group(3)
            out[f"transformer_blocks.{index}.{name}.{kind}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ModelFormatError(f"{source}: unexpected keys for an SD3 ControlNet: {sorted(unknown)[:5]}")
    return out


def infer_config(state: dict[str, torch.Tensor], source: str = "<state dict>") -> ControlNetConfig:
    """A config for a state dict with diffusers' names but no ``config.json``: depth from ``controlnet_blocks``,
    width and channels from ``pos_embed_input``, the layout (joint or image-only) from ``context_embedder``; heads
    of width 64 unless that does not divide the width."""
    try:
        proj = state["pos_embed_input.proj.weight"]
        pooled = state["time_text_embed.text_embedder.linear_1.weight"].shape[1]
    except KeyError as err:
        raise ModelFormatError(f"{source}: not an SD3 ControlNet (no {err.args[0]})") from None
    dim, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    layers = len({k.split(".")[1] for k in state if k.startswith("controlnet_blocks.")})
    head_dim = ORIGINAL_HEAD_DIM if dim % ORIGINAL_HEAD_DIM == 0 else dim
    config = ControlNetConfig(
        patch_size=patch,
        in_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim,
        caption_projection_dim=dim,
        pooled_projection_dim=pooled,
        extra_conditioning_channels=channels - 16,
    )
    if "context_embedder.weight" in state:
        config.joint_attention_dim = state["context_embedder.weight"].shape[1]
        qk_norm = any(k.endswith("attn.norm_q.weight") for k in state)
        config.qk_norm = "rms_norm" if qk_norm else None
        config.dual_attention_layers = tuple(
            sorted({int(k.split(".")[1]) for k in state if re.fullmatch(r"transformer_blocks\.\d+\.attn2\..*", k)})
        )
        if "pos_embed.pos_embed" in state:
            config.pos_embed_max_size = int(round(state["pos_embed.pos_embed"].shape[1] ** 0.5))
            config.sample_size = config.pos_embed_max_size * patch
    else:
        config.joint_attention_dim = None
        config.pos_embed_max_size = None
        config.pos_embed_type = None
        config.use_pos_embed = False
        config.force_zeros_for_pooled_projection = False
    return config


def read_controlnet(path: str | Path, dtype: torch.dtype | None = None) -> tuple[ControlNetConfig, dict, Path]:
    """``(config, state dict with diffusers' names, the weights file or folder read)`` of a ControlNet folder or
    single file; :class:`ModelFormatError` naming the path otherwise."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "controlnet").is_dir():
        path = path / "controlnet"
    if path.is_dir():
        config = ControlNetConfig.from_dict(read_json(path / "config.json"))
        index = path / f"{WEIGHTS_NAME}.index.json"
        if (path / WEIGHTS_NAME).is_file():
            state = read_safetensors(path / WEIGHTS_NAME, dtype=dtype)
        elif index.is_file():
            state = {}
            for shard in sorted(set(read_json(index)["weight_map"].values())):
                state.update(read_safetensors(path / shard, dtype=dtype))
        else:
            raise ModelFormatError(f"{path}: no {WEIGHTS_NAME} (or sharded index) in this ControlNet folder")
        return config, state, path
    if not path.exists():
        raise ModelFormatError(f"{path}: no such ControlNet folder or file")
    state = read_safetensors(path, dtype=dtype)
    if is_original_layout(state):
        state = convert_original(state, str(path))
    return infer_config(state, str(path)), state, path
