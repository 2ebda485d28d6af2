"""ControlNet preprocessors that need no downloaded model: Canny edges (OpenCV), Gaussian blur, or the image as given.

Each takes a PIL image (any mode) and returns an RGB PIL image of the same size, ready to be passed as
``control_image``: Canny gives white edges on black (InstantX's and Stability's Canny ControlNets), blur a softened
copy (Stability's SD3.5 Blur ControlNet; radius in px), ``none`` the image converted to RGB.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

PREPROCESSORS = ("canny", "blur", "none")
CANNY_THRESHOLDS = (100, 200)
"""OpenCV's hysteresis thresholds (low, high) used by diffusers' and InstantX's Canny examples."""
BLUR_RADIUS = 8.0


def canny(image: Image.Image, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> Image.Image:
    """White Canny edges on black, ``(W, H)`` RGB (``cv2.Canny``, 3×3 Sobel) on the RGB image, as the original
    ControlNet annotator does: OpenCV takes, at each pixel, the channel with the strongest gradient, so an edge
    between two colours of equal brightness (green on gray) is still found, which a grayscale conversion loses."""
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - opencv-python-headless is in requirements.txt
        raise ImportError("the canny preprocessor needs OpenCV: pip install opencv-python-headless") from err
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    edges = cv2.Canny(np.ascontiguousarray(np.asarray(image.convert("RGB"))), low, high)
    return Image.fromarray(edges).convert("RGB")


def blur(image: Image.Image, radius: float = BLUR_RADIUS) -> Image.Image:
    """A Gaussian blur of ``radius`` px (PIL), RGB."""
    if not radius >= 0:
        raise ValueError(f"blur radius must be >= 0 px, got {radius!r}")
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))


def preprocess(image: Image.Image, name: str | None) -> Image.Image:
    """Apply the preprocessor ``name`` (one of :data:`PREPROCESSORS`; None means ``none``)."""
    name = name or "none"
    if name == "canny":
        return canny(image)
    if name == "blur":
        return blur(image)
    if name == "none":
        return image.convert("RGB")
    raise ValueError(f"preprocessor must be one of {', '.join(PREPROCESSORS)}, got {name!r}")
