"""SD3 Workbench, the Gradio app (also the Hugging Face Space entry point).

    python app.py                       # the embedded ShapesWorld model on http://127.0.0.1:7860
    python app.py --model PATH --port 7861 --host 0.0.0.0 --share

Listening beyond localhost, on a Space (``SPACE_ID``) or with ``--share`` the app is in public mode (README,
"Hosting"): the shared model cannot be changed, and limits bound the queue, the uploads and each request.
Unknown arguments are ignored (Spaces may pass their own). ``build_app`` is importable for tests.
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

from workbench.ui.builder import build_app, launch_options  # noqa: E402
from workbench.ui.hosting import parse_auth, resolve_policy  # noqa: E402

__all__ = ["build_app", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SD3 Workbench (Gradio app)")
    parser.add_argument("--model", default=os.environ.get("WORKBENCH_MODEL"), help="default: the embedded model")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--outputs", default="outputs", help="folder for the generated PNGs and videos")
    parser.add_argument(
        "--public",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="public mode: the model cannot be changed, hosting limits apply (default: on when the app is reachable "
        "beyond localhost, on a Space or with --share; $WORKBENCH_PUBLIC=1/0)",
    )
    parser.add_argument(
        "--allow-model-changes",
        action="store_true",
        help="let visitors load models and attach LoRAs from the allowed folders even in public mode "
        "($WORKBENCH_ALLOW_MODEL_CHANGES=1)",
    )
    parser.add_argument(
        "--model-dir", action="append", default=[], help="an allowed model folder (repeatable; $WORKBENCH_MODEL_DIRS)"
    )
    parser.add_argument(
        "--lora-dir", action="append", default=[], help="an allowed LoRA folder (repeatable; $WORKBENCH_LORA_DIRS)"
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="a ControlNet (diffusers folder or .safetensors file) visitors may choose by name (repeatable)",
    )
    parser.add_argument(
        "--controlnet-dir",
        action="append",
        default=[],
        help="a folder of ControlNets visitors may choose by name (repeatable; $WORKBENCH_CONTROLNET_DIRS)",
    )
    parser.add_argument(
        "--auth", default=os.environ.get("WORKBENCH_AUTH"), help="user:password login (several: a,b; $WORKBENCH_AUTH)"
    )
    args, _unknown = parser.parse_known_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    policy = resolve_policy(
        host=args.host,
        share=args.share,
        public=args.public,
        allow_model_changes=args.allow_model_changes,
        model_dirs=args.model_dir,
        lora_dirs=args.lora_dir,
        controlnets=args.controlnet,
        controlnet_dirs=args.controlnet_dir,
    )
    demo = build_app(args.model, output_dir=args.outputs, policy=policy)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=parse_auth(args.auth),
        **launch_options(demo),
    )


if __name__ == "__main__":
    main()
