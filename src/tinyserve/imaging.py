"""Turn encoded image bytes into the uint8 ``[H, W, C]`` pixels a model's input spec asks for.

Decoding is bounded before any pixel is produced: the byte size, then the pixel count read
from the header. JPEGs much larger than the model input are decoded at a reduced scale in
the DCT domain (Pillow's draft mode), which is where most of the time goes for photos.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from tinyserve.errors import (
    ImageDecodeError,
    InvalidParameter,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from tinyserve.manifest import InputSpec

Pixels = npt.NDArray[np.uint8]

FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
_ROTATING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
# Formats whose EXIF block is read with the header; asking others for EXIF costs a full parse.
_EXIF_IN_HEADER = frozenset({"JPEG", "MPO", "WEBP", "TIFF"})


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what one image may cost to decode."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("image limits must be positive")


DEFAULT_LIMITS = ImageLimits()


@dataclass(slots=True)
class Decoded:
    """Model-ready pixels, and the ``[rows, cols, channels]`` of the image as uploaded
    (upright, after its EXIF orientation; channels as stored: 1 grey, 3 RGB, 4 with alpha)."""

    pixels: Pixels
    source_shape: tuple[int, int, int]


def decode_image(data: bytes, spec: InputSpec, limits: ImageLimits = DEFAULT_LIMITS) -> Pixels:
    """Decode ``data`` and return C-contiguous uint8 pixels shaped ``spec.shape``."""
    return decode_upload(data, spec, limits).pixels


def decode_upload(data: bytes, spec: InputSpec, limits: ImageLimits = DEFAULT_LIMITS) -> Decoded:
    """``decode_image``, also telling the shape the upload had before resizing."""
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"the image is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "the data is not a recognised image (expected JPEG, PNG, WebP, BMP, GIF or TIFF)"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(
            f"the image declares more pixels than the limit of {limits.max_pixels:,} pixels ({exc})"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"the image is damaged or truncated: {exc}") from exc
    with image:
        if image.format not in FORMATS:
            raise UnsupportedMediaType(
                f"image format {image.format} is not accepted; send JPEG, PNG, WebP, BMP, GIF "
                "or TIFF"
            )
        width, height = image.size
        if width * height > limits.max_pixels:
            raise PayloadTooLarge(
                f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
                f"{limits.max_pixels:,} pixels"
            )
        bands = 3 if image.mode == "P" else len(image.getbands())  # a palette holds colours
        try:
            pixels, turned = _to_pixels(image, spec)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(f"the image is damaged or truncated: {exc}") from exc
        rows, cols = (width, height) if turned else (height, width)
        return Decoded(pixels, (rows, cols, bands))


def decode_base64(value: object, where: str) -> bytes:
    """Bytes from a base64 string (a ``data:`` URL is accepted); ``where`` names it in errors."""
    if not isinstance(value, str):
        raise InvalidParameter(f"{where} must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]  # data:image/png;base64,....
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{where} is not valid base64") from None


def load_image(path: str | Path, spec: InputSpec, limits: ImageLimits = DEFAULT_LIMITS) -> Pixels:
    """Read and decode the image file at ``path``."""
    return decode_image(Path(path).read_bytes(), spec, limits)


def _to_pixels(image: Image.Image, spec: InputSpec) -> tuple[Pixels, bool]:
    """The pixels, and whether the EXIF orientation turned the image by 90 degrees."""
    orientation = _orientation(image) if image.format in _EXIF_IN_HEADER else 1
    if image.format in ("JPEG", "MPO"):
        # Ask for at least the size the resize step needs, in the file's own orientation.
        need_w, need_h = _needed_size(image.size, spec, orientation)
        image.draft(spec.color if image.mode in ("L", "RGB") else None, (need_w, need_h))
    image.load()
    if image.format not in _EXIF_IN_HEADER and "exif" in image.info:
        orientation = _orientation(image)  # PNG keeps EXIF in a chunk read with the pixels
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    image = _convert(image, spec)
    image = _resize(image, spec)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array), orientation in _ROTATING_ORIENTATIONS


def _orientation(image: Image.Image) -> int:
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))


def _needed_size(size: tuple[int, int], spec: InputSpec, orientation: int) -> tuple[int, int]:
    width, height = size
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    if spec.resize == "stretch":
        need_w, need_h = spec.width, spec.height
    else:
        scale = max(spec.width / width, spec.height / height) / spec.crop_fraction
        need_w, need_h = round(width * scale), round(height * scale)
    if orientation in _ROTATING_ORIENTATIONS:
        need_w, need_h = need_h, need_w
    return max(need_w, 1), max(need_h, 1)


def _convert(image: Image.Image, spec: InputSpec) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _high_depth_to_l(image)
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (spec.background,) * 3 + (255,))
        image = Image.alpha_composite(backdrop, rgba)
    if image.mode != spec.color:
        if spec.color == "L" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image = image.convert(spec.color)
    return image


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale 16- and 32-bit greyscale to 8 bits instead of clipping it."""
    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(array, 0.0, 255.0)
    else:
        peak = 65535.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        scaled = array.astype(np.float32) * (255.0 / peak)
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def _resize(image: Image.Image, spec: InputSpec) -> Image.Image:
    target = (spec.width, spec.height)
    if spec.resize == "stretch":
        if image.size == target:
            return image
        return image.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    width, height = image.size
    # Shorter side to size / crop_fraction, then the centre crop, done as one resize of a box.
    scale = max(spec.width / width, spec.height / height) / spec.crop_fraction
    box_w, box_h = spec.width / scale, spec.height / scale
    left, top = (width - box_w) / 2, (height - box_h) / 2
    box = (left, top, left + box_w, top + box_h)
    return image.resize(target, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
