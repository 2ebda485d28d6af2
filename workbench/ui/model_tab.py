"""Model tab: load the embedded model, a local diffusers folder, a single-file ``.safetensors`` checkpoint or a
``.gguf`` transformer (its text encoders and VAE from a companion diffusers folder, "Text encoders / VAE from"),
with quantization and offload options, and attach LoRAs with a strength.

How depends on the hosting policy (:mod:`workbench.ui.hosting`): in public mode the tab only describes the shared
model and has no events; an app reachable by others with model changes allowed picks models and LoRAs by name from
the allowed folders; only a private app on localhost takes typed paths (wrong paths show the loader's message).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from workbench.memory import OFFLOADS, QUANTIZATIONS
from workbench.ui.session import MODEL_CONCURRENCY, Workbench, none_if_text_none, page_errors

NO_COMPANION = "none"
COMPANION_LABEL = "Text encoders / VAE from"


@dataclass
class ModelTab:
    info: gr.Markdown
    changeable: bool = False
    path: gr.Textbox | gr.Dropdown | None = None
    quantization: gr.Dropdown | None = None
    offload: gr.Dropdown | None = None
    load: gr.Button | None = None
    message: gr.Markdown | None = None
    lora_path: gr.Textbox | gr.Dropdown | None = None
    lora_strength: gr.Slider | None = None
    lora_attach: gr.Button | None = None
    lora_remove: gr.Button | None = None
    companion: gr.Textbox | gr.Dropdown | None = None


def build(wb: Workbench) -> ModelTab:
    """Build the tab inside the current ``gr.Tab``; :func:`wire` connects Load to the rest of the app (only when
    :attr:`ModelTab.changeable`)."""
    policy = wb.policy
    info = gr.Markdown(wb.describe, elem_id="model-info")
    gr.Markdown(policy.model_note, elem_id="model-note")
    if not policy.model_changes:
        return ModelTab(info)
    if policy.free_paths:
        path = gr.Textbox(
            label="Model",
            placeholder="empty = the embedded ShapesWorld model; or a diffusers folder / a .safetensors checkpoint / "
            "a .gguf transformer",
            elem_id="model-path",
        )
        companion = gr.Textbox(
            label=COMPANION_LABEL,
            placeholder="for a .gguf transformer or a single file: a diffusers folder of the same family",
            elem_id="model-companion",
        )
    else:
        names = list(policy.catalog.models)
        path = gr.Dropdown(names, value=names[0], label="Model (from the allowed folders)", elem_id="model-path")
        folders = [NO_COMPANION, *policy.catalog.model_folders]
        companion = gr.Dropdown(
            folders,
            value=NO_COMPANION,
            label=f"{COMPANION_LABEL} (for a .gguf transformer or a single file)",
            elem_id="model-companion",
        )
    with gr.Row():
        quantization = gr.Dropdown([str(q) for q in QUANTIZATIONS], value="None", label="Quantization")
        offload = gr.Dropdown([str(o) for o in OFFLOADS], value="None", label="Offload")
        load = gr.Button("Load", variant="primary", elem_id="model-load")
    message = gr.Markdown("", elem_id="model-message")
    with gr.Row():
        if policy.free_paths:
            lora_path = gr.Textbox(
                label="LoRA",
                placeholder="a .safetensors LoRA (diffusers, PEFT or kohya format); the same file again: new strength",
                elem_id="lora-path",
                scale=3,
            )
        else:
            loras = list(policy.catalog.loras)
            lora_path = gr.Dropdown(
                loras, value=loras[0] if loras else None, label="LoRA (from the allowed folders)", elem_id="lora-path"
            )
        lora_strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA strength", scale=2)
        lora_attach = gr.Button("Attach LoRA", elem_id="lora-attach", scale=1)
        lora_remove = gr.Button("Remove LoRAs", elem_id="lora-remove", scale=1)
    return ModelTab(
        info,
        True,
        path,
        quantization,
        offload,
        load,
        message,
        lora_path,
        lora_strength,
        lora_attach,
        lora_remove,
        companion,
    )


def check_companion(wb: Workbench, path: str | None, companion: str | None) -> None:
    """ValueError for a ``.gguf`` transformer without a companion folder: the file holds neither text encoders nor
    a VAE. ``path`` is a typed path or an allowed model's name, as the policy takes them."""
    if companion:
        return
    text = (path or "").strip()
    if not text:
        return
    source = Path(text) if wb.policy.free_paths else wb.policy.catalog.model(text)
    if source is not None and source.suffix.lower() == ".gguf":
        where = "a diffusers folder of the same family" if wb.policy.free_paths else "one of the model folders"
        raise ValueError(
            f"{COMPANION_LABEL}: {source.name!r} is a GGUF transformer alone, without text encoders or VAE; "
            f"give {where} to take them from"
        )


def wire(tab: ModelTab, wb: Workbench, model_updates: Callable[[bool], dict]) -> None:
    """Load replaces the shared pipeline and resets every model-dependent widget (bounds, defaults, experts). A
    failed load changes nothing but the message under the Load button (no error badges on the other tabs)."""
    targets = [tab.info, tab.message, *model_updates(True).keys()]

    def load(path: str, quantization: str, offload: str, companion: str | None = None) -> dict:
        try:
            with page_errors("Loading the model"):
                folder = None if (companion or "").strip() in ("", NO_COMPANION) else companion
                check_companion(wb, path, folder)
                pipe = wb.load(path, none_if_text_none(quantization), none_if_text_none(offload), folder)
        except gr.Error as err:
            return {tab.message: f"**Not loaded:** {err.message}"}
        gr.Info(f"Loaded {pipe.name}")
        return {tab.info: wb.describe(), tab.message: f"Loaded **{pipe.name}**.", **model_updates(True)}

    tab.load.click(
        load,
        [tab.path, tab.quantization, tab.offload, tab.companion],
        targets,
        api_visibility="private",
        concurrency_id=MODEL_CONCURRENCY,
        show_progress_on=[tab.message],
    )

    def attach(path: str, strength: float) -> str:
        with page_errors("Attaching the LoRA"):
            name = wb.attach_lora(path, strength)
        gr.Info(f"LoRA {name} attached at strength {strength:g}")
        return wb.describe()

    def remove() -> str:
        wb.remove_loras()
        return wb.describe()

    private = dict(api_visibility="private", concurrency_id=MODEL_CONCURRENCY)
    tab.lora_attach.click(attach, [tab.lora_path, tab.lora_strength], [tab.info], **private)
    tab.lora_remove.click(remove, [], [tab.info], **private)
