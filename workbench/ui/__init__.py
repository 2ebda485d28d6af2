"""The Gradio workbench: one module per tab, shared state in :mod:`workbench.ui.session`, shared widgets in
:mod:`workbench.ui.controls`, the assembled app in :mod:`workbench.ui.builder` (``build_app``)."""
