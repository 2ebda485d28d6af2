"""LoRA files: reading a ``.safetensors`` LoRA and grouping its tensors by target module, in every format the
workbench accepts (the keys decide which). What the groups mean for a loaded model — which layers they target and
how the deltas attach — is :mod:`workbench.lora`'s job.

- diffusers / PEFT, as ``StableDiffusion3Pipeline.save_lora_weights`` writes them:
  ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` / ``lora_B.weight``; text encoders under
  ``text_encoder.`` (CLIP-L), ``text_encoder_2.`` (CLIP-G), ``text_encoder_3.`` (T5); a bare PEFT file under
  ``base_model.model.``. alpha comes from the file's ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``) or a ``.alpha`` tensor, else equals the rank (diffusers' rule).
- kohya sd-scripts / ComfyUI: ``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight`` / ``lora_up.weight`` /
  ``alpha`` in the original MMDiT names, ``lora_transformer_<diffusers name>``, and ``lora_te1_`` / ``lora_te2_`` /
  ``lora_te3_`` for the text encoders.
- original names with dots (``diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from workbench.formats.files import read_safetensors

COMPONENTS = ("transformer", "clip_l", "clip_g", "t5")
"""Where a LoRA layer can sit: the MMDiT and the three text-encoder slots."""

COMPONENT_TITLES = {
    "transformer": "transformer",
    "clip_l": "text_encoder (CLIP-L)",
    "clip_g": "text_encoder_2 (CLIP-G)",
    "t5": "text_encoder_3 (T5)",
}
DOTTED_PREFIXES = {
    "transformer.": "transformer",
    "base_model.model.": "transformer",
    "text_encoder.": "clip_l",
    "text_encoder_2.": "clip_g",
    "text_encoder_3.": "t5",
}
UNDERSCORED_PREFIXES = {
    "lora_unet_": "transformer",
    "lora_transformer_": "transformer",
    "lora_te1_": "clip_l",
    "lora_te2_": "clip_g",
    "lora_te3_": "t5",
    "lora_te_": "clip_l",
}
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
METADATA_PREFIXES = {"transformer": "transformer", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}

KEY_PATTERN = re.compile(
    r"^(?P<stem>.+?)\.(?:(?P<down>lora_A|lora_down|lora\.down)|(?P<up>lora_B|lora_up|lora\.up))"
    r"(?:\.[A-Za-z_]\w*)?\.weight$"
)


class LoRAFormatError(ValueError):
    """A LoRA file or state dict that cannot be applied to this model; the message names the file and key."""


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors, header metadata and sha256 of a ``.safetensors`` LoRA; pickles and broken files raise
    :class:`workbench.loading.ModelFormatError` naming the file."""

    path = Path(path)
    tensors = read_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return tensors, metadata, digest.hexdigest()


@dataclass
class KeyGroup:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def group_keys(tensors: dict[str, torch.Tensor], source: str) -> dict[str, KeyGroup]:
    groups: dict[str, KeyGroup] = {}
    for key, tensor in tensors.items():
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise LoRAFormatError(f"{source}: {key!r} is a DoRA tensor; DoRA adapters are not supported, only LoRA")
        if key.endswith(".alpha"):
            groups.setdefault(key[: -len(".alpha")], KeyGroup()).alpha = float(tensor.float().item())
            continue
        match = KEY_PATTERN.match(key)
        if match is None:
            raise LoRAFormatError(
                f"{source}: unexpected key {key!r}; a LoRA holds <module>.lora_A.weight / lora_B.weight (diffusers, "
                "PEFT), <module>.lora_down.weight / lora_up.weight / alpha (kohya, ComfyUI)"
            )
        group = groups.setdefault(match["stem"], KeyGroup())
        if match["down"]:
            group.down = tensor
        else:
            group.up = tensor
    for stem, group in groups.items():
        if group.down is None or group.up is None:
            part = "down (lora_A)" if group.down is None else "up (lora_B)"
            raise LoRAFormatError(f"{source}: module {stem!r} has no {part} matrix")
        if group.down.shape[0] != group.up.shape[1]:
            raise LoRAFormatError(
                f"{source}: module {stem!r} has down {tuple(group.down.shape)} and up {tuple(group.up.shape)}: "
                "their ranks differ"
            )
    return groups


def metadata_alphas(metadata: dict[str, str], source: str) -> dict[str, dict]:
    """Per component, PEFT's ``LoraConfig`` fields stored by diffusers (``lora_alpha``, ``alpha_pattern``, …)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoRAFormatError(f"{source}: lora_adapter_metadata is not valid JSON: {err}") from err
    out: dict[str, dict] = {}
    for component, prefix in METADATA_PREFIXES.items():
        fields = {k[len(prefix) + 1 :]: v for k, v in config.items() if k.startswith(prefix + ".")}
        if fields:
            out[component] = fields
    if not out and "lora_alpha" in config:
        out["transformer"] = config
    return out


def pattern_value(patterns: dict, module: str, default):
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_scale(group: KeyGroup, component: str, module: str, configs: dict[str, dict]) -> float:
    rank = int(group.down.shape[0])
    config = configs.get(component, {})
    alpha = group.alpha
    if alpha is None:
        alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
    return float(alpha) / (rank**0.5 if config.get("use_rslora") else rank)
