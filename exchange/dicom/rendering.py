"""Frames and rendered images from DICOM pixel data (PS3.18 §8.3.5, §10.4.1.1.3).

Decoding is pydicom's; everything after it is pure functions of an array and
a few attributes, so the arithmetic can be tested without files: the Modality
LUT (rescale) turns stored values into meaningful ones (HU for CT), the VOI
window (PS3.3 C.11.2.1.2) maps them to 8 bits, MONOCHROME1 is inverted, and
colour passes through. Rendering is always from the original pixel data on
the server, so a viewer never needs the raw instance (an ``export``) to look.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from exchange.errors import BadRequest, ExchangeError

MediaType = Literal["image/png", "image/jpeg"]
MEDIA_TYPES: tuple[MediaType, ...] = ("image/png", "image/jpeg")
DEFAULT_QUALITY = 90
THUMBNAIL_SIZE = (128, 128)
#: What rendering needs beyond the Image Pixel module pydicom copies out anyway.
RENDERING_TAGS = [
    0x00080060,  # Modality
    0x00281050,  # WindowCenter
    0x00281051,  # WindowWidth
    0x00281052,  # RescaleIntercept
    0x00281053,  # RescaleSlope
    0x00281054,  # RescaleType
    0x00281056,  # VOILUTFunction
    0x00283000,  # ModalityLUTSequence
]
_FUNCTIONS = ("linear", "linear_exact", "sigmoid")
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_WHOLE = re.compile(r"[0-9]{1,5}")


class RenderingError(BadRequest):
    """A rendering parameter (window, viewport, quality) is not valid."""


class UndecodablePixels(ExchangeError):
    """The stored pixel data cannot be decoded here, so it cannot be served decoded."""

    status = 406
    code = "not-supported"


@dataclass(frozen=True)
class Window:
    """A VOI window: centre and width in modality units, and its function."""

    center: float
    width: float
    function: str = "linear"


# -- parameters ---------------------------------------------------------------


def _number(name: str, text: str) -> float:
    text = text.strip()
    if not _NUMBER.fullmatch(text) or not math.isfinite(float(text)):
        raise RenderingError(f"{name}: {text!r} is not a number")
    return float(text)


def parse_window(text: str) -> Window:
    """``center,width[,function]`` (PS3.18 8.3.5.1.4); function linear, linear_exact, sigmoid."""
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise RenderingError("window must be 'center,width' or 'center,width,function'")
    center = _number("window center", parts[0])
    width = _number("window width", parts[1])
    function = parts[2].strip().lower() if len(parts) == 3 else "linear"
    if function not in _FUNCTIONS:
        raise RenderingError(f"window function must be one of {', '.join(_FUNCTIONS)}")
    if width < (1 if function == "linear" else 0) or width == 0:
        raise RenderingError("window width must be at least 1 (greater than 0 for non-linear)")
    return Window(center, width, function)


def parse_viewport(text: str) -> tuple[int, int]:
    """``vw,vh`` in pixels; the image is scaled down to fit, keeping its aspect ratio."""
    parts = text.split(",")
    if len(parts) != 2 or not all(_WHOLE.fullmatch(p.strip()) for p in parts):
        raise RenderingError("viewport must be 'width,height' in whole pixels")
    width, height = (int(p) for p in parts)
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise RenderingError("viewport dimensions must be 1-16384 pixels")
    return width, height


def parse_quality(text: str) -> int:
    """JPEG quality 1-100."""
    if not _WHOLE.fullmatch(text.strip()) or not 1 <= int(text) <= 100:
        raise RenderingError("quality must be a whole number from 1 to 100")
    return int(text)


# -- pixel arithmetic -----------------------------------------------------------


def apply_window(values: NDArray[Any], window: Window) -> NDArray[np.uint8]:
    """Map modality values to 0-255 with the VOI function of PS3.3 C.11.2.1.2/3."""
    x = values.astype(np.float64)
    c, w = window.center, window.width
    y: NDArray[np.floating[Any]]
    if window.function == "sigmoid":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function == "linear_exact":
        y = ((x - c) / w + 0.5) * 255.0
    else:
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0 if w > 1 else (x > c - 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def default_window(values: NDArray[Any], ds: Dataset) -> Window:
    """The first window the data set states, else the full range of the frame."""
    centers, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    function = str(ds.get("VOILUTFunction") or "LINEAR").lower()
    if function not in _FUNCTIONS:
        function = "linear"
    try:
        center = float(centers[0] if isinstance(centers, MultiValue) else centers)
        width = float(widths[0] if isinstance(widths, MultiValue) else widths)
        if math.isfinite(center) and math.isfinite(width) and width >= 1:
            return Window(center, width, function)
    except (TypeError, ValueError, IndexError):
        pass
    low, high = float(values.min()), float(values.max())
    return Window((low + high + 1) / 2, max(high - low + 1, 1.0), "linear")


def display_image(
    frame: NDArray[Any], ds: Dataset, window: Window | None = None
) -> NDArray[np.uint8]:
    """An 8-bit grey (H, W) or RGB (H, W, 3) image of one decoded frame.

    ``frame`` is as pydicom decodes it (colour already converted to RGB); ``ds``
    carries the photometric interpretation, rescale, window and palette.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _to_8_bits(apply_color_lut(frame, ds))
    if frame.ndim == 3:  # RGB, or YBR that pydicom has converted to RGB
        return _to_8_bits(frame)
    values = apply_modality_lut(frame, ds)
    image = apply_window(values, window or default_window(values, ds))
    return 255 - image if photometric == "MONOCHROME1" else image


