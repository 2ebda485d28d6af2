"""SD3 Workbench: SD3-style MMDiT text-to-image models with rectified flow and steerable MoE routing.

Public API::

    from workbench import load_pipeline
    pipe = load_pipeline()                      # the embedded ShapesWorld model; or a folder / .safetensors
    out = pipe("a red circle at the center on a white background", seed=0)
    out.images[0].save("circle.png")            # PNG info carries the parameters
"""

from workbench.flow import GenerationCancelled
from workbench.loading import ModelFormatError, load_pipeline, save_pipeline
from workbench.models.moe import RoutingRecord
from workbench.pipeline import GenerationOutput, Pipeline

__all__ = [
    "GenerationCancelled",
    "GenerationOutput",
    "ModelFormatError",
    "Pipeline",
    "RoutingRecord",
    "load_pipeline",
    "save_pipeline",
]
