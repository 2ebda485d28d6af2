"""Export the MMDiT transformer to ONNX with dynamic batch, latent height / width and text length, and check the
export against PyTorch with onnxruntime on CPU.

Graph interface (float32)::

    latents                (batch, 16, height/8, width/8)   scaled latents x_t
    encoder_hidden_states  (batch, text_tokens, joint_attention_dim)
    pooled_projections     (batch, pooled_projection_dim)
    timestep               (batch,)                          1000·sigma
    → velocity             (batch, 16, height/8, width/8)   v = noise − data

The exporter is torch's TorchScript one (``torch.onnx.export(dynamo=False)``). Routed MoE layers compute each
expert on the tokens routed to it (``nonzero`` / ``index_select`` / ``index_add``); traced, those token counts are
baked into the graph, which is then wrong at any other size. During export every MoE layer is therefore swapped for
:class:`DenseMaskedMoE`, which runs every expert on every token and weights it by its gate (zero outside the top-k):
mathematically the same output, with only static shapes. Expert weights and router temperature set with
``set_routing`` before export are baked into the graph (defaults: the trained behaviour).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.models.mmdit import MMDiT
from workbench.models.moe import MoEFeedForward

INPUT_NAMES = ("latents", "encoder_hidden_states", "pooled_projections", "timestep")
OUTPUT_NAMES = ("velocity",)
DYNAMIC_AXES = {
    "latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
    "encoder_hidden_states": {0: "batch", 1: "text_tokens"},
    "pooled_projections": {0: "batch"},
    "timestep": {0: "batch"},
    "velocity": {0: "batch", 2: "latent_height", 3: "latent_width"},
}
DEFAULT_OPSET = 17
TOLERANCE = 1e-3


class DenseMaskedMoE(nn.Module):
    """Export form of a :class:`MoEFeedForward` (shares its parameters): ``Σ_e gate_e · expert_e(h)`` over all
    experts, gates from the layer's own :meth:`MoEFeedForward.gates` (zero outside the top-k), plus the shared
    expert. Input and output ``(B, N, dim)``."""

    def __init__(self, moe: MoEFeedForward) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        tokens = x.reshape(-1, dim)
        _, gates = self.moe.gates(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.moe.experts):
            out = out + gates[:, e : e + 1].to(x.dtype) * expert(tokens)
        if self.moe.shared_expert is not None:
            out = out + self.moe.shared_expert(tokens)
        return out.view(batch, length, dim)


@contextmanager
def export_friendly(model: MMDiT) -> Iterator[MMDiT]:
    """Temporarily replace every MoE feed-forward of ``model`` by its :class:`DenseMaskedMoE` form."""
    swapped = []
    for block in model.transformer_blocks:
        if isinstance(block.ff, MoEFeedForward):
            swapped.append((block, block.ff))
            block.ff = DenseMaskedMoE(block.ff)
    try:
        yield model
    finally:
        for block, moe in swapped:
            block.ff = moe


def example_inputs(
    model: MMDiT, batch: int, latent_height: int, latent_width: int, text_tokens: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random float32 inputs of the graph's shapes (timesteps uniform in [0, 1000))."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, config.in_channels, latent_height, latent_width, generator=generator),
        torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
        torch.randn(batch, config.pooled_projection_dim, generator=generator),
        torch.rand(batch, generator=generator) * 1000,
    )


def export_transformer(
    model: MMDiT,
    path: str | Path,
    latent_height: int,
    latent_width: int,
    text_tokens: int,
    opset: int = DEFAULT_OPSET,
    batch: int = 1,
) -> Path:
    """Trace ``model`` (float32, CPU) at the given latent size and write ONNX with dynamic batch, latent height /
    width and text length. Returns the path."""
    if not 14 <= opset <= 21:
        raise ValueError(f"opset must be between 14 and 21 (scaled_dot_product_attention needs 14), got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    inputs = example_inputs(model, batch, latent_height, latent_width, text_tokens)
    with export_friendly(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=DYNAMIC_AXES,
            do_constant_folding=True,
        )
    remove_noop_casts(path)
    return path


def remove_noop_casts(path: str | Path) -> int:
    """Drop ``Cast`` nodes whose input already has the target type (the exporter writes one per ``x.float()`` on
    a float32 tensor, e.g. in the RMS q/k norm of SD3.5), rewiring their consumers; onnxruntime's CastElimination
    otherwise breaks chains of them ("node input … is not a graph input"). Rewrites the file in place (external
    weight files untouched); returns the number of nodes removed."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]
        if node.op_type == "Cast" and node.output[0] not in outputs:
            target = next(a.i for a in node.attribute if a.name == "to")
            if types.get(node.input[0]) == target:
                alias[node.output[0]] = node.input[0]
                continue
        kept.append(node)
    if alias:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        onnx.save(model, str(path))
    return len(alias)


