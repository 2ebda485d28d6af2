"""Deepening a trained MMDiT without changing what it computes, so that training continues with more capacity.

A joint block whose adaLN modulation outputs are zero (weights and bias) is the identity on both streams: every
gate is 0, so neither the attention nor the feed-forward adds anything. New blocks built that way (as
``initialise_transformer`` builds every block) are inserted between the trained ones, spread evenly and never after
the last block, whose text stream is output-free in SD3's layout. The new blocks have dense feed-forwards; the
Mixture-of-Experts blocks keep their experts and routers and move to their new indices.
"""

from __future__ import annotations

from dataclasses import replace

from workbench.models.mmdit import MMDiT
from workbench.shapesworld.model import ShapesWorldSpec, initialise_transformer


def new_block_positions(old_depth: int, new_depth: int) -> list[int]:
    """Index in the deepened model of each old block (a list of ``old_depth`` increasing indices; the last one is
    ``new_depth − 1``). The ``new_depth − old_depth`` new blocks fill the gaps before each of the old blocks
    1 … old_depth − 1, as evenly as the counts allow."""
    if new_depth < old_depth:
        raise ValueError(f"depth must be ≥ the model's {old_depth} blocks to deepen it, got {new_depth}")
    if old_depth < 2 and new_depth > old_depth:
        raise ValueError("a model of one block has no gap before its last block to insert blocks into")
    gaps = old_depth - 1
    added = new_depth - old_depth
    positions, index = [0], 0
    for gap in range(gaps):
        index += 1 + added * (gap + 1) // gaps - added * gap // gaps
        positions.append(index)
    return positions


def deepen(spec: ShapesWorldSpec, transformer: MMDiT, depth: int) -> tuple[ShapesWorldSpec, MMDiT]:
    """The spec and transformer with ``depth`` blocks computing the same function as ``transformer`` (built from
    ``spec``). Returns new objects; ``transformer`` is left as it was."""
    positions = new_block_positions(spec.depth, depth)
    grown_spec = replace(spec, depth=depth, moe_layers=tuple(positions[i] for i in spec.moe_layers))
    grown = MMDiT(grown_spec.transformer_config())
    initialise_transformer(grown)
    state = {}
    for key, value in transformer.state_dict().items():
        if key.startswith("transformer_blocks."):
            _, index, rest = key.split(".", 2)
            key = f"transformer_blocks.{positions[int(index)]}.{rest}"
        state[key] = value
    missing, unexpected = grown.load_state_dict(state, strict=False)
    new_blocks = set(range(depth)) - set(positions)
    stray = [k for k in missing if not (k.startswith("transformer_blocks.") and int(k.split(".")[1]) in new_blocks)]
    if stray or unexpected:
        raise RuntimeError(f"deepening left weights unmatched: missing {stray}, unexpected {unexpected}")
    return grown_spec, grown.to(next(transformer.parameters()).dtype)
