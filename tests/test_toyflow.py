"""The 2-D rectified-flow toy: targets, the straightness integral against closed forms, and reflow straightening."""

import math

import pytest
import torch
from torch import nn

from workbench import toyflow, viz


class ConstantField(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.7, -1.3]]).expand_as(x)


class RotationField(nn.Module):
    """``v(x) = ω·J·x``: paths are circular arcs of angle ω."""

    def __init__(self, omega: float) -> None:
        super().__init__()
        self.omega = omega

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.omega * torch.stack([-x[:, 1], x[:, 0]], dim=1)


def test_targets_are_deterministic_and_validated():
    a = toyflow.sample_target("moons", 64, torch.Generator().manual_seed(3))
    b = toyflow.sample_target("moons", 64, torch.Generator().manual_seed(3))
    assert a.shape == (64, 2) and torch.equal(a, b)
    ring = toyflow.sample_target("8gaussians", 2000, torch.Generator().manual_seed(0))
    assert ring.norm(dim=1).mean() == pytest.approx(2.0, abs=0.05)
    with pytest.raises(ValueError, match="target"):
        toyflow.sample_target("spirals", 4, torch.Generator())


def test_straightness_is_zero_for_a_constant_field():
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    paths = toyflow.sample_paths(ConstantField(), noise, steps=10)
    assert paths.shape == (11, 50, 2)
    assert torch.allclose(paths[-1], noise - torch.tensor([0.7, -1.3]), atol=1e-5)
    assert toyflow.straightness(ConstantField(), noise, steps=10) == pytest.approx(0.0, abs=1e-10)


def test_straightness_of_circular_arcs_matches_closed_form():
    omega = 1.2
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
    expected = float(noise.pow(2).sum(1).mean()) * (omega**2 - 2 + 2 * math.cos(omega))
    measured = toyflow.straightness(RotationField(omega), noise, steps=4000)
    assert measured == pytest.approx(expected, rel=2e-2)


def test_one_reflow_straightens_the_paths_and_helps_one_step_sampling():
    result = toyflow.run_toy("moons", train_steps=300, num_pairs=1500, ode_steps=40, num_eval=400)
    s = result["straightness"]
    assert s["reflow"] < 0.1 * s["independent"]
    assert result["distance"]["reflow"][1] < result["distance"]["independent"][1]
    assert result["paths"]["independent"].shape == (41, 400, 2)
    figure = viz.toy_flow_plot(
        [{"paths": result["paths"][k], "title": k, "straightness": s[k]} for k in ("independent", "reflow")],
        target=result["data"],
    )
    assert len(figure.axes) == 2 and "S = " in figure.axes[1].get_title()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="pairs"):
        toyflow.train_flow(steps=1, pairs=(torch.zeros(4, 2), torch.zeros(5, 2)))
    with pytest.raises(ValueError, match="steps"):
        toyflow.sample_paths(ConstantField(), torch.zeros(2, 2), steps=0)
    with pytest.raises(ValueError, match="paths"):
        viz.toy_flow_plot([{"paths": torch.zeros(3, 4), "title": "x"}])
