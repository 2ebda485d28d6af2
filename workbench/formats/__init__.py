"""Checkpoint and adapter file formats: what the bytes on disk mean, separate from building models from them.

:mod:`~workbench.formats.files` reads safetensors and JSON and refuses pickles; :mod:`~workbench.formats.original`
maps the original single-file SD3 layout to diffusers names; :mod:`~workbench.formats.lora` reads LoRA files
(diffusers / PEFT, kohya / ComfyUI, original names). These modules import nothing from the workbench
except :mod:`workbench.models` configs; :mod:`workbench.loading` and :mod:`workbench.lora` build on them.
"""
