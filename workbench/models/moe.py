"""Mixture-of-Experts feed-forward for the image stream of MMDiT blocks, and the routing record.

Conventions (docs/design.md, "MoE conventions"):

- ``logits = W·h`` (router without bias), ``p = softmax(logits / τ)`` with τ the router temperature.
- User expert weights ``w_e ≥ 0`` multiply ``p``; the result is renormalised to sum to one.
- Top-k keeps the k largest gates and renormalises them; ``top_k = None`` (or ``num_experts``) is soft routing.
- The output is ``Σ_e g_e · expert_e(h)`` plus an optional always-on shared expert.
- Defaults (``τ = 1``, all ``w_e = 1``) reproduce the trained behaviour exactly.

Experts are ordinary :class:`FeedForward` modules (diffusers' ``net.0.proj`` / ``net.2`` names), so a dense
checkpoint's feed-forward can be copied into every expert (sparse upcycling) and quantizers see plain ``nn.Linear``.
Each expert runs once per forward on the batch of tokens routed to it: a loop over experts, never over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class GELUProjection(nn.Module):
    """``Linear`` followed by tanh-approximated GELU; the ``net.0`` of diffusers' FeedForward."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Dense feed-forward ``dim → mult·dim → dim`` with parameter names ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GELUProjection(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


@dataclass
class RoutingRecord:
    """Routing probabilities collected during sampling, only when asked for.

    ``entries`` holds one dict per (block, step): ``block`` (index of the transformer block), ``step`` (sampler step
    index, set by the caller through :attr:`step`), ``gates`` (float16, shape ``(B, N, E)``: the routing distribution
    after temperature and user weights, before top-k) and ``grid`` (``(h, w)`` of the image tokens, so that token
    ``n`` sits at row ``n // w``, column ``n % w``).
    """

    step: int = 0
    grid: tuple[int, int] = (0, 0)
    entries: list[dict] = field(default_factory=list)

    def add(self, block: int, gates: torch.Tensor) -> None:
        self.entries.append(
            {"block": block, "step": self.step, "grid": self.grid, "gates": gates.detach().to("cpu", torch.float16)}
        )

    def blocks(self) -> list[int]:
        return sorted({e["block"] for e in self.entries})

    def steps(self) -> list[int]:
        return sorted({e["step"] for e in self.entries})

    def stacked(self, batch_index: int | None = None) -> torch.Tensor:
        """Gates as one float32 tensor ``(steps, blocks, B, N, E)`` (or ``(steps, blocks, N, E)`` for one image)."""
        blocks, steps = self.blocks(), self.steps()
        table = {(e["step"], e["block"]): e["gates"] for e in self.entries}
        out = torch.stack([torch.stack([table[(s, b)] for b in blocks]) for s in steps]).float()
        return out if batch_index is None else out[:, :, batch_index]

    def expert_share(self) -> torch.Tensor:
        """Mean gate of each expert per block, shape ``(blocks, E)``, averaged over steps, images and tokens."""
        return self.stacked().mean(dim=(0, 2, 3))

    def token_share(self, top_k: int) -> torch.Tensor:
        """Share of the routed token slots each expert receives per block, shape ``(blocks, E)``, rows summing to 1:
        every token goes to the ``top_k`` experts of highest gate, counted over steps, images and tokens."""
        gates = self.stacked()
        chosen = gates.topk(top_k, dim=-1).indices
        counts = F.one_hot(chosen, gates.shape[-1]).sum(dim=-2).float()
        return counts.mean(dim=(0, 2, 3)) / top_k


class MoEFeedForward(nn.Module):
    """Routed feed-forward with ``num_experts`` experts, optional top-k and shared expert.

    Input and output ``(B, N, dim)``. After a forward in training mode, :attr:`aux_loss` holds the Switch-style
    load-balancing loss ``E · Σ_e f_e · P_e`` (f: fraction of tokens whose first choice is e, P: mean probability).
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int | None = None, shared_expert: bool = False, mult: int = 4
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k if top_k is not None else num_experts
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList([FeedForward(dim, mult) for _ in range(num_experts)])
        self.shared_expert = FeedForward(dim, mult) if shared_expert else None
        self.register_buffer("expert_weights", torch.ones(num_experts), persistent=False)
        self.temperature = 1.0
        self.layer_index = -1
        self.recorder: RoutingRecord | None = None
        self.aux_loss: torch.Tensor | None = None

    @classmethod
    def from_dense(
        cls, dense: FeedForward, num_experts: int, top_k: int | None = None, noise: float = 0.0
    ) -> MoEFeedForward:
        """Sparse upcycling: every expert starts as a copy of ``dense``; ``noise`` perturbs the copies."""
        dim = dense.net[0].proj.in_features
        mult = dense.net[0].proj.out_features // dim
        moe = cls(dim, num_experts, top_k=top_k, mult=mult).to(dense.net[0].proj.weight)
        for expert in moe.experts:
            expert.load_state_dict(dense.state_dict())
            if noise:
                with torch.no_grad():
                    for p in expert.parameters():
                        p.add_(noise * p.std() * torch.randn_like(p))
        return moe

    def set_controls(self, expert_weights: Sequence[float] | None = None, temperature: float = 1.0) -> None:
        """Set user expert weights (``None`` = all ones) and router temperature; validates both."""
        if temperature <= 0:
            raise ValueError(f"router_temperature must be > 0, got {temperature}")
        if expert_weights is None:
            weights = torch.ones(self.num_experts)
        else:
            weights = torch.as_tensor(list(expert_weights), dtype=torch.float32)
            if weights.shape != (self.num_experts,):
                raise ValueError(
                    f"expert_weights must have {self.num_experts} values (one per expert), got {len(weights)}"
                )
            if (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"expert_weights must be >= 0 and not all zero, got {weights.tolist()}")
        self.expert_weights.copy_(weights.to(self.expert_weights.device))
        self.temperature = float(temperature)

    def gates(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing for ``tokens (T, dim)``: returns ``(probs, gates)``, both float32 ``(T, E)``.

        ``probs`` is the softmax after temperature and user weights (renormalised); ``gates`` keeps only the top-k
        entries, renormalised, and zeros elsewhere.
        """
        logits = self.router(tokens).float()
        probs = torch.softmax(logits / self.temperature, dim=-1)
        weights = self.expert_weights.to(probs.device)
        if not torch.all(weights == 1):
            probs = probs * weights
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.top_k == self.num_experts:
            return probs, probs
        top_values, top_index = probs.topk(self.top_k, dim=-1)
        top_values = top_values / top_values.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return probs, torch.zeros_like(probs).scatter(-1, top_index, top_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        tokens = x.reshape(-1, dim)
        probs, gates = self.gates(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            if self.top_k == self.num_experts:
                out = out + gates[:, e : e + 1].to(x.dtype) * expert(tokens)
                continue
            index = torch.nonzero(gates[:, e] > 0, as_tuple=True)[0]
            if index.numel():
                routed = expert(tokens.index_select(0, index)) * gates.index_select(0, index)[:, e : e + 1].to(x.dtype)
                out = out.index_add(0, index, routed)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        if self.training:
            first_choice = F.one_hot(probs.argmax(dim=-1), self.num_experts).float().mean(dim=0)
            self.aux_loss = self.num_experts * (first_choice * probs.mean(dim=0)).sum()
        if self.recorder is not None:
            self.recorder.add(self.layer_index, probs.view(batch, length, -1))
        return out.view(batch, length, dim)
