"""Deepening a trained ShapesWorld transformer keeps its output and resumes training at the new depth."""

import json

import pytest
import torch

from workbench import load_pipeline
from workbench.loading import save_pipeline
from workbench.shapesworld.export import export_run
from workbench.shapesworld.grow import deepen, new_block_positions
from workbench.shapesworld.model import ShapesWorldSpec, build_pipeline
from workbench.shapesworld.train import seed_run_from_model


def _velocity(transformer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    latents = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 5, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        return transformer(latents, text, pooled, torch.tensor([250.0, 750.0]))


def test_new_blocks_go_between_the_old_ones_and_never_after_the_last():
    assert new_block_positions(6, 9) == [0, 1, 3, 4, 6, 8]
    assert new_block_positions(6, 6) == list(range(6))
    for old, new in [(2, 3), (6, 12), (5, 7)]:
        positions = new_block_positions(old, new)
        assert positions[0] == 0 and positions[-1] == new - 1 and positions == sorted(set(positions))
    with pytest.raises(ValueError, match="depth must be"):
        new_block_positions(6, 4)


def test_deepened_transformer_computes_the_same_velocity():
    spec = ShapesWorldSpec.micro()
    transformer = build_pipeline(spec, seed=0).transformer
    for parameter in transformer.parameters():  # trained-looking weights: no zero gates anywhere
        parameter.data.normal_(0, 0.05)
    grown_spec, grown = deepen(spec, transformer, 4)
    assert grown_spec.depth == 4 and len(grown.transformer_blocks) == 4
    assert grown_spec.moe_layers == (0,) and grown.transformer_blocks[0].ff.num_experts == spec.num_experts
    expected = _velocity(transformer)
    torch.testing.assert_close(_velocity(grown), expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 0.1, "a model that outputs zeros would hide a broken copy"
    # the new blocks are real blocks: moving one of their gates changes the output
    grown.transformer_blocks[1].norm1.linear.bias.data.fill_(0.5)
    assert (_velocity(grown) - expected).abs().max() > 1e-3


def test_seeding_a_run_with_grow_depth_records_the_spec_and_exports_the_deeper_model(tmp_path):
    spec = ShapesWorldSpec.micro()
    model = tmp_path / "model"
    pipe = build_pipeline(spec, seed=0)
    for parameter in pipe.transformer.parameters():
        parameter.data.normal_(0, 0.05)
    save_pipeline(pipe, model, extra={"name": "micro", "training_step": 7})
    run = tmp_path / "run"
    assert seed_run_from_model(model, run, spec=spec, depth=3) == 7
    assert json.loads((run / "spec.json").read_text())["depth"] == 3
    assert ShapesWorldSpec.for_run(run).depth == 3
    folder = export_run(run, tmp_path / "grown", layouts_from=None)
    grown = load_pipeline(folder)
    assert len(grown.transformer.transformer_blocks) == 3
    expected = _velocity(pipe.transformer)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(_velocity(grown.transformer), expected, rtol=1e-3, atol=1e-3)
