"""MMDiT for the SD3 / SD3.5 family, with optional Mixture-of-Experts feed-forward in the image stream.

Parameter names follow diffusers' ``SD3Transformer2DModel`` so a diffusers ``transformer/`` folder loads without
renaming. Shapes: latents ``(B, C, H, W)`` with H, W multiples of ``patch_size``; text tokens
``(B, L, joint_attention_dim)``; pooled text ``(B, pooled_projection_dim)``; timestep ``(B,)`` = 1000·sigma.
Inside a block the image stream holds ``N = (H/p)·(W/p)`` tokens and the text stream ``L`` tokens, both of width
``dim = heads · head_dim``. Joint attention runs over ``[image tokens, text tokens]`` in that order.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.moe import FeedForward, MoEFeedForward, RoutingRecord

if TYPE_CHECKING:
    from workbench.step_cache import StepCache

DENSE_CLASS_NAME = "SD3Transformer2DModel"
MOE_CLASS_NAME = "WorkbenchMoESD3Transformer2DModel"


@dataclass
class MMDiTConfig:
    """Transformer hyper-parameters; the first block of fields are diffusers' config.json keys.

    The ``moe_*`` fields are this workbench's extension: ``moe_layers`` lists the blocks whose image-stream
    feed-forward is a :class:`MoEFeedForward` with ``moe_num_experts`` experts and ``moe_top_k`` routing
    (``None`` = soft routing over all experts).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    moe_layers: tuple[int, ...] = ()
    moe_num_experts: int = 0
    moe_top_k: int | None = None
    moe_shared_expert: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_experts(self) -> bool:
        return bool(self.moe_layers) and self.moe_num_experts > 0

    @classmethod
    def from_dict(cls, data: dict) -> MMDiTConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("dual_attention_layers", "moe_layers"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key] or ())
        extra = {k: v for k, v in data.items() if k not in known and not k.startswith("_")}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        data["dual_attention_layers"] = list(self.dual_attention_layers)
        data["moe_layers"] = list(self.moe_layers)
        if not self.has_experts:
            for key in ("moe_layers", "moe_num_experts", "moe_top_k", "moe_shared_expert"):
                data.pop(key)
        data["_class_name"] = MOE_CLASS_NAME if self.has_experts else DENSE_CLASS_NAME
        return {**self.extra, **data}


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding ``(M, dim)`` of positions ``(M,)``: ``[sin(p·ω), cos(p·ω)]``, ω = 10000^(-2i/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.outer(positions.reshape(-1).double(), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_table(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """SD3's 2-D position table ``(grid_size², dim)``, row-major; half the channels encode y, half x."""
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, grid_x), sincos_1d(dim // 2, grid_y)], dim=1)
    return table.float()


def timestep_embedding(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of ``timesteps (B,)``, cosine half first (diffusers' flip_sin_to_cos)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned scale, computed in float32 (qk-norm of SD3.5)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x.float() * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            return x.to(self.weight.dtype) * self.weight
        return (x * self.weight).to(dtype)


class PatchEmbed(nn.Module):
    """Latents ``(B, C, H, W)`` → tokens ``(B, (H/p)(W/p), dim)`` plus the centre-cropped position table."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.patch_size = p
        self.max_size = config.pos_embed_max_size
        self.proj = nn.Conv2d(config.in_channels, config.inner_dim, kernel_size=p, stride=p)
        table = sincos_2d_table(config.inner_dim, self.max_size, config.sample_size // p)
        self.register_buffer("pos_embed", table.unsqueeze(0), persistent=True)

    def cropped_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        top, left = (self.max_size - grid_h) // 2, (self.max_size - grid_w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)
        return table[:, top : top + grid_h, left : left + grid_w, :].reshape(1, grid_h * grid_w, -1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        if grid_h > self.max_size or grid_w > self.max_size:
            raise ValueError(
                f"latent grid {grid_h}x{grid_w} exceeds pos_embed_max_size={self.max_size} "
                f"(largest image side: {self.max_size * self.patch_size * 8} px)"
            )
        # The stride-p convolution as one matmul over flattened patches (c, py, px): tokens come out contiguous.
        batch, channels = latents.shape[:2]
        p = self.patch_size
        patches = latents.reshape(batch, channels, grid_h, p, grid_w, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, grid_h * grid_w, channels * p * p)
        tokens = F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
        return (tokens + self.cropped_table(grid_h, grid_w)).to(tokens.dtype)


class MLPEmbedder(nn.Module):
    """``linear_1 → SiLU → linear_2``; diffusers' TimestepEmbedding / PixArtAlphaTextProjection names."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Conditioning vector ``(B, dim)`` = MLP(sin-cos(timestep)) + MLP(pooled text)."""

    def __init__(self, dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        return t + self.text_embedder(pooled)


class Modulation(nn.Module):
    """adaLN: ``SiLU → Linear(dim, n·dim)`` split into n vectors ``(B, dim)``; the LayerNorm has no affine."""

    def __init__(self, dim: int, count: int) -> None:
        super().__init__()
        self.count = count
        self.linear = nn.Linear(dim, count * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def params(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(cond)).chunk(self.count, dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x · (1 + scale) + shift`` for ``x (B, N, D)`` and per-sample ``shift, scale (B, D)``, in one pass."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + gate · update`` for ``x, update (B, N, D)`` and a per-sample ``gate (B, D)``, in one pass."""
    return torch.addcmul(x, gate[:, None], update)


class AdaLayerNormZero(Modulation):
    """Six modulation vectors; returns the modulated input and (gate_msa, shift_mlp, scale_mlp, gate_mlp)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.params(cond)
        return modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroX(Modulation):
    """SD3.5 MMDiT-X: nine vectors; a second modulated input and gate for the image self-attention."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 9)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2 = self.params(cond)
        normed = self.norm(x)
        return (
            modulate(normed, shift_msa, scale_msa),
            gate_msa,
            shift_mlp,
            scale_mlp,
            gate_mlp,
            modulate(normed, shift2, scale2),
            gate2,
        )


class AdaLayerNormContinuous(Modulation):
    """Two vectors, (scale, shift) in that order; used by the final layer and the last block's text stream."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.params(cond)
        return modulate(self.norm(x), shift, scale)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Scaled dot-product attention over ``(B, heads, S, head_dim)``; queries in chunks to bound peak memory."""
    if not chunk_size or q.shape[2] <= chunk_size:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [F.scaled_dot_product_attention(q[:, :, i : i + chunk_size], k, v) for i in range(0, q.shape[2], chunk_size)],
        dim=2,
    )


class Attention(nn.Module):
    """Multi-head attention with diffusers' names; with ``context`` it is the joint (image + text) attention.

    ``context_pre_only`` drops the text output projection (the last block's text stream is not used afterwards).
    """

    def __init__(self, dim: int, heads: int, qk_norm: str | None, joint: bool, context_pre_only: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.chunk_size: int | None = None
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {qk_norm!r}")
        head_dim = dim // heads
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        self.context_pre_only = context_pre_only
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None
            self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)

    def _qkv(self, x: torch.Tensor, q_proj, k_proj, v_proj, norm_q, norm_k) -> tuple[torch.Tensor, ...]:
        q, k, v = self._heads(q_proj(x)), self._heads(k_proj(x)), self._heads(v_proj(x))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is None:
            return self.to_out[0](self._merge(chunked_attention(q, k, v, self.chunk_size), q.dtype))
        cq, ck, cv = self._qkv(
            context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
        )
        # Joint attention over [image; text] keys, with the image and text queries attended separately: the same
        # result as one call on the concatenated queries, without slicing the output apart, and the text queries
        # are skipped where their output is not used (the last block).
        k, v = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        image = self.to_out[0](self._merge(chunked_attention(q, k, v, self.chunk_size), q.dtype))
        if self.to_add_out is None:
            return image, None
        return image, self.to_add_out(self._merge(chunked_attention(cq, k, v, self.chunk_size), q.dtype))

    @staticmethod
    def _merge(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, heads, S, head_dim)`` → ``(B, S, heads·head_dim)``."""
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1).to(dtype)


class JointTransformerBlock(nn.Module):
    """One MMDiT block: joint attention of both streams, then separate (optionally routed) feed-forwards."""

    def __init__(self, config: MMDiTConfig, index: int) -> None:
        super().__init__()
        dim = config.inner_dim
        self.context_pre_only = index == config.num_layers - 1
        self.use_dual_attention = index in config.dual_attention_layers
        self.norm1 = AdaLayerNormZeroX(dim) if self.use_dual_attention else AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim) if self.context_pre_only else AdaLayerNormZero(dim)
        heads = config.num_attention_heads
        self.attn = Attention(dim, heads, config.qk_norm, joint=True, context_pre_only=self.context_pre_only)
        self.attn2 = Attention(dim, heads, config.qk_norm, joint=False) if self.use_dual_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        if config.has_experts and index in config.moe_layers:
            self.ff: nn.Module = MoEFeedForward(
                dim, config.moe_num_experts, config.moe_top_k, shared_expert=config.moe_shared_expert
            )
            self.ff.layer_index = index
        else:
            self.ff = FeedForward(dim)
        if not self.context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.use_dual_attention:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp, normed2, gate_msa2 = self.norm1(x, cond)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, cond)
        if self.context_pre_only:
            context_normed = self.norm1_context(context, cond)
        else:
            context_normed, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, cond)

        attn_image, attn_text = self.attn(normed, context_normed)
        x = gated_residual(x, gate_msa, attn_image)
        if self.attn2 is not None:
            x = gated_residual(x, gate_msa2, self.attn2(normed2))
        x = gated_residual(x, gate_mlp, self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp)))

        if self.context_pre_only:
            return x, None
        context = gated_residual(context, c_gate_msa, attn_text)
        ff_text = self.ff_context(modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp))
        return x, gated_residual(context, c_gate_mlp, ff_text)


def control_block_index(block: int, num_blocks: int, num_controls: int) -> int:
    """Which of ``num_controls`` ControlNet residuals transformer block ``block`` (of ``num_blocks``) receives:
    diffusers' ``int(block / (num_blocks / num_controls))``, so a ControlNet with fewer layers spreads each residual
    over consecutive blocks (12 residuals on 24 blocks: blocks 2k and 2k+1 get residual k)."""
    return int(block / (num_blocks / num_controls))


class MMDiT(nn.Module):
    """The SD3-family transformer: predicts the flow velocity ``v = noise − data`` for latents ``(B, C, H, W)``."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = TimeTextEmbed(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([JointTransformerBlock(config, i) for i in range(config.num_layers)])
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)
        self.routing_record: RoutingRecord | None = None
        self.step_cache: StepCache | None = None  # set by the pipeline for one generation (cache_threshold)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype if hasattr(self.proj_out, "weight") else torch.float32

    @property
    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ff for b in self.transformer_blocks if isinstance(b.ff, MoEFeedForward)]

    def set_routing(
        self,
        expert_weights: Sequence[float] | dict[int, Sequence[float]] | None = None,
        temperature: float = 1.0,
    ) -> None:
        """Steer the routers: one weight per expert for every MoE block, or ``{block index: weights}``."""
        layers = self.moe_layers
        if expert_weights is not None and not layers:
            raise ValueError("expert_weights was given but this model has no Mixture-of-Experts layers")
        if isinstance(expert_weights, dict):
            unknown = sorted(set(expert_weights) - {m.layer_index for m in layers})
            if unknown:
                raise ValueError(
                    f"expert_weights names blocks {unknown}, but the MoE blocks are {[m.layer_index for m in layers]}"
                )
        for moe in layers:
            weights = expert_weights.get(moe.layer_index) if isinstance(expert_weights, dict) else expert_weights
            moe.set_controls(weights, temperature)

    def record_routing(self, record: RoutingRecord | None) -> None:
        """Attach (or detach with ``None``) a record that every MoE block appends its routing to."""
        self.routing_record = record
        for moe in self.moe_layers:
            moe.recorder = record

    def set_attention_chunk_size(self, chunk_size: int | None) -> None:
        """Compute attention in query chunks of this many tokens (``None``: in one piece); the same results up to float
        rounding (the attention kernel sums in another order)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.chunk_size = chunk_size

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last training forward (0 for a dense model)."""
        losses = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        skip_layers: Collection[int] = (),
        block_controls: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Velocity ``(B, out_channels, H, W)`` for latents ``(B, in_channels, H, W)`` at ``timestep (B,)``; the
        blocks whose indices are in ``skip_layers`` are bypassed (both streams pass through unchanged).
        ``block_controls``: ControlNet residuals ``(B, N, dim)`` added to the image stream after each block but the
        last (also after a skipped one), block i getting :func:`control_block_index` (diffusers' semantics)."""
        height, width = latents.shape[-2:]
        p = self.config.patch_size
        if self.routing_record is not None:
            self.routing_record.grid = (height // p, width // p)
        x = self.pos_embed(latents)
        cond = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        cache, tokens = (None if skip_layers else self.step_cache), x  # step caching: workbench.step_cache
        reused = cache.reuse(x, lambda: self.transformer_blocks[0].norm1(x, cond)[0]) if cache is not None else None
        for index, block in enumerate(self.transformer_blocks if reused is None else ()):
            if index not in skip_layers:
                x, context = block(x, context, cond)
            if block_controls and not block.context_pre_only:
                x = x + block_controls[control_block_index(index, len(self.transformer_blocks), len(block_controls))]
        if cache is not None:
            x = reused if reused is not None else cache.store(tokens, x)
        x = self.proj_out(self.norm_out(x, cond))
        h, w = height // p, width // p
        x = x.reshape(x.shape[0], h, w, p, p, self.config.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.config.out_channels, h * p, w * p)
