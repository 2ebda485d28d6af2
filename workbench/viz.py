"""Every plot, image grid and markdown table of the workbench, shared by the notebooks, the app, sweeps and benchmarks.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure``), never through pyplot: no
global figure registry, no GUI backend, nothing to close, safe from worker threads. Jupyter displays a returned
Figure inline; Gradio's ``gr.Plot`` takes it as it is; :func:`figure_to_image` renders one to PIL.

Routing conventions (``RoutingRecord``): gates are ``(B, N, E)`` per (block, step), token ``n`` at row ``n // w``,
column ``n % w`` of the token grid; with classifier-free guidance the batch is [negative; positive], so image ``i``
of ``num_images`` is batch index ``num_images + i`` (see :func:`conditional_indices`). "Step" is the
model-evaluation index (two per step for heun). Trajectory conventions (``flow.Trajectory``): per step ``σ_i``,
``x_i`` (latent entering the step), ``v_i`` (guided velocity) and ``x̂0_i = x_i − σ_i·v_i``, each ``(B, 16, h, w)``.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib import colormaps, font_manager
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from PIL import Image, ImageDraw, ImageFont

from workbench.flow import Trajectory
from workbench.models.moe import RoutingRecord

if TYPE_CHECKING:
    from workbench.pipeline import Pipeline

_TAB10 = [tuple(int(round(255 * c)) for c in colormaps["tab10"](i)[:3]) for i in range(10)]
LABEL_HEIGHT = 16


# ------------------------------------------------------------------------------------------------------------ helpers


def expert_colour(expert: int) -> tuple[int, int, int]:
    """The fixed RGB colour (0–255) of an expert, the same in every plot: tab10, then evenly spaced hues."""
    if expert < 0:
        raise ValueError(f"expert must be >= 0, got {expert}")
    if expert < len(_TAB10):
        return _TAB10[expert]
    hue = ((expert - len(_TAB10)) * 0.618034) % 1.0
    return tuple(int(round(255 * c)) for c in colormaps["hsv"](hue)[:3])


def _mpl_colour(expert: int) -> tuple[float, float, float]:
    return tuple(c / 255 for c in expert_colour(expert))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib, has σ and x̂) at ``size`` px; Pillow's default font otherwise."""
    try:
        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default()


