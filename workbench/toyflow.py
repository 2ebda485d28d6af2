"""A 2-D rectified-flow toy that trains in seconds on a CPU: why reflow straightens paths.

Same time convention as the image model (docs/design.md, "Time and tensors"): ``x_t = (1 − t)·x_data + t·noise``,
the network predicts ``v = noise − x_data``, sampling integrates from t = 1 (source: standard Gaussian) to t = 0
(target: two moons or eight Gaussians). Points are ``(n, 2)`` float32 tensors.

- :func:`train_flow` with ``pairs=None`` trains on the *independent coupling* (fresh noise and fresh data each
  batch): the learned field averages crossing straight lines, so its ODE paths curve.
- :func:`reflow_pairs` pairs noise with the model's own samples; retraining on those fixed pairs (one *reflow*,
  Liu et al. 2022) gives a field whose paths are nearly straight, so few Euler steps suffice.
- :func:`straightness` is ``S = ∫₀¹ E‖(x₁ − x₀) − v(x_t, t)‖² dt`` along the model's ODE paths (x₁ noise, x₀ the
  path's end), computed with a Riemann sum over the integration steps; 0 means every path is a straight line
  traversed at constant speed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("moons", "8gaussians")


def sample_target(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points ``(n, 2)`` of a target distribution, scaled to about unit spread.

    ``moons``: two interleaved half circles with noise 0.05, centred; ``8gaussians``: eight Gaussians (std 0.1) on a
    circle of radius 2.
    """
    if name not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {name!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if name == "8gaussians":
        index = torch.randint(0, 8, (n,), generator=generator)
        angle = index.float() * (2 * math.pi / 8)
        centres = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
        return centres + 0.1 * torch.randn(n, 2, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x - 0.5, y - 0.25], 1) * 1.6
    return points + 0.05 * 1.6 * torch.randn(n, 2, generator=generator)


class VelocityMLP(nn.Module):
    """``v(x, t)``: an MLP on ``[x, t, sin/cos(2πk·t) for k = 1..3]`` with SiLU, ``hidden`` wide, 3 hidden layers."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 + 7, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1).expand(x.shape[0], 1)
        k = torch.arange(1, 4, dtype=x.dtype, device=x.device) * (2 * math.pi)
        features = torch.cat([x, t, torch.sin(t * k), torch.cos(t * k)], dim=1)
        return self.net(features)


def train_flow(
    target: str = "moons",
    steps: int = 1500,
    batch_size: int = 512,
    lr: float = 2e-3,
    hidden: int = 128,
    seed: int = 0,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    init: VelocityMLP | None = None,
) -> VelocityMLP:
    """Fit ``v(x_t, t) ≈ noise − data`` by least squares with Adam (cosine-decayed learning rate).

    ``pairs=None``: independent coupling, noise and ``target`` data drawn independently every batch. ``pairs =
    (noise, data)``, both ``(n, 2)``: a fixed coupling (reflow), minibatches drawn from those rows. ``init`` starts
    from a copy of an existing model (as reflow usually does); otherwise a fresh model seeded by ``seed``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if pairs is not None and (pairs[0].shape != pairs[1].shape or pairs[0].dim() != 2 or pairs[0].shape[1] != 2):
        raise ValueError(f"pairs must be two (n, 2) tensors, got {tuple(pairs[0].shape)} and {tuple(pairs[1].shape)}")
    if pairs is None:
        sample_target(target, 1, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VelocityMLP(hidden)
    if init is not None:
        model.load_state_dict(init.state_dict())
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    model.train()
    for _ in range(steps):
        if pairs is None:
            data = sample_target(target, batch_size, generator)
            noise = torch.randn(batch_size, 2, generator=generator)
        else:
            rows = torch.randint(0, pairs[0].shape[0], (batch_size,), generator=generator)
            noise, data = pairs[0][rows], pairs[1][rows]
        t = torch.rand(batch_size, 1, generator=generator)
        x_t = (1 - t) * data + t * noise
        loss = (model(x_t, t) - (noise - data)).pow(2).sum(1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    return model


def sample_paths(model: nn.Module, noise: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Euler ODE paths from ``noise`` (t = 1) to samples (t = 0) on a uniform grid: ``(steps + 1, n, 2)``."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    times = torch.linspace(1.0, 0.0, steps + 1)
    x = noise.float()
    path = [x]
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            x = x + (t_next - t) * model(x, t.expand(1))
            path.append(x)
    return torch.stack(path)


def straightness(model: nn.Module, noise: torch.Tensor, steps: int = 100) -> float:
    """``S = ∫₀¹ E‖(x₁ − x₀) − v(x_t, t)‖² dt`` along the model's Euler paths from ``noise`` (x₁) to their ends (x₀),
    as ``Σ_i Δt · mean_n ‖chord_n − v(x_{t_i}, t_i)‖²``. The squared norm sums the two coordinates."""
    path = sample_paths(model, noise, steps)
    chord = path[0] - path[-1]
    times = torch.linspace(1.0, 0.0, steps + 1)
    total = 0.0
    with torch.no_grad():
        for i in range(steps):
            v = model(path[i], times[i].expand(1))
            total += float((times[i] - times[i + 1]) * (chord - v).pow(2).sum(1).mean())
    return total


def reflow_pairs(model: nn.Module, n: int, seed: int = 1, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise, samples)``: ``n`` fresh Gaussian points and where the model's ODE carries them (reflow coupling)."""
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return noise, sample_paths(model, noise, steps)[-1]


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two point clouds ``(n, 2)`` and ``(m, 2)`` (quantiles on a common grid)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(projections, 2, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    levels = torch.linspace(0.005, 0.995, 100)
    qa = torch.quantile(a.float() @ directions.T, levels, dim=0)
    qb = torch.quantile(b.float() @ directions.T, levels, dim=0)
    return float((qa - qb).abs().mean())


def run_toy(
    target: str = "moons",
    train_steps: int = 1500,
    reflow_steps: int | None = None,
    num_pairs: int = 4000,
    ode_steps: int = 100,
    num_eval: int = 1000,
    seed: int = 0,
) -> dict:
    """Independent-coupling training, then one reflow, with straightness and sample quality of both.

    Returns {"target", "independent": model, "reflow": model, "noise": evaluation noise (num_eval, 2), "data":
    target points (num_eval, 2), "paths": {name: (ode_steps + 1, num_eval, 2)}, "straightness": {name: S},
    "distance": {name: {euler steps: sliced W1 of the samples to the data}} for 1, 2, 4 and ``ode_steps`` steps}.
    """
    independent = train_flow(target, train_steps, seed=seed)
    pairs = reflow_pairs(independent, num_pairs, seed=seed + 1, steps=ode_steps)
    reflowed = train_flow(target, reflow_steps or train_steps, seed=seed + 2, pairs=pairs, init=independent)
    generator = torch.Generator().manual_seed(seed + 3)
    noise = torch.randn(num_eval, 2, generator=generator)
    data = sample_target(target, num_eval, generator)
    models = {"independent": independent, "reflow": reflowed}
    result: dict = {"target": target, **models, "noise": noise, "data": data, "paths": {}, "straightness": {}}
    result["distance"] = {}
    for name, model in models.items():
        result["paths"][name] = sample_paths(model, noise, ode_steps)
        result["straightness"][name] = straightness(model, noise, ode_steps)
        result["distance"][name] = {
            k: sliced_wasserstein(sample_paths(model, noise, k)[-1], data) for k in sorted({1, 2, 4, ode_steps})
        }
    return result
