"""Heun and DPM++ 2M against diffusers' schedulers on the same sigmas, and every sampler's order of convergence on an
analytic flow (Gaussian data, whose velocity field and exact flow map are known in closed form)."""

import math

import numpy as np
import pytest
import torch

from workbench import flow, load_pipeline

diffusers = pytest.importorskip("diffusers")

MU, SCALE = 2.0, 0.3
"""The data distribution N(MU, SCALE²) per coordinate; noise is N(0, 1)."""


def gaussian_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact rectified-flow velocity ``E[noise − x_data | x_σ]`` for Gaussian data (docs/design.md, "Time and
    tensors"): ``x̂0 = MU + (1 − σ)·SCALE²/var·(x − (1 − σ)·MU)`` with ``var = (1 − σ)²·SCALE² + σ²``."""
    s = float(sigma)
    var = (1 - s) ** 2 * SCALE**2 + s**2
    x0 = MU + (1 - s) * SCALE**2 / var * (x - (1 - s) * MU)
    return (x - x0) / s


def exact_flow(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The ODE's flow map: ``x_σ = (1 − σ)·MU + sqrt((1 − σ)²·SCALE² + σ²)·ε`` along each path."""

    def spread(s: float) -> float:
        return math.sqrt((1 - s) ** 2 * SCALE**2 + s**2)

    eps = (x - (1 - sigma_from) * MU) / spread(sigma_from)
    return (1 - sigma_to) * MU + spread(sigma_to) * eps


def _noise(shape=(4, 16), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


def _velocity_f32(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return gaussian_velocity(x.double(), sigma).float()


def test_heun_equals_diffusers_flow_match_heun():
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    sigmas = scheduler.sigmas  # [s0, s1, s1, s2, s2, …, 0]: one entry per model evaluation
    distinct = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
    assert torch.equal(distinct, flow.sigma_schedule(6, 3.0))  # the same schedule as our default
    x = _noise()
    for t in scheduler.timesteps:
        x = scheduler.step(_velocity_f32(x, float(t) / 1000), t, x).prev_sample
    ours = flow.sample(_velocity_f32, _noise(), distinct, "heun")
    assert (ours - x).abs().max() < 1e-5


@pytest.mark.parametrize("grid", ["diffusers", "ours from sigma 1"])
def test_dpmpp_2m_equals_diffusers_dpm_solver_multistep(grid):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(8)
    if grid != "diffusers":
        scheduler.sigmas = flow.sigma_schedule(8, 3.0)
        scheduler.timesteps = scheduler.sigmas[:-1] * 1000
    x = _noise()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(_velocity_f32(x, float(scheduler.sigmas[i])), t, x).prev_sample
    ours = flow.sample(_velocity_f32, _noise(), scheduler.sigmas, "dpmpp_2m")
    assert (ours - x).abs().max() < 1e-5


def test_dpmpp_2m_is_first_order_for_two_steps_from_sigma_1():
    """λ = log((1 − σ)/σ) is −∞ at σ = 1, so the step after it has no finite previous step to extrapolate from:
    steps 1 and 2 are first order (DDIM, which for a flow is Euler's step), as in diffusers on the same sigmas
    (:func:`test_dpmpp_2m_equals_diffusers_dpm_solver_multistep`); from σ < 1, step 2 is second order."""
    for start, second_order in ((1.0, False), (0.95, True)):
        sigmas = torch.tensor([start, 0.8, 0.6])
        ours = flow.sample(_velocity_f32, _noise(), sigmas, "dpmpp_2m")
        first_order = flow.sample(_velocity_f32, _noise(), sigmas, "euler")
        assert torch.allclose(ours, first_order, atol=1e-6) is not second_order
        one_step = flow.sample(_velocity_f32, _noise(), sigmas[:2], "dpmpp_2m")
        assert torch.allclose(one_step, flow.sample(_velocity_f32, _noise(), sigmas[:2], "euler"), atol=1e-6)


def _orders(errors: list[float]) -> list[float]:
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2)])
def test_euler_and_heun_converge_at_their_order(sampler, order):
    noise = _noise(dtype=torch.float64)
    errors = []
    for steps in (32, 64, 128, 256):
        sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        out = flow.sample(gaussian_velocity, noise, sigmas, sampler).double()
        errors.append(float((out - exact_flow(noise, 1.0, 0.0)).abs().max()))
    assert all(abs(measured - order) < 0.15 for measured in _orders(errors)), _orders(errors)


def test_dpmpp_2m_converges_at_second_order_on_a_log_snr_grid():
    """DPM-Solver++(2M) is second order in the log-SNR λ; on a uniform λ grid between σ = 0.98 and 0.02 (finite λ
    at both ends) the error falls by 4× per halving of the step, where Euler's falls by 2×."""
    start, end = 0.98, 0.02
    x_start = exact_flow(_noise(dtype=torch.float64), 1.0, start)
    target = exact_flow(x_start, start, end)
    errors: dict[str, list[float]] = {"dpmpp_2m": [], "euler": []}
    for steps in (16, 32, 64, 128):
        lam = np.linspace(math.log((1 - start) / start), math.log((1 - end) / end), steps + 1)
        sigmas = torch.from_numpy(1 / (1 + np.exp(lam)))
        for sampler, found in errors.items():
            out = flow.sample(gaussian_velocity, x_start, sigmas, sampler).double()
            found.append(float((out - target).abs().max()))
    assert all(1.8 < order < 2.3 for order in _orders(errors["dpmpp_2m"])), _orders(errors["dpmpp_2m"])
    assert all(0.8 < order < 1.2 for order in _orders(errors["euler"])), _orders(errors["euler"])


def test_heun_pipeline_equals_diffusers_pipeline_with_the_heun_scheduler(tiny_sd3_folder):
    folder, reference = tiny_sd3_folder
    heun = diffusers.StableDiffusion3Pipeline(
        **{**reference.components, "scheduler": diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)}
    )
    kwargs = dict(height=32, width=32, num_inference_steps=4, guidance_scale=3.0, max_sequence_length=32)
    prompt = "a red circle at the top left on a white background"
    expected = heun(prompt, generator=torch.Generator("cpu").manual_seed(2), **kwargs).images[0]
    got = load_pipeline(folder)(prompt, seed=2, sampler="heun", **kwargs).images[0]
    assert np.abs(np.asarray(got, np.int16) - np.asarray(expected, np.int16)).max() <= 2
