"""The results column of the Text → Image and Image → Image tabs, A1111-style: one large gallery that shows the live
x̂0 preview while the model runs and the finished PNGs after; the progress / message line; the selected image's
generation info, seed, download and "Send to Image → Image"; and the session history (the last
:data:`HISTORY_SIZE` images of this browser session; a click shows one in the gallery again).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from workbench import GenerationCancelled
from workbench.flow import img2img_start
from workbench.ui.live import LivePreview, ProgressLine, progress_html
from workbench.ui.runs import message_html
from workbench.ui.session import Step, Workbench

HISTORY_SIZE = 24
GALLERY_HEIGHT = 600  # one image across the column, or two rows of two


@dataclass
class ResultsPanel:
    """Components of a generation tab's results column (see the module docstring)."""

    gallery: gr.Gallery
    status: gr.HTML
    parameters: gr.Textbox
    used_seed: gr.Textbox
    api_seed: gr.Number
    download: gr.DownloadButton
    send_to_img2img: gr.Button
    history: gr.Gallery
    results: gr.State
    selected: gr.State
    history_results: gr.State

    def stream_outputs(self) -> list:
        return [
            self.gallery,
            self.status,
            self.parameters,
            self.used_seed,
            self.download,
            self.results,
            self.selected,
            self.history,
            self.history_results,
        ]

    def shown(self, results: list[dict], index: int) -> dict:
        """Updates that show ``results[index]`` as the selected image (its info, seed and download)."""
        chosen = results[index]
        return {
            self.parameters: chosen["parameters"],
            self.used_seed: str(chosen["seed"]),
            self.download: gr.update(value=chosen["path"], interactive=True),
            self.selected: index,
        }


def results_panel(prefix: str) -> ResultsPanel:
    """Build the results column inside the current layout and wire its own events (selection, history)."""
    status = gr.HTML("", elem_id=f"{prefix}-status")
    gallery = gr.Gallery(
        label="Images (PNG with parameters)",
        format="png",
        columns=1,
        object_fit="contain",
        height=GALLERY_HEIGHT,
        elem_id=f"{prefix}-gallery",
    )
    parameters = gr.Textbox(
        label="Generation info", lines=3, interactive=False, buttons=["copy"], elem_id=f"{prefix}-parameters"
    )
    with gr.Row(equal_height=True):
        used_seed = gr.Textbox("", label="Seed used", interactive=False, elem_id=f"{prefix}-used-seed", min_width=120)
        download = gr.DownloadButton("Download PNG", interactive=False, elem_id=f"{prefix}-download", min_width=120)
        send = gr.Button("Send to Image → Image", elem_id=f"{prefix}-send-img2img", min_width=160)
    api_seed = gr.Number(None, precision=0, visible=False)
    with gr.Accordion("History of this session", open=False, elem_id=f"{prefix}-history-box"):
        history = gr.Gallery(
            label="Last images (click to show one above)",
            format="png",
            columns=8,
            height="auto",
            allow_preview=False,
            elem_id=f"{prefix}-history",
        )
    results = gr.State([])
    selected = gr.State(0)
    history_results = gr.State([])
    panel = ResultsPanel(
        gallery, status, parameters, used_seed, api_seed, download, send, history, results, selected, history_results
    )

    def select(results: list[dict], event: gr.SelectData) -> dict:
        if not results:
            return {}
        index = event.index if isinstance(event.index, int) and 0 <= event.index < len(results) else 0
        return panel.shown(results, index)

    def recall(history_results: list[dict], event: gr.SelectData) -> dict:
        if not history_results or not isinstance(event.index, int) or not 0 <= event.index < len(history_results):
            return {}
        chosen = [history_results[event.index]]
        return {gallery: gallery_update(gallery_items(chosen)), results: chosen, **panel.shown(chosen, 0)}

    private = dict(queue=False, show_progress="hidden", api_visibility="private")
    gallery.select(select, [results], [parameters, used_seed, download, selected], **private)
    history.select(recall, [history_results], [gallery, results, parameters, used_seed, download, selected], **private)
    return panel


def publish(wb: Workbench, out, kind: str) -> list[dict]:
    """Save a :class:`workbench.GenerationOutput`'s images as PNGs; one ``{"path", "seed", "parameters"}`` each."""
    paths = wb.save(out.images, kind)
    return [
        {"path": path, "seed": seed, "parameters": image.info["parameters"]}
        for path, seed, image in zip(paths, out.seeds, out.images)
    ]


def gallery_items(results: list[dict]) -> list[tuple[str, str]]:
    return [(r["path"], f"seed {r['seed']}") for r in results]


def gallery_update(items: list) -> dict:
    """The gallery showing ``items``: one image across the column, several two by two."""
    return gr.update(value=items, columns=1 if len(items) == 1 else 2)


def stream_generation(
    wb: Workbench, panel: ResultsPanel, key: str, kind: str, prompt: str, kwargs: dict, history: list[dict]
) -> Iterator[dict]:
    """The streaming body of a generation tab: progress and an x̂0 preview in the gallery every few steps, then the
    PNGs (added to the front of ``history``); Stop ends with a message. ``key`` is the tab's stop key."""
    total = kwargs["num_inference_steps"]
    if kwargs.get("image") is not None:
        total -= img2img_start(total, kwargs.get("strength", 0.6))
    live, line = LivePreview(wb.pipe), ProgressLine(total)
    yield {panel.status: progress_html(0, "Starting…")}
    work = lambda callback: wb.pipe(prompt, callback=live.wrap(callback), **kwargs)  # noqa: E731
    try:
        for event in wb.stream(key, work, total, preview=False):
            if isinstance(event, Step):
                update: dict = {panel.status: line.html(event.index + 1)}
                images = live.images()
                if images is not None:
                    caption = f"x̂0 preview, step {event.index + 1} of {event.total}"
                    update[panel.gallery] = gallery_update([(image, caption) for image in images])
                yield update
                continue
            results = publish(wb, event.result, kind)
            history = (results + history)[:HISTORY_SIZE]
            yield {
                panel.status: message_html(f"Done: {len(results)} image(s), seed {results[0]['seed']}.", "info"),
                panel.gallery: gallery_update(gallery_items(results)),
                panel.results: results,
                panel.history: gallery_items(history),
                panel.history_results: history,
                **panel.shown(results, 0),
            }
    except GenerationCancelled as err:
        yield {panel.status: message_html(f"Stopped: {err}", "warning")}
