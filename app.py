"""SD3 Workbench, the Gradio app (also the Hugging Face Space entry point).

    python app.py                       # the embedded ShapesWorld model on http://127.0.0.1:7860
    python app.py --model PATH --port 7861 --host 0.0.0.0 --share

Unknown arguments are ignored (Spaces may pass their own). ``build_app`` is importable for tests.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

from workbench.ui.builder import build_app  # noqa: E402

__all__ = ["build_app", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SD3 Workbench (Gradio app)")
    parser.add_argument("--model", default=os.environ.get("WORKBENCH_MODEL"), help="default: the embedded model")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--outputs", default="outputs", help="folder for the generated PNGs and videos")
    args, _unknown = parser.parse_known_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    demo = build_app(args.model, output_dir=args.outputs)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        allowed_paths=[str(demo.workbench.output_dir)],
    )


if __name__ == "__main__":
    main()
