"""The architecture of the embedded ShapesWorld model, in the SD3 layout end to end, at laptop size.

- VAE: SD3-style 16-channel autoencoder, 8× downsampling (4 levels).
- Text: one CLIP-style encoder (CLIPTextModelWithProjection, the "CLIP-L" slot) and one T5-style encoder
  (T5EncoderModel), both with word-level tokenizers built from the ShapesWorld vocabulary. The CLIP-G slot is
  empty: its channels are zeros, as SD3 allows for a missing encoder.
- MMDiT: 6 joint blocks of width 192 (3 heads × 64), Mixture-of-Experts (4 experts, top-2) in the image stream of
  every other block.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from workbench.models.mmdit import MMDiT, MMDiTConfig
from workbench.models.text import TextConditioner
from workbench.models.vae import AutoencoderKL, VAEConfig
from workbench.pipeline import GenerationDefaults, Pipeline
from workbench.shapesworld.tokenizer import build_word_tokenizers, tiny_clip_config, tiny_t5_config
from workbench.shapesworld.world import vocabulary

MODEL_NAME = "shapesworld-moe"
SPEC_FILE = "spec.json"  # in a run folder: the sizes its checkpoints were trained at
DEFAULT_PROMPT = "a large red circle at the top left on a white background"


@dataclass
class ShapesWorldSpec:
    """Sizes of every component; ``micro()`` gives a seconds-to-train version for tests."""

    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8
    clip_hidden: int = 128
    clip_layers: int = 2
    clip_heads: int = 4
    clip_max_length: int = 24
    t5_layers: int = 2
    t5_heads: int = 4
    t5_max_length: int = 24
    joint_attention_dim: int = 128
    heads: int = 3
    depth: int = 6
    moe_layers: tuple[int, ...] = (1, 3, 5)
    num_experts: int = 4
    top_k: int | None = 2
    defaults: dict = field(
        default_factory=lambda: {
            "num_inference_steps": 20,
            "guidance_scale": 4.0,
            "shift": 1.0,
            "height": 128,
            "width": 128,
            "sampler": "euler",
            "prompt": DEFAULT_PROMPT,
        }
    )

    @classmethod
    def micro(cls) -> ShapesWorldSpec:
        return cls(
            vae_channels=(8, 8, 16, 16),
            vae_norm_groups=8,
            clip_hidden=32,
            clip_layers=1,
            clip_heads=2,
            t5_layers=1,
            t5_heads=2,
            joint_attention_dim=32,
            heads=1,
            depth=2,
            moe_layers=(0,),
            num_experts=4,
            top_k=2,
        )

    def save(self, run: Path) -> None:
        """Record this spec in the run folder (train and export read it back with :meth:`for_run`)."""
        run.mkdir(parents=True, exist_ok=True)
        (run / SPEC_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def for_run(cls, run: Path, default: ShapesWorldSpec | None = None) -> ShapesWorldSpec:
        """The spec recorded in ``run`` (see :meth:`save`), else ``default`` (else the standard sizes)."""
        path = run / SPEC_FILE
        if not path.is_file():
            return default if default is not None else cls()
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; expected some of {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def vae_config(self) -> VAEConfig:
        return VAEConfig.from_dict(
            {
                "block_out_channels": list(self.vae_channels),
                "layers_per_block": self.vae_layers_per_block,
                "norm_num_groups": self.vae_norm_groups,
                "latent_channels": 16,
                "scaling_factor": 1.0,
                "shift_factor": 0.0,
                "sample_size": 128,
                "mid_block_add_attention": False,
            }
        )

    def transformer_config(self) -> MMDiTConfig:
        return MMDiTConfig(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=self.depth,
            attention_head_dim=64,
            num_attention_heads=self.heads,
            joint_attention_dim=self.joint_attention_dim,
            caption_projection_dim=self.heads * 64,
            pooled_projection_dim=self.clip_hidden,
            pos_embed_max_size=16,
            moe_layers=self.moe_layers,
            moe_num_experts=self.num_experts,
            moe_top_k=self.top_k,
        )


def build_text_conditioner(spec: ShapesWorldSpec, seed: int = 0) -> TextConditioner:
    """Fresh random CLIP-style and T5-style encoders with word tokenizers over the ShapesWorld vocabulary."""
    torch.manual_seed(seed)
    tokenizers = build_word_tokenizers(vocabulary(), spec.clip_max_length, spec.t5_max_length)
    clip = CLIPTextModelWithProjection(
        tiny_clip_config(
            tokenizers.clip_info,
            hidden_size=spec.clip_hidden,
            layers=spec.clip_layers,
            heads=spec.clip_heads,
            projection_dim=spec.clip_hidden,
        )
    )
    t5 = T5EncoderModel(
        tiny_t5_config(tokenizers.t5_info, d_model=spec.joint_attention_dim, layers=spec.t5_layers, heads=spec.t5_heads)
    )
    return TextConditioner(
        (tokenizers.clip, clip),
        None,
        (tokenizers.t5, t5),
        joint_attention_dim=spec.joint_attention_dim,
        pooled_projection_dim=spec.clip_hidden,
        clip_l_hidden_size=spec.clip_hidden,
    )


def build_pipeline(spec: ShapesWorldSpec, seed: int = 0, vae: AutoencoderKL | None = None) -> Pipeline:
    """A randomly initialised ShapesWorld pipeline (a trained ``vae`` may be passed in)."""
    torch.manual_seed(seed)
    transformer = MMDiT(spec.transformer_config())
    initialise_transformer(transformer)
    vae = vae if vae is not None else AutoencoderKL(spec.vae_config())
    text = build_text_conditioner(spec, seed)
    return Pipeline(transformer, vae, text, MODEL_NAME, GenerationDefaults.from_dict(spec.defaults))


def initialise_transformer(model: MMDiT) -> None:
    """DiT-style init: Xavier linears, zeroed adaLN modulation and output projection (each block starts as
    identity, the model predicts zero velocity)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for block in model.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            torch.nn.init.zeros_(norm.linear.weight)
            torch.nn.init.zeros_(norm.linear.bias)
    for layer in (model.norm_out.linear, model.proj_out):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    for moe in model.moe_layers:
        torch.nn.init.normal_(moe.router.weight, std=0.02)