def _text_width(text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


def figure_to_image(figure: Figure, dpi: int = 100) -> Image.Image:
    """Render a matplotlib Figure to an RGB PIL image."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A markdown table of ``rows`` (mappings); ``columns`` defaults to the first row's keys; floats get ``digits``."""
    if not rows:
        raise ValueError("rows must not be empty")
    columns = list(columns if columns is not None else rows[0].keys())
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else ("–" if v is None else str(v))
    return markdown_rows(columns, [[cell(row.get(c)) for c in columns] for row in rows])


def markdown_rows(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: the ``header`` line, the separator, one line per row (cells as ``str``)."""
    return "\n".join([markdown_header(header), *(markdown_row(row) for row in rows)])


def markdown_header(header: Sequence[str]) -> str:
    """A markdown table's first two lines, the header and the separator (for tables printed row by row)."""
    return markdown_row(header) + "\n|" + "---|" * len(header)


def markdown_row(cells: Sequence[object]) -> str:
    """One line of a markdown table (cells as ``str``)."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _check_record(record: RoutingRecord) -> None:
    if not isinstance(record, RoutingRecord):
        raise ValueError(f"record must be a RoutingRecord, got {type(record).__name__}")
    if not record.entries:
        raise ValueError("record has no routing entries: generate with record_routing=True on a model with experts")


def _batch_size(record: RoutingRecord) -> int:
    return int(record.entries[0]["gates"].shape[0])


def _check_batch_index(record: RoutingRecord, batch_index: int | None) -> None:
    size = _batch_size(record)
    if batch_index is not None and not (isinstance(batch_index, int) and 0 <= batch_index < size):
        raise ValueError(f"batch_index must be an integer in [0, {size - 1}] (the record's batch), got {batch_index!r}")


def conditional_indices(record: RoutingRecord, num_images: int) -> list[int]:
    """Batch indices of the conditional (positive-prompt) half for ``num_images`` generated images.

    With guidance > 1 the record's batch is ``2·num_images`` ([negative; positive]) and image ``i`` is
    ``num_images + i``; without guidance it is ``num_images`` and image ``i`` is ``i``.
    """
    _check_record(record)
    size = _batch_size(record)
    if size == 2 * num_images:
        return [num_images + i for i in range(num_images)]
    if size == num_images:
        return list(range(num_images))
    raise ValueError(f"num_images={num_images} does not match the record's batch of {size} (num_images or twice it)")


# ------------------------------------------------------------------------------------------------------------ routing


def _normalised_entropy(shares: torch.Tensor) -> torch.Tensor:
    """Entropy of distributions along the last axis divided by log(E): 1 = uniform, 0 = one expert."""
    count = shares.shape[-1]
    if count < 2:
        return torch.ones(shares.shape[:-1])
    p = shares / shares.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return entropy / math.log(count)


def block_shares(record: RoutingRecord, batch_index: int | None = None) -> torch.Tensor:
    """Mean routing probability of each expert per block, ``(blocks, E)`` float32, averaged over steps, tokens and
    the whole batch (``batch_index`` None) or one batch entry."""
    _check_record(record)
    _check_batch_index(record, batch_index)
    gates = record.stacked(batch_index)
    dims = (0, 2) if batch_index is not None else (0, 2, 3)
    return gates.mean(dim=dims)


def expert_share_per_block(record: RoutingRecord, batch_index: int | None = None) -> list[dict]:
    """One row per MoE block: ``{"block", "expert_0", …, "expert_{E-1}", "entropy"}``.

    Shares are mean routing probabilities (the recorded softmax after temperature and user weights, before top-k),
    averaged over steps, tokens and the batch (or one ``batch_index``); they sum to 1 per block. ``entropy`` is the
    normalised entropy of the shares (1 = perfectly balanced, see :func:`load_balance_entropy`).
    """
    shares = block_shares(record, batch_index)
    entropy = _normalised_entropy(shares)
    rows = []
    for i, block in enumerate(record.blocks()):
        row: dict = {"block": block}
        row.update({f"expert_{e}": float(shares[i, e]) for e in range(shares.shape[1])})
        row["entropy"] = float(entropy[i])
        rows.append(row)
    return rows


def load_balance_entropy(record: RoutingRecord, batch_index: int | None = None) -> dict[int, float]:
    """``{block: H(p̄)/log E}``: normalised entropy of each block's mean expert usage p̄ (mean routing probability
    over steps, tokens and images). 1 = perfectly balanced, 0 = every token sent to one expert."""
    shares = block_shares(record, batch_index)
    entropy = _normalised_entropy(shares)
    return {block: float(entropy[i]) for i, block in enumerate(record.blocks())}


def token_entropy(record: RoutingRecord, batch_index: int | None = None) -> dict[int, float]:
    """``{block: mean_n H(p_n)/log E}``: how decisive the router is per token (0 = every token certain of one
    expert, 1 = every token split evenly), averaged over steps, tokens and images. Unlike
    :func:`load_balance_entropy` this reacts to the router temperature even when mean usage stays balanced."""
    _check_record(record)
    _check_batch_index(record, batch_index)
    per_token = _normalised_entropy(record.stacked(batch_index))
    dims = (0, 2) if batch_index is not None else (0, 2, 3)
    values = per_token.mean(dim=dims)
    return {block: float(values[i]) for i, block in enumerate(record.blocks())}


def expert_share_plot(record: RoutingRecord, batch_index: int | None = None) -> Figure:
    """Stacked horizontal bars: each MoE block's mean expert shares (in :func:`expert_colour`), with the block's
    normalised load-balance entropy written beside it."""
    rows = expert_share_per_block(record, batch_index)
    experts = sum(key.startswith("expert_") for key in rows[0])
    figure = _new_figure(6.4, 1.2 + 0.45 * len(rows))
    ax = figure.subplots()
    labels = [f"block {row['block']}" for row in rows]
    left = np.zeros(len(rows))
    for e in range(experts):
        values = np.array([row[f"expert_{e}"] for row in rows])
        ax.barh(labels, values, left=left, color=_mpl_colour(e), label=f"expert {e}", edgecolor="white")
        left += values
    for y, row in enumerate(rows):
        ax.text(1.02, y, f"H = {row['entropy']:.3f}", va="center", fontsize=9)
    ax.set_xlim(0, 1.2)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.invert_yaxis()
    ax.set_xlabel("mean gate share")
    figure.legend(ncols=min(experts, 4), fontsize=8, loc="outside lower center")
    ax.set_title("Expert share per block (H: normalised entropy, 1 = balanced)")
    return figure


def expert_usage_heatmap(record: RoutingRecord, batch_index: int | None = None) -> Figure:
    """Expert usage by block × step: one heat-map panel per expert, colour = mean gate share over tokens (and over
    the batch when ``batch_index`` is None), one shared colour scale and colourbar."""
    _check_record(record)
    _check_batch_index(record, batch_index)
    gates = record.stacked(batch_index)
    usage = gates.mean(dim=2) if batch_index is not None else gates.mean(dim=(2, 3))
    usage = usage.permute(2, 1, 0).numpy()
    experts, blocks, steps = usage.shape
    cols = min(experts, 4)
    rows = math.ceil(experts / cols)
    figure = _new_figure(1.0 + 3.0 * cols, 0.6 + (0.9 + 0.28 * blocks) * rows)
    axes = figure.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    vmax = max(float(usage.max()), 1e-6)
    image = None
    for e in range(rows * cols):
        ax = axes[e // cols][e % cols]
        if e >= experts:
            ax.set_visible(False)
            continue
        image = ax.imshow(usage[e], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"expert {e}", color=_mpl_colour(e), fontweight="bold")
        ax.set_yticks(range(blocks), [str(b) for b in record.blocks()])
        if e // cols == rows - 1:
            ax.set_xlabel("step (model evaluation)")
        if e % cols == 0:
            ax.set_ylabel("block")
    figure.colorbar(image, ax=axes.ravel().tolist(), label="mean gate share")
    which = "all batch entries" if batch_index is None else f"batch entry {batch_index}"
    figure.suptitle(f"Expert usage by block × step ({which})")
    return figure


def _select_gates(
    record: RoutingRecord, batch_index: int, block: int | None, step: int | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Gates ``(N, E)`` of one batch entry averaged over the chosen (or all) steps and blocks, and the token grid."""
    _check_record(record)
    _check_batch_index(record, batch_index)
    if block is not None and block not in record.blocks():
        raise ValueError(f"block must be one of the recorded MoE blocks {record.blocks()}, got {block!r}")
    if step is not None and step not in record.steps():
        raise ValueError(f"step must be one of the recorded steps 0..{max(record.steps())}, got {step!r}")
    chosen = [
        e["gates"][batch_index].float()
        for e in record.entries
        if (block is None or e["block"] == block) and (step is None or e["step"] == step)
    ]
    grid = next(e["grid"] for e in record.entries)
    return torch.stack(chosen).mean(0), tuple(grid)


def expert_assignment(
    record: RoutingRecord, batch_index: int = 0, block: int | None = None, step: int | None = None
) -> np.ndarray:
    """``(h, w)`` int array: the argmax expert of each image token (gates averaged over the chosen steps/blocks)."""
    gates, (h, w) = _select_gates(record, batch_index, block, step)
    if gates.shape[0] != h * w:
        raise ValueError(f"record grid {h}x{w} does not match its {gates.shape[0]} tokens")
    return gates.argmax(-1).reshape(h, w).numpy()


def _legend_strip(labels: Sequence[tuple[tuple[int, int, int], str]], width: int) -> Image.Image:
    """Colour swatches with labels, wrapped to ``width`` pixels."""
    font = _font(11)
    pad, swatch, line = 4, 10, 15
    rows: list[list[tuple[tuple[int, int, int], str, int]]] = [[]]
    x = pad
    for colour, text in labels:
        item = swatch + 3 + _text_width(text, font) + 8
        if rows[-1] and x + item > width:
            rows.append([])
            x = pad
        rows[-1].append((colour, text, x))
        x += item
    strip = Image.new("RGB", (width, pad + line * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y = pad // 2 + r * line
        for colour, text, x0 in row:
            draw.rectangle([x0, y + 2, x0 + swatch, y + 2 + swatch], fill=colour, outline=(60, 60, 60))
            draw.text((x0 + swatch + 3, y), text, fill=(20, 20, 20), font=font)
    return strip


def expert_region_map(
    record: RoutingRecord,
    image: Image.Image,
    batch_index: int = 0,
    block: int | None = None,
    step: int | None = None,
    alpha: float = 0.5,
    legend: bool = True,
) -> Image.Image:
    """Overlay on ``image`` of the expert each image region chose.

    The argmax expert per token (gates of ``batch_index`` averaged over the chosen ``step``/``block``, all when None)
    is painted in :func:`expert_colour`, upsampled (nearest) to the image size and blended:
    ``(1 − alpha)·image + alpha·colour``. With ``legend`` a strip below the image names each expert and the share of
    tokens that chose it, so the result is ``image.width × (image.height + strip)``; without it, exactly image size.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    assignment = expert_assignment(record, batch_index, block, step)
    experts = int(record.entries[0]["gates"].shape[-1])
    palette = np.array([expert_colour(e) for e in range(experts)], dtype=np.uint8)
    colours = Image.fromarray(palette[assignment]).resize(image.size, Image.Resampling.NEAREST)
    base = image.convert("RGB")
    blended = Image.blend(base, colours, alpha)
    if not legend:
        return blended
    counts = np.bincount(assignment.ravel(), minlength=experts) / assignment.size
    strip = _legend_strip([(expert_colour(e), f"E{e} {100 * counts[e]:.0f}%") for e in range(experts)], base.width)
    out = Image.new("RGB", (base.width, base.height + strip.height), (255, 255, 255))
    out.paste(blended, (0, 0))
    out.paste(strip, (0, base.height))
    return out


def attribute_share_heatmap(
    shares: torch.Tensor | np.ndarray, labels: Sequence[str], blocks: Sequence[int], relative: bool = True
) -> Figure:
    """Average expert share for images grouped by a prompt attribute.

    ``shares`` is ``(images, blocks, E)`` (e.g. :func:`block_shares` of each conditional batch index, stacked) and
    ``labels`` the group of each image (e.g. its colour). One panel per block: rows = groups (sorted, with their
    image counts), columns = experts, cells annotated with the group's mean share; the last panel is the mean over
    blocks. With ``relative`` the colour is the difference from the mean over all images (diverging scale, so the
    groups that use an expert more or less than average stand out); otherwise the share itself.
    """
    data = torch.as_tensor(np.asarray(shares), dtype=torch.float32)
    if data.dim() != 3:
        raise ValueError(f"shares must have shape (images, blocks, experts), got {tuple(data.shape)}")
    if len(labels) != data.shape[0]:
        raise ValueError(f"labels has {len(labels)} entries for {data.shape[0]} images")
    if len(blocks) != data.shape[1]:
        raise ValueError(f"blocks has {len(blocks)} entries for {data.shape[1]} blocks in shares")
    groups = sorted(set(labels))
    index = {g: [i for i, lab in enumerate(labels) if lab == g] for g in groups}
    table = torch.stack([data[index[g]].mean(0) for g in groups])
    overall = data.mean(0)
    panels = [(f"block {b}", table[:, i], overall[i]) for i, b in enumerate(blocks)]
    panels.append(("mean over blocks", table.mean(1), overall.mean(0)))
    experts = data.shape[2]
    figure = _new_figure(0.8 + 0.55 * experts * len(panels) + 0.9 * len(panels), 1.1 + 0.32 * len(groups))
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    colours = [(values - mean if relative else values).numpy() for _, values, mean in panels]
    if relative:
        limit = max(max(float(np.abs(c).max()) for c in colours), 1e-6)
        scale = {"cmap": "coolwarm", "vmin": -limit, "vmax": limit}
    else:
        scale = {"cmap": "magma", "vmin": 0.0, "vmax": max(float(table.max()), 1e-6)}
    image = None
    for ax, (title, values, _), shade in zip(axes, panels, colours):
        image = ax.imshow(shade, aspect="auto", **scale)
        ax.set_title(title)
        ax.set_xticks(range(experts), [f"E{e}" for e in range(experts)])
        for tick, e in zip(ax.get_xticklabels(), range(experts)):
            tick.set_color(_mpl_colour(e))
        ax.set_yticks(range(len(groups)), [f"{g} ({len(index[g])})" for g in groups])
        for (r, c), value in np.ndenumerate(values.numpy()):
            dark = abs(shade[r, c]) > 0.6 * scale["vmax"] if relative else shade[r, c] < 0.6 * scale["vmax"]
            text_colour = "w" if dark else "k"
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=text_colour)
    label = "share − mean over all images" if relative else "mean gate share"
    figure.colorbar(image, ax=list(axes), label=label)
    figure.suptitle("Expert share by prompt attribute (numbers: mean share of the group)")
    return figure


# --------------------------------------------------------------------------------------------------------- trajectory


def _label_tile(tile: Image.Image, text: str) -> Image.Image:
    font = _font(11)
    out = Image.new("RGB", (tile.width, tile.height + LABEL_HEIGHT), (255, 255, 255))
    out.paste(tile.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    label = text
    while label and _text_width(label, font) > tile.width - 2:
        label = label[:-1]
    x = max((tile.width - _text_width(label, font)) // 2, 0)
    draw.text((x, tile.height + 1), label, fill=(20, 20, 20), font=font)
    return out


def image_grid(images: Sequence[Image.Image], rows: int, cols: int, labels: Sequence[str] | None = None) -> Image.Image:
    """Tile ``images`` row-major into ``rows × cols`` cells of the largest image's size (white padding), each with
    its label underneath when ``labels`` are given."""
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be integers >= 1, got rows={rows!r}, cols={cols!r}")
    if not images:
        raise ValueError("images must not be empty")
    if len(images) > rows * cols:
        raise ValueError(f"images has {len(images)} entries, more than rows×cols = {rows * cols}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels has {len(labels)} entries for {len(images)} images")
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    label_h = LABEL_HEIGHT if labels is not None else 0
    gap = 2
    grid = Image.new(
        "RGB", (cols * cell_w + (cols - 1) * gap, rows * (cell_h + label_h) + (rows - 1) * gap), (255, 255, 255)
    )
    for i, im in enumerate(images):
        tile = Image.new("RGB", (cell_w, cell_h), (255, 255, 255))
        tile.paste(im.convert("RGB"), ((cell_w - im.width) // 2, (cell_h - im.height) // 2))
        if labels is not None:
            tile = _label_tile(tile, str(labels[i]))
        r, c = divmod(i, cols)
        grid.paste(tile, (c * (cell_w + gap), r * (cell_h + label_h + gap)))
    return grid


def _pil_default_font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's own font, which the sweep grids have always used (their images stay as they were)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text: str, width_px: int, font: ImageFont.ImageFont, max_lines: int = 3) -> list[str]:
    chars = max(4, int(width_px / max(font.getlength("x"), 1)))
    lines = textwrap.wrap(text, chars) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(chars - 1, 1)] + "…"
    return lines


def labelled_grid(
    images: Sequence[Sequence[Image.Image | None]],
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    title: str = "",
) -> Image.Image:
    """A labelled grid: ``images[row][column]`` (``None``: an empty gray tile), column labels on top, row labels on
    the left, an optional title line above."""
    tiles = [im for row in images for im in row if im is not None]
    tile_w, tile_h = (tiles[0].width, tiles[0].height) if tiles else (128, 128)
    font = _pil_default_font(12)
    line_h = 15
    col_lines = [_wrap(label, tile_w - 4, font) for label in column_labels]
    row_lines = [_wrap(label, 140, font, max_lines=max(1, tile_h // line_h)) for label in row_labels]
    top = line_h * (max(len(lines) for lines in col_lines) + (1 if title else 0)) + 6
    left = 150 if any(row_labels) else 0
    canvas = Image.new("RGB", (left + tile_w * len(column_labels), top + tile_h * len(row_labels)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for c, lines in enumerate(col_lines):
        y0 = top - line_h * len(lines) - 3
        for k, line in enumerate(lines):
            draw.text((left + c * tile_w + 2, y0 + k * line_h), line, fill="black", font=font)
    for r, lines in enumerate(row_lines):
        for k, line in enumerate(lines):
            draw.text((4, top + r * tile_h + 4 + k * line_h), line, fill="black", font=font)
        for c in range(len(column_labels)):
            tile = images[r][c]
            box = (left + c * tile_w, top + r * tile_h)
            if tile is None:
                draw.rectangle([box, (box[0] + tile_w - 1, box[1] + tile_h - 1)], fill=(200, 200, 200))
            else:
                canvas.paste(tile.convert("RGB").resize((tile_w, tile_h)), box)
    return canvas


def _check_trajectory(trajectory: Trajectory, batch_index: int | None = None) -> None:
    if not isinstance(trajectory, Trajectory):
        raise ValueError(f"trajectory must be a flow.Trajectory, got {type(trajectory).__name__}")
    if not trajectory.x0:
        raise ValueError("trajectory is empty: generate with record_trajectory=True")
    size = trajectory.x0[0].shape[0]
    if batch_index is not None and not (isinstance(batch_index, int) and 0 <= batch_index < size):
        raise ValueError(f"batch_index must be an integer in [0, {size - 1}], got {batch_index!r}")


def frame_indices(count: int, max_frames: int) -> list[int]:
    """At most ``max_frames`` indices evenly spread over ``range(count)``, always including the first and last."""
    if not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be an integer >= 1, got {max_frames!r}")
    if count <= max_frames:
        return list(range(count))
    if max_frames == 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (max_frames - 1)) for i in range(max_frames)})


def trajectory_strip(pipe: Pipeline, trajectory: Trajectory, batch_index: int = 0, max_frames: int = 12) -> Image.Image:
    """One row of the predicted clean image x̂0 at (up to ``max_frames``, evenly spaced) steps, decoded with
    ``pipe.decode_latents``, each labelled with its σ."""
    _check_trajectory(trajectory, batch_index)
    chosen = frame_indices(len(trajectory.x0), max_frames)
    latents = torch.cat([trajectory.x0[i][batch_index : batch_index + 1] for i in chosen])
    images = pipe.decode_latents(latents)
    labels = [f"σ={trajectory.sigmas[i]:.2f}" for i in chosen]
    return image_grid(images, 1, len(images), labels)


def step_deviations(trajectory: Trajectory) -> torch.Tensor:
    """``(steps, B)``: per step, ``‖chord − v_i‖²`` averaged over latent dimensions, with
    ``chord = (x_start − x_final)/σ_start`` the constant velocity of the straight path; the integrand of
    ``Trajectory.straightness``."""
    _check_trajectory(trajectory)
    if trajectory.final is None:
        raise ValueError("trajectory is not finished (final is None)")
    chord = (trajectory.latents[0] - trajectory.final.float().cpu()) / trajectory.sigmas[0]
    return torch.stack([(chord - v).pow(2).flatten(1).mean(1) for v in trajectory.velocities])


def straightness_plot(trajectory: Trajectory, labels: Sequence[str] | None = None) -> Figure:
    """Per-step deviation ``‖chord − v_i‖²`` against σ (1 → 0, left to right), one line per batch entry; the
    straightness S (``Trajectory.straightness``, 0 = straight) in the title and legend."""
    deviations = step_deviations(trajectory).numpy()
    values = trajectory.straightness().numpy()
    count = deviations.shape[1]
    if labels is not None and len(labels) != count:
        raise ValueError(f"labels has {len(labels)} entries for a batch of {count}")
    figure = _new_figure(6.0, 3.6)
    ax = figure.subplots()
    colours = colormaps["tab10"]
    for b in range(count):
        name = labels[b] if labels is not None else f"image {b}"
        ax.plot(
            trajectory.sigmas,
            deviations[:, b],
            marker="o",
            markersize=3,
            color=colours(b % 10),
            label=f"{name} (S={values[b]:.3g})",
        )
    ax.set_xlim(max(trajectory.sigmas) + 0.02, min(trajectory.sigmas) - 0.02)
    ax.set_xlabel("σ (noise level; sampling runs left → right)")
    ax.set_ylabel("‖chord − v‖² (per dimension)")
    ax.grid(alpha=0.3)
    if count <= 10:
        ax.legend(fontsize=8)
    ax.set_title(f"Deviation from the straight path, S = {float(values.mean()):.4g}" + (" (mean)" if count > 1 else ""))
    return figure


def _path_points(trajectory: Trajectory) -> torch.Tensor:
    """``(B, steps + 1, D)``: the flattened latents entering each step, then the final latent."""
    _check_trajectory(trajectory)
    if trajectory.final is None:
        raise ValueError("trajectory is not finished (final is None)")
    points = [*trajectory.latents, trajectory.final.float().cpu()]
    return torch.stack([p.flatten(1) for p in points], dim=1)


def latent_path_pca(trajectories: Sequence[Trajectory], labels: Sequence[str]) -> Figure:
    """Latent paths projected to 2-D by PCA (one basis fitted to every point of every path, via SVD).

    Each path runs from its noise (circle) to the final latent (star); the dashed line is the straight chord
    between them, so curvature shows as distance from it. A trajectory with a batch draws one line per image.
    """
    if not trajectories:
        raise ValueError("trajectories must not be empty")
    if len(labels) != len(trajectories):
        raise ValueError(f"labels has {len(labels)} entries for {len(trajectories)} trajectories")
    paths = [_path_points(t) for t in trajectories]
    dims = {p.shape[-1] for p in paths}
    if len(dims) != 1:
        raise ValueError(f"trajectories have different latent sizes {sorted(dims)}; use one height and width")
    everything = torch.cat([p.reshape(-1, p.shape[-1]) for p in paths]).double()
    mean = everything.mean(0, keepdim=True)
    _, singular, basis = torch.linalg.svd(everything - mean, full_matrices=False)
    components = basis[:2].T
    explained = (singular[:2] ** 2 / (singular**2).sum().clamp_min(1e-12)).tolist() + [0.0, 0.0]
    figure = _new_figure(5.6, 4.6)
    ax = figure.subplots()
    colours = colormaps["tab10"]
    line = 0
    for path, label in zip(paths, labels):
        for b in range(path.shape[0]):
            xy = ((path[b].double() - mean) @ components).numpy()
            if xy.shape[1] < 2:
                xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
            colour = colours(line % 10)
            name = label if path.shape[0] == 1 else f"{label} #{b}"
            ax.plot(xy[:, 0], xy[:, 1], "-", marker=".", color=colour, label=name)
            ax.plot([xy[0, 0], xy[-1, 0]], [xy[0, 1], xy[-1, 1]], "--", color=colour, alpha=0.45, linewidth=1)
            ax.plot(xy[0, 0], xy[0, 1], "o", color=colour, markersize=7, markerfacecolor="white")
            ax.plot(xy[-1, 0], xy[-1, 1], "*", color=colour, markersize=12)
            line += 1
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    ax.set_title("Latent paths projected by PCA\n○ noise → ★ final latent; dashed: the straight chord", fontsize=10)
    ax.grid(alpha=0.3)
    if line <= 12:
        ax.legend(fontsize=8)
    return figure


# ------------------------------------------------------------------------------------------------ samplers / toy flow


def quality_vs_evaluations_plot(
    results: Sequence[Mapping], metric: str = "all", title: str = "ShapesWorld accuracy against model evaluations"
) -> Figure:
    """Accuracy against number of model evaluations (NFE), one line per sampler.

    ``results`` rows are mappings with ``sampler``, ``nfe`` and ``metric`` (a fraction in [0, 1]).
    """
    if not results:
        raise ValueError("results must not be empty")
    for row in results:
        missing = {"sampler", "nfe", metric} - set(row)
        if missing:
            raise ValueError(f"each result needs keys sampler, nfe and {metric!r}; missing {sorted(missing)}")
    figure = _new_figure(5.6, 3.6)
    ax = figure.subplots()
    for i, sampler in enumerate(sorted({row["sampler"] for row in results})):
        rows = sorted((row for row in results if row["sampler"] == sampler), key=lambda row: row["nfe"])
        ax.plot(
            [row["nfe"] for row in rows],
            [100 * row[metric] for row in rows],
            marker="o",
            color=colormaps["tab10"](i),
            label=sampler,
        )
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel(f"accuracy '{metric}' (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return figure


def series_plot(
    series: Mapping[str, Mapping[float, float]],
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
    log_y: bool = False,
) -> Figure:
    """One line per named series ``{x: y}`` (sorted by x), e.g. sample distance against number of Euler steps."""
    if not series:
        raise ValueError("series must not be empty")
    figure = _new_figure(5.6, 3.6)
    ax = figure.subplots()
    for i, (name, points) in enumerate(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", color=colormaps["tab10"](i % 10), label=str(name))
    if log_x:
        ax.set_xscale("log")
        ticks = sorted({x for points in series.values() for x in points})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def toy_flow_plot(
    panels: Sequence[Mapping],
    target: torch.Tensor | np.ndarray | None = None,
    max_paths: int = 200,
) -> Figure:
    """Side-by-side 2-D flow paths, e.g. independent coupling against one reflow.

    Each panel is a mapping with ``paths`` (``(steps + 1, n, 2)``: positions from the source at t = 1 to the
    samples at t = 0), ``title`` and optionally ``straightness`` (shown in the title). ``target`` (``(m, 2)``)
    is drawn faintly behind. Paths are coloured by their end point's angle so crossings are visible.
    """
    if not panels:
        raise ValueError("panels must not be empty")
    figure = _new_figure(4.2 * len(panels), 4.2)
    axes = figure.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    for ax, panel in zip(axes, panels):
        paths = np.asarray(panel["paths"], dtype=np.float64)
        if paths.ndim != 3 or paths.shape[-1] != 2:
            raise ValueError(f"paths must have shape (steps + 1, n, 2), got {paths.shape}")
        if target is not None:
            t = np.asarray(target)
            ax.scatter(t[:, 0], t[:, 1], s=3, color="0.8", zorder=0)
        shown = paths[:, :max_paths]
        angle = (np.arctan2(shown[-1, :, 1], shown[-1, :, 0]) + np.pi) / (2 * np.pi)
        cmap = colormaps["hsv"]
        for i in range(shown.shape[1]):
            ax.plot(shown[:, i, 0], shown[:, i, 1], color=cmap(angle[i]), linewidth=0.7, alpha=0.7)
        ax.scatter(shown[0, :, 0], shown[0, :, 1], s=4, color="0.35", zorder=3, label="source (t=1)")
        ax.scatter(shown[-1, :, 0], shown[-1, :, 1], s=5, color="crimson", zorder=3, label="sample (t=0)")
        title = str(panel.get("title", ""))
        if "straightness" in panel:
            title += f"\nS = {float(panel['straightness']):.4f}"
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.grid(alpha=0.2)
    axes[0].legend(loc="lower left", fontsize=8)
    figure.suptitle("Rectified flow paths in 2-D")
    return figure