@dataclass
class CheckResult:
    """One parity check: input shapes, the largest absolute difference ONNX vs PyTorch, and whether it passed."""

    batch: int
    latent_height: int
    latent_width: int
    text_tokens: int
    max_abs_diff: float
    passed: bool

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"batch {self.batch}, latents {self.latent_height}x{self.latent_width}, {self.text_tokens} text tokens: "
            f"max |Δ| = {self.max_abs_diff:.2e} ({verdict})"
        )


def check_onnx(
    path: str | Path,
    model: MMDiT,
    shapes: list[tuple[int, int, int, int]],
    tolerance: float = TOLERANCE,
    seed: int = 1,
) -> list[CheckResult]:
    """Run the ONNX graph with onnxruntime (CPU) and ``model`` (its own routed MoE path) on random inputs of each
    ``(batch, latent_height, latent_width, text_tokens)`` and compare the velocities."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(torch.get_num_threads(), 1)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = model.float().cpu().eval()
    results = []
    for i, (batch, height, width, tokens) in enumerate(shapes):
        inputs = example_inputs(model, batch, height, width, tokens, seed=seed + i)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        (got,) = session.run(None, {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs)})
        if got.shape != expected.shape:
            raise ValueError(f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
        diff = float(np.abs(got - expected).max())
        results.append(CheckResult(batch, height, width, tokens, diff, diff <= tolerance))
    return results


def other_size(height: int, width: int, multiple: int, largest: int) -> tuple[int, int]:
    """A different valid size for the dynamic-axes check: height two multiples smaller and width two larger (each
    the other way round when it would leave ``[2·multiple, largest]``)."""
    step = 2 * multiple

    def move(side: int, direction: int) -> int:
        moved = side + direction * step
        return moved if step <= moved <= largest else side - direction * step

    return move(height, -1), move(width, +1)


def trtexec_command(
    onnx_path: str | Path,
    model: MMDiT,
    text_tokens: int,
    min_latent: tuple[int, int],
    opt_latent: tuple[int, int],
    max_latent: tuple[int, int],
    max_batch: int = 8,
    engine_path: str | Path | None = None,
) -> str:
    """The ``trtexec`` line building a TensorRT fp16 engine over the given shape range (opt batch 2 = CFG pair)."""
    config = model.config
    engine = engine_path or Path(onnx_path).with_suffix(".plan")

    def shapes(batch: int, latent: tuple[int, int]) -> str:
        return ",".join(
            [
                f"latents:{batch}x{config.in_channels}x{latent[0]}x{latent[1]}",
                f"encoder_hidden_states:{batch}x{text_tokens}x{config.joint_attention_dim}",
                f"pooled_projections:{batch}x{config.pooled_projection_dim}",
                f"timestep:{batch}",
            ]
        )

    return (
        f"trtexec --onnx={onnx_path} --saveEngine={engine} --fp16 "
        f"--minShapes={shapes(1, min_latent)} --optShapes={shapes(2, opt_latent)} "
        f"--maxShapes={shapes(max_batch, max_latent)}"
    )