def _to_8_bits(image: NDArray[Any]) -> NDArray[np.uint8]:
    if image.dtype == np.uint8:
        return image
    peak = float(np.iinfo(image.dtype).max) if image.dtype.kind in "ui" else float(image.max())
    scaled = image.astype(np.float64) * (255.0 / peak) if peak > 0 else image
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def fit(size: tuple[int, int], viewport: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) scaled down to fit ``viewport``, aspect kept; never scaled up."""
    width, height = size
    if viewport is None:
        return size
    scale = min(viewport[0] / width, viewport[1] / height, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode(
    image: NDArray[np.uint8],
    media_type: MediaType = "image/png",
    *,
    viewport: tuple[int, int] | None = None,
    quality: int | None = None,
) -> bytes:
    """PNG (lossless, the default) or JPEG bytes of an 8-bit image."""
    picture = Image.fromarray(image)
    size = fit(picture.size, viewport)
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if media_type == "image/jpeg":
        picture.save(out, format="JPEG", quality=quality or DEFAULT_QUALITY)
    else:
        picture.save(out, format="PNG")
    return out.getvalue()


def render(
    frame: NDArray[Any],
    ds: Dataset,
    *,
    media_type: MediaType = "image/png",
    window: Window | None = None,
    viewport: tuple[int, int] | None = None,
    quality: int | None = None,
) -> bytes:
    """One decoded frame as an image file."""
    return encode(display_image(frame, ds, window), media_type, viewport=viewport, quality=quality)


# -- decoding -------------------------------------------------------------------


def check_decodable(transfer_syntax: str) -> None:
    """Refuse early (406) when no installed decoder handles ``transfer_syntax``."""
    uid = UID(transfer_syntax)
    try:
        available = get_decoder(uid).is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        raise UndecodablePixels(
            f"this node cannot decode {uid.name} pixel data (no decoder is installed); "
            "rendered images and uncompressed frames are not available for this instance"
        )


def frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def read_frame(source: BinaryIO, index: int, *, raw: bool = False) -> tuple[NDArray[Any], Dataset]:
    """Decode frame ``index`` (0-based) from a seekable Part 10 file, reading only that frame.

    Returns the array and the pixel-describing attributes. ``raw`` keeps the
    stored colour space (for frames retrieval) instead of converting to RGB.
    """
    attributes = Dataset()
    source.seek(0)
    try:
        frame = pixel_array(
            source, ds_out=attributes, specific_tags=RENDERING_TAGS, index=index, raw=raw
        )
    except Exception as exc:  # pydicom and its plugins raise many types on bad data
        raise UndecodablePixels(
            f"the pixel data could not be decoded ({type(exc).__name__})"
        ) from None
    return frame, attributes


def frame_bytes(frame: NDArray[Any]) -> bytes:
    """A decoded frame as little-endian bytes (Explicit VR Little Endian pixel layout)."""
    little = frame.astype(frame.dtype.newbyteorder("<"), copy=False)
    return bytes(np.ascontiguousarray(little).tobytes())
