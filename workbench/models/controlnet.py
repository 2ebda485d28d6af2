"""SD3 / SD3.5 ControlNet: a copy of the first MMDiT blocks that turns a control image's latents into per-block
residuals for the image stream of the transformer.

Parameter names follow diffusers' ``SD3ControlNetModel`` so a diffusers ``controlnet/`` folder loads without
renaming. Two layouts exist:

* SD3 (InstantX and the like, ``joint_attention_dim`` set): its own ``pos_embed`` (position table included), a
  ``context_embedder`` and joint (image + text) blocks; the pipeline gives it zero pooled text when
  ``force_zeros_for_pooled_projection``.
* SD3.5 Large (Stability's, ``joint_attention_dim = None``, ``use_pos_embed = False``): image-only blocks, no text,
  and it embeds the latents with the *transformer's* ``pos_embed`` (passed to :meth:`SD3ControlNet.forward`).

Both add ``pos_embed_input(control latents)`` (a patch embedding without a position table, ``in_channels +
extra_conditioning_channels`` inputs) to the embedded latents. Shapes: latents and control latents ``(B, C, H, W)``;
each residual ``(B, N, dim)`` with ``N = (H/p)(W/p)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from workbench.models.mmdit import (
    AdaLayerNormZero,
    Attention,
    JointTransformerBlock,
    MMDiTConfig,
    PatchEmbed,
    TimeTextEmbed,
    gated_residual,
    modulate,
)
from workbench.models.moe import FeedForward

CLASS_NAME = "SD3ControlNetModel"


@dataclass
class ControlNetConfig:
    """diffusers' ``SD3ControlNetModel`` config.json keys (unknown keys are kept in ``extra``)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int | None = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    extra_conditioning_channels: int = 0
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    pos_embed_type: str | None = "sincos"
    use_pos_embed: bool = True
    force_zeros_for_pooled_projection: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, data: dict) -> ControlNetConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "dual_attention_layers" in kwargs:
            kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"] or ())
        extra = {k: v for k, v in data.items() if k not in known and not k.startswith("_")}
        return cls(**kwargs, extra=extra)

    @classmethod
    def matching(cls, transformer: MMDiTConfig, num_layers: int) -> ControlNetConfig:
        """An SD3-layout ControlNet (own ``pos_embed``, joint text blocks, zero pooled text) of ``num_layers`` blocks
        that fits ``transformer``: same width, patching, latent channels, text widths and position table."""
        t = transformer
        return cls(
            sample_size=t.sample_size,
            patch_size=t.patch_size,
            in_channels=t.in_channels,
            num_layers=num_layers,
            attention_head_dim=t.attention_head_dim,
            num_attention_heads=t.num_attention_heads,
            joint_attention_dim=t.joint_attention_dim,
            caption_projection_dim=t.caption_projection_dim,
            pooled_projection_dim=t.pooled_projection_dim,
            out_channels=t.out_channels,
            pos_embed_max_size=t.pos_embed_max_size,
            force_zeros_for_pooled_projection=True,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        data["dual_attention_layers"] = list(self.dual_attention_layers)
        data["_class_name"] = CLASS_NAME
        return {**self.extra, **data}

    def block_config(self) -> MMDiTConfig:
        """The :class:`MMDiTConfig` the blocks are built from. Its depth is one more than the ControlNet's, so that
        no block is the transformer's text-dropping last block (every ControlNet block keeps both streams)."""
        if self.use_pos_embed and (self.pos_embed_max_size is None or self.pos_embed_type != "sincos"):
            raise ValueError(
                "a ControlNet with its own pos_embed needs pos_embed_type='sincos' and a pos_embed_max_size, got "
                f"pos_embed_type={self.pos_embed_type!r}, pos_embed_max_size={self.pos_embed_max_size!r}"
            )
        if self.joint_attention_dim is not None and self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads × "
                f"attention_head_dim ({self.inner_dim})"
            )
        return MMDiTConfig(
            sample_size=self.sample_size,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            num_layers=self.num_layers + 1,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim or 0,
            caption_projection_dim=self.caption_projection_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            out_channels=self.out_channels,
            pos_embed_max_size=self.pos_embed_max_size or 1,
            dual_attention_layers=self.dual_attention_layers,
            qk_norm=self.qk_norm,
        )


class InputEmbed(nn.Module):
    """``pos_embed_input``: control latents ``(B, C, H, W)`` → tokens ``(B, (H/p)(W/p), dim)``, no position table."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.proj(control).flatten(2).transpose(1, 2)


class SingleTransformerBlock(nn.Module):
    """An image-only MMDiT block (SD3.5 Large ControlNets): self-attention and feed-forward, adaLN-Zero gated."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, None, joint=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (B, N, dim)``, ``cond (B, dim)`` → ``(B, N, dim)``."""
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, cond)
        x = gated_residual(x, gate_msa, self.attn(normed))
        return gated_residual(x, gate_mlp, self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class SD3ControlNet(nn.Module):
    """The ControlNet; :meth:`forward` returns one residual per block, to be added by ``MMDiT.forward``."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        block_config = config.block_config()
        dim, heads = config.inner_dim, config.num_attention_heads
        self.pos_embed = PatchEmbed(block_config) if config.use_pos_embed else None
        self.time_text_embed = TimeTextEmbed(dim, config.pooled_projection_dim)
        self.context_embedder: nn.Linear | None = None
        if config.joint_attention_dim is not None:
            self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
            blocks = [JointTransformerBlock(block_config, i) for i in range(config.num_layers)]
        else:
            blocks = [SingleTransformerBlock(dim, heads) for _ in range(config.num_layers)]
        self.transformer_blocks = nn.ModuleList(blocks)
        self.controlnet_blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(config.num_layers)])
        self.pos_embed_input = InputEmbed(
            config.in_channels + config.extra_conditioning_channels, dim, config.patch_size
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed_input.proj.weight.dtype

    def forward(
        self,
        latents: torch.Tensor,
        control: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        scale: float = 1.0,
        pos_embed: PatchEmbed | None = None,
    ) -> list[torch.Tensor]:
        """Residuals ``[(B, N, dim)] × num_layers``, each multiplied by ``scale``.

        ``latents (B, C, H, W)`` are the transformer's input, ``control (B, C + extra, H, W)`` the control image's
        latents, ``encoder_hidden_states (B, L, joint_attention_dim)`` the text (ignored by an image-only
        ControlNet), ``pooled_projections (B, pooled_projection_dim)``, ``timestep (B,)`` = 1000·σ. ``pos_embed``:
        the transformer's, used when the ControlNet has none of its own (SD3.5 Large)."""
        embed = self.pos_embed if self.pos_embed is not None else pos_embed
        if embed is None:
            raise ValueError("this ControlNet has no pos_embed of its own: pass the transformer's (pos_embed=…)")
        x = embed(latents) + self.pos_embed_input(control)
        cond = self.time_text_embed(timestep, pooled_projections)
        samples = []
        if self.context_embedder is not None:
            context = self.context_embedder(encoder_hidden_states)
            for block in self.transformer_blocks:
                x, context = block(x, context, cond)
                samples.append(x)
        else:
            for block in self.transformer_blocks:
                x = block(x, cond)
                samples.append(x)
        return [head(sample) * scale for head, sample in zip(self.controlnet_blocks, samples)]


def sum_controls(controls: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Several ControlNets' residual lists summed elementwise (diffusers' multi-ControlNet merge: it zips the lists,
    so the result has the length of the shortest)."""
    merged = list(controls[0])
    for other in controls[1:]:
        merged = [a + b for a, b in zip(merged, other)]
    return merged
