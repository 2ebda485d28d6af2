"""ONNX export of the MoE transformer: the dense-masked MoE form equals the routed one, the exported graph has
dynamic batch / height / width, and onnxruntime on CPU reproduces PyTorch (max |Δ| ≤ 1e-3) at the export size and
at another size."""

from __future__ import annotations

import pytest
import torch

from workbench import onnx_export
from workbench.loading import EMBEDDED_MODEL
from workbench.models.moe import MoEFeedForward

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """The shipped model; before it exists, a random full-size ShapesWorld model with perturbed (non-zero) output
    and sharp routers, so that top-2 routing really drops experts."""
    if (EMBEDDED_MODEL / "model_index.json").is_file():
        return str(EMBEDDED_MODEL)
    from tiny_sd3 import random_shapesworld

    from workbench.loading import save_pipeline

    pipe = random_shapesworld(micro=False, sharp_routers=True)
    return str(save_pipeline(pipe, tmp_path_factory.mktemp("random_shapesworld")))


@pytest.mark.parametrize("top_k, shared", [(2, False), (1, True), (None, False)])
def test_dense_masked_moe_equals_routed_moe(top_k, shared):
    torch.manual_seed(0)
    moe = MoEFeedForward(32, 4, top_k=top_k, shared_expert=shared).eval()
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    x = torch.randn(2, 10, 32)
    moe.set_controls([1.0, 0.5, 0.0, 2.0], temperature=0.7)
    with torch.no_grad():
        routed, dense = moe(x), onnx_export.DenseMaskedMoE(moe)(x)
    torch.testing.assert_close(dense, routed, atol=1e-5, rtol=1e-5)
    assert routed.abs().max() > 0.1


def test_export_friendly_swaps_and_restores():
    from workbench.models.mmdit import MMDiT
    from workbench.shapesworld.model import ShapesWorldSpec

    model = MMDiT(ShapesWorldSpec.micro().transformer_config())
    with onnx_export.export_friendly(model):
        assert isinstance(model.transformer_blocks[0].ff, onnx_export.DenseMaskedMoE)
    assert isinstance(model.transformer_blocks[0].ff, MoEFeedForward)


def test_export_onnx_command_matches_pytorch_at_two_sizes(tmp_path, model_path, capsys):
    from workbench import load_pipeline
    from workbench.__main__ import main

    out = tmp_path / "transformer.onnx"
    assert main(["export-onnx", "--model", model_path, "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    checks = [line for line in printed.splitlines() if line.startswith("check:")]
    assert len(checks) == 2 and all(line.endswith("(ok)") for line in checks), printed
    assert "batch 2, latents 12x20" in checks[1]
    assert "trtexec --onnx=" in printed and "--minShapes=latents:1x16x12x12" in printed

    graph = onnx.load(str(out), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["latents"] == ["batch", 16, "latent_height", "latent_width"]
    assert dims["encoder_hidden_states"][:2] == ["batch", "text_tokens"]
    assert not {n.op_type for n in graph.node} & {"NonZero"}

    model = load_pipeline(model_path).transformer
    inputs = onnx_export.example_inputs(model, 1, 16, 16, 48)
    with torch.no_grad():
        assert model(*inputs).std() > 1e-3, "the parity check would be vacuous on a zero-output model"
    results = onnx_export.check_onnx(out, model, [(1, 10, 14, 20)])
    assert results[0].passed and results[0].max_abs_diff <= onnx_export.TOLERANCE
    with torch.no_grad():
        model.proj_out.bias.add_(0.01)
    assert not onnx_export.check_onnx(out, model, [(1, 16, 16, 48)])[0].passed


def test_export_rejects_bad_arguments(tmp_path, model_path):
    from workbench.__main__ import main

    assert main(["export-onnx", "--model", model_path, "--out", str(tmp_path / "x.bin")]) == 2
    assert main(["export-onnx", "--model", model_path, "--out", str(tmp_path / "x.onnx"), "--height", "100"]) == 2
    with pytest.raises(ValueError, match="opset must be between 14 and 21"):
        onnx_export.export_transformer(torch.nn.Linear(2, 2), tmp_path / "y.onnx", 8, 8, 4, opset=11)


def test_dense_sd35_style_transformer_exports(tmp_path):
    from workbench.models.mmdit import MMDiT, MMDiTConfig

    config = MMDiTConfig(
        sample_size=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    torch.manual_seed(0)
    model = MMDiT(config).eval()
    path = onnx_export.export_transformer(model, tmp_path / "sd35.onnx", 8, 8, text_tokens=6)
    results = onnx_export.check_onnx(path, model, [(1, 8, 8, 6), (3, 6, 12, 9)])
    assert all(r.passed for r in results), [str(r) for r in results]
    assert onnx_export.remove_noop_casts(path) == 0
