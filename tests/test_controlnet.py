"""SD3 ControlNets: the model against diffusers' SD3ControlNetModel, the residual hook in MMDiT.forward, the pipeline
against StableDiffusion3ControlNetPipeline on tiny random weights, and the single-file key mapping."""

from __future__ import annotations

import pytest
import torch

from workbench.models.controlnet import ControlNetConfig, SD3ControlNet
from workbench.models.mmdit import MMDiT, MMDiTConfig, control_block_index

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=32, patch_size=2, in_channels=16, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, pooled_projection_dim=64, out_channels=16)  # fmt: skip
SD3_LAYOUT = dict(joint_attention_dim=32, pos_embed_max_size=32)
SD35_LAYOUT = dict(joint_attention_dim=None, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
                   force_zeros_for_pooled_projection=False)  # fmt: skip


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add N(0, 0.1²) noise to every parameter (diffusers zero-initialises the ControlNet's output heads)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def reference_controlnet(layout: str, num_layers: int, seed: int = 0, **overrides):
    """A random diffusers SD3ControlNetModel of the tiny size: ``layout`` "sd3" (own pos_embed, joint blocks) or
    "sd35" (image-only blocks, the transformer's pos_embed)."""
    torch.manual_seed(seed)
    config = {**TINY, **(SD3_LAYOUT if layout == "sd3" else SD35_LAYOUT), "num_layers": num_layers, **overrides}
    return _perturbed(diffusers.SD3ControlNetModel(**config), seed)


@pytest.mark.parametrize(("layout", "num_layers"), [("sd3", 1), ("sd3", 2), ("sd35", 2)])
def test_controlnet_and_residuals_equal_diffusers(layout, num_layers):
    torch.manual_seed(5)
    transformer = _perturbed(diffusers.SD3Transformer2DModel(**TINY, num_layers=3, joint_attention_dim=32,
                                                               pos_embed_max_size=32), 1)  # fmt: skip
    reference = reference_controlnet(layout, num_layers, seed=2)
    ours = SD3ControlNet(ControlNetConfig.from_dict(dict(reference.config)))
    ours.load_state_dict(reference.state_dict(), strict=True)
    mmdit = MMDiT(MMDiTConfig.from_dict(dict(transformer.config)))
    mmdit.load_state_dict(transformer.state_dict(), strict=True)
    if layout == "sd35":
        reference.pos_embed = reference._get_pos_embed_from_transformer(transformer)
    g = torch.Generator().manual_seed(0)
    x, control = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 16, 8, 6, generator=g)
    text, pooled, t = torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g), torch.tensor([500.0, 30.0])
    with torch.no_grad():
        expected = reference(hidden_states=x, controlnet_cond=control, conditioning_scale=0.7, timestep=t,
                             encoder_hidden_states=text if layout == "sd3" else None, pooled_projections=pooled,
                             return_dict=False)[0]  # fmt: skip
        got = ours(x, control, text, pooled, t, 0.7, pos_embed=mmdit.pos_embed)
        assert len(got) == len(expected) == num_layers
        for a, b in zip(got, expected):
            assert (a - b).abs().max() < 1e-5
        expected_v = transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                                 block_controlnet_hidden_states=expected, return_dict=False)[0]  # fmt: skip
        got_v = mmdit(x, text, pooled, t, block_controls=got)
        assert (got_v - expected_v).abs().max() < 1e-5
        assert (mmdit(x, text, pooled, t) - expected_v).abs().max() > 1e-2  # the residuals changed the output


def test_control_block_index_spreads_fewer_residuals():
    assert [control_block_index(i, 24, 12) for i in range(24)] == [i // 2 for i in range(24)]
    assert [control_block_index(i, 3, 2) for i in range(3)] == [0, 0, 1]
    assert [control_block_index(i, 4, 4) for i in range(4)] == [0, 1, 2, 3]


def test_controlnet_config_refuses_a_mismatched_caption_width():
    config = ControlNetConfig(**TINY, **SD3_LAYOUT, num_layers=1)
    config.caption_projection_dim = 16
    with pytest.raises(ValueError, match=r"caption_projection_dim \(16\).*\(32\)"):
        SD3ControlNet(config)
