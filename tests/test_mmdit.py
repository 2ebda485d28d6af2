"""The MMDiT equals diffusers' SD3Transformer2DModel on the same weights; MoE behaves as docs/design.md says."""

import pytest
import torch

from workbench.models.mmdit import MMDiT, MMDiTConfig
from workbench.models.moe import FeedForward, MoEFeedForward, RoutingRecord

diffusers = pytest.importorskip("diffusers")

SD3_LIKE = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=48,
    caption_projection_dim=32,
    pooled_projection_dim=24,
    out_channels=16,
    pos_embed_max_size=48,
)
SD35_LIKE = {**SD3_LIKE, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}


def _inputs(batch=2, height=24, width=40, seq=7, config=SD3_LIKE):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, config["in_channels"], height, width, generator=g)
    text = torch.randn(batch, seq, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=g)
    timestep = torch.tensor([999.0, 312.5][:batch])
    return latents, text, pooled, timestep


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "weight" in name else 0.05))


@pytest.mark.parametrize("config", [SD3_LIKE, SD35_LIKE], ids=["sd3", "sd35"])
def test_transformer_equals_diffusers(config):
    reference = diffusers.SD3Transformer2DModel(**config).eval()
    _randomize(reference)
    ours = MMDiT(MMDiTConfig.from_dict(dict(reference.config))).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing and not unexpected
    latents, text, pooled, timestep = _inputs(config=config)
    with torch.no_grad():
        expected = reference(latents, text, pooled, timestep).sample
        got = ours(latents, text, pooled, timestep)
    assert got.shape == expected.shape == latents.shape
    # float32 rounding only: within 1e-5 of the output's scale (diffusers is itself ~1e-5 from a float64 run)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("config", [SD3_LIKE, SD35_LIKE], ids=["sd3", "sd35"])
def test_skip_layers_equal_diffusers(config):
    reference = diffusers.SD3Transformer2DModel(**config).eval()
    _randomize(reference)
    ours = MMDiT(MMDiTConfig.from_dict(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    latents, text, pooled, timestep = _inputs(config=config)
    with torch.no_grad():
        expected = reference(latents, text, pooled, timestep, skip_layers=[1]).sample
        got = ours(latents, text, pooled, timestep, skip_layers=[1])
        full = ours(latents, text, pooled, timestep)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (got - full).abs().max().item() > 1e-2 * full.abs().max().item()


def test_position_table_equals_diffusers_buffer():
    reference = diffusers.SD3Transformer2DModel(**SD3_LIKE)
    ours = MMDiT(MMDiTConfig(**SD3_LIKE))
    assert torch.allclose(ours.pos_embed.pos_embed, reference.pos_embed.pos_embed, atol=1e-6)


def test_attention_chunking_is_identical():
    model = MMDiT(MMDiTConfig(**SD35_LIKE)).eval()
    _randomize(model, 3)
    latents, text, pooled, timestep = _inputs(config=SD35_LIKE)
    with torch.no_grad():
        full = model(latents, text, pooled, timestep)
        model.set_attention_chunk_size(5)
        chunked = model(latents, text, pooled, timestep)
    assert (full - chunked).abs().max() <= 1e-6 * full.abs().max()  # float rounding of the attention kernel only


def test_too_large_latent_names_the_limit():
    model = MMDiT(MMDiTConfig(**SD3_LIKE))
    latents, text, pooled, timestep = _inputs(height=112, width=16)
    with pytest.raises(ValueError, match="pos_embed_max_size=48"):
        model(latents, text, pooled, timestep)


@pytest.mark.parametrize("top_k", [None, 2])
def test_moe_of_dense_copies_equals_dense(top_k):
    torch.manual_seed(0)
    dense = FeedForward(16)
    moe = MoEFeedForward.from_dense(dense, num_experts=4, top_k=top_k)
    torch.nn.init.normal_(moe.router.weight)
    x = torch.randn(2, 10, 16)
    assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_upcycled_mmdit_equals_dense_model():
    dense = MMDiT(MMDiTConfig(**SD3_LIKE)).eval()
    _randomize(dense, 5)
    moe_config = MMDiTConfig(**SD3_LIKE, moe_layers=(0, 2), moe_num_experts=3, moe_top_k=2)
    moe = MMDiT(moe_config).eval()
    state = dense.state_dict()
    for i in moe_config.moe_layers:
        for e in range(3):
            for key in ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"):
                state[f"transformer_blocks.{i}.ff.experts.{e}.{key}"] = state[f"transformer_blocks.{i}.ff.{key}"]
        for key in ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"):
            del state[f"transformer_blocks.{i}.ff.{key}"]
        state[f"transformer_blocks.{i}.ff.router.weight"] = torch.randn(3, 32)
    moe.load_state_dict(state, strict=True)
    inputs = _inputs()
    with torch.no_grad():
        assert torch.allclose(moe(*inputs), dense(*inputs), atol=1e-5)


def test_router_temperature_weights_and_topk():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, num_experts=4, top_k=2)
    tokens = torch.randn(50, 8)
    probs, gates = moe.gates(tokens)
    assert torch.allclose(probs.sum(-1), torch.ones(50), atol=1e-6)
    assert ((gates > 0).sum(-1) == 2).all()
    moe.set_controls([1, 1, 0, 1])
    probs, gates = moe.gates(tokens)
    assert (probs[:, 2] == 0).all() and (gates[:, 2] == 0).all()
    moe.set_controls(None, temperature=100.0)
    hot, _ = moe.gates(tokens)
    assert (hot.max(-1).values < 0.3).all()
    with pytest.raises(ValueError, match="expert_weights must have 4 values"):
        moe.set_controls([1, 2])
    with pytest.raises(ValueError, match="not all zero"):
        moe.set_controls([0, 0, 0, 0])
    with pytest.raises(ValueError, match="router_temperature"):
        moe.set_controls(None, temperature=0)


def test_load_balancing_loss_and_routing_record():
    config = MMDiTConfig(**SD3_LIKE, moe_layers=(1,), moe_num_experts=4)
    model = MMDiT(config)
    inputs = _inputs()
    model.train()
    model(*inputs)
    loss = model.aux_loss()
    assert loss.requires_grad and loss.item() >= 1.0 - 1e-5
    model.eval()
    record = RoutingRecord()
    model.record_routing(record)
    with torch.no_grad():
        for step in range(3):
            record.step = step
            model(*inputs)
    stacked = record.stacked()
    assert stacked.shape == (3, 1, 2, (24 // 2) * (40 // 2), 4)
    assert record.grid == (12, 20)
    assert torch.allclose(record.expert_share().sum(-1), torch.ones(1), atol=1e-2)
    top2 = record.token_share(2)
    assert top2.shape == (1, 4) and torch.allclose(top2.sum(-1), torch.ones(1))
    # Cross-check against an explicit count of each token's two highest gates.
    counts = torch.zeros(4)
    for gates in stacked.reshape(-1, 4):
        counts[gates.topk(2).indices] += 1
    assert torch.allclose(top2[0], counts / counts.sum())
    with pytest.raises(ValueError, match="no Mixture-of-Experts"):
        MMDiT(MMDiTConfig(**SD3_LIKE)).set_routing([1, 1])
