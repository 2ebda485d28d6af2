"""The page style of the workbench tabs, as one hidden ``<style>`` element (:func:`stylesheet`): small renders fill
their image boxes (``elem_classes=["wb-upscale"]``), galleries stay inside their boxes, and text uses fonts that every
machine has (DejaVu / Liberation, installed with Chromium on Debian) instead of web fonts that need the network."""

from __future__ import annotations

import gradio as gr

UPSCALE = "wb-upscale"
LOCAL_FONTS = '"DejaVu Sans", "Liberation Sans", Arial, Helvetica, sans-serif'
LOCAL_MONO_FONTS = '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace'
CSS = f"""
.wb-style {{ display: none !important; }}
:root, .gradio-container, .gradio-container * {{
  --font: {LOCAL_FONTS} !important;
  --font-mono: {LOCAL_MONO_FONTS} !important;
}}
body, .gradio-container {{ font-family: {LOCAL_FONTS} !important; }}
.{UPSCALE} img {{ width: 100% !important; height: 100% !important; object-fit: contain !important; }}
.{UPSCALE} .image-container, .{UPSCALE} .image-frame {{ width: 100%; height: 100%; }}
#frames-gallery .grid-wrap, #frames-gallery .grid-container {{ max-width: 100%; overflow-x: hidden; }}
#frames-gallery .grid-container {{ grid-template-columns: repeat(auto-fill, minmax(88px, 1fr)) !important; }}
"""


def stylesheet() -> gr.HTML:
    """Render the style element in the current layout (once per app)."""
    return gr.HTML(f"<style>{CSS}</style>", elem_classes=["wb-style"], padding=False, container=False)
