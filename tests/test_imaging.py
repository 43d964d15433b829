from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import png_claiming_size
from tinyserve.errors import ImageDecodeError, PayloadTooLarge, UnsupportedMediaType
from tinyserve.imaging import ImageLimits, decode_image
from tinyserve.manifest import InputSpec

RGB = InputSpec(8, 8, 3, "RGB")
GREY = InputSpec(8, 8, 1, "L")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def solid(mode: str, color: object, size: tuple[int, int] = (32, 24)) -> Image.Image:
    return Image.new(mode, size, color)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_accepted_format_decodes(fmt: str) -> None:
    pixels = decode_image(encode(solid("RGB", (250, 10, 10)), fmt), RGB)
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert pixels.flags["C_CONTIGUOUS"]
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 60


def test_colour_is_converted_to_the_model_mode() -> None:
    grey = decode_image(encode(solid("RGB", (255, 255, 255)), "PNG"), GREY)
    assert grey.shape == (8, 8, 1) and grey.min() == 255
    rgb = decode_image(encode(solid("L", 100), "PNG"), RGB)
    assert rgb.shape == (8, 8, 3) and set(np.unique(rgb)) == {100}
    cmyk = decode_image(encode(solid("CMYK", (0, 255, 255, 0)), "JPEG"), RGB)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    array = np.full((16, 16), 32768, dtype=np.uint16)
    pixels = decode_image(encode(Image.fromarray(array), "PNG"), GREY)
    assert 125 <= int(pixels.mean()) <= 130


def test_transparency_is_laid_over_the_background() -> None:
    palette = solid("P", 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    data = encode(palette, "PNG", transparency=1)
    assert decode_image(data, RGB).max() == 0  # transparent white over a black background
    white_bg = InputSpec(8, 8, 3, "RGB", background=255)
    assert decode_image(data, white_bg).min() == 255
    rgba = decode_image(encode(solid("RGBA", (255, 0, 0, 0)), "PNG"), RGB)
    assert rgba.max() == 0


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [solid("RGB", (255, 0, 0)), solid("RGB", (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    pixels = decode_image(buffer.getvalue(), RGB)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 60


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was rotated: display turned 90 degrees clockwise
    pixels = decode_image(encode(image, "JPEG", exif=exif), InputSpec(20, 10, 1, "L"))
    assert pixels.shape == (20, 10, 1)
    top, bottom = pixels[:8].mean(), pixels[12:].mean()
    assert top > 200 and bottom < 50  # the left half is now on top


def test_crop_policy_keeps_the_centre() -> None:
    image = Image.new("L", (300, 100), 0)
    image.paste(255, (100, 0, 200, 100))  # a white centre square
    spec = InputSpec(10, 10, 1, "L", resize="crop")
    centre = decode_image(encode(image, "PNG"), spec)
    assert centre[:, 1:-1].min() == 255 and centre.mean() > 240  # edges blend with the rest
    stretched = decode_image(encode(image, "PNG"), InputSpec(10, 30, 1, "L"))
    assert stretched[:, :8].max() < 30


def test_large_jpeg_uses_draft_mode_and_keeps_content() -> None:
    big = Image.new("RGB", (4000, 3000), (10, 200, 10))
    pixels = decode_image(encode(big, "JPEG", quality=80), InputSpec(224, 224, 3))
    assert pixels.shape == (224, 224, 3) and pixels[..., 1].mean() > 180


@pytest.mark.parametrize(
    "data,error,message",
    [
        (b"", ImageDecodeError, "empty"),
        (b"hello, this is text", ImageDecodeError, "not a recognised image"),
        (encode(solid("RGB", (1, 2, 3)), "PNG")[:60], ImageDecodeError, "damaged or truncated"),
        (encode(solid("RGB", (1, 2, 3), (64, 64)), "JPEG")[:300], ImageDecodeError, "truncated"),
        (encode(solid("RGB", (1, 2, 3)), "PCX"), UnsupportedMediaType, "PCX"),
    ],
)
def test_bad_images_raise_clear_errors(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_image(data, RGB)


def test_limits_are_checked_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode_image(b"x" * 101, RGB, ImageLimits(max_bytes=100))
    with pytest.raises(PayloadTooLarge, match="more pixels than the limit"):
        decode_image(png_claiming_size(30000, 30000), RGB)  # Pillow's own bomb check fires
    with pytest.raises(PayloadTooLarge, match="is 8000x6000 = 48,000,000 pixels"):
        decode_image(png_claiming_size(8000, 6000), RGB)  # our (lower) limit fires


def test_exif_orientation_in_a_png_is_applied() -> None:
    image = Image.new("L", (40, 20), 0)
    image.paste(255, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = decode_image(encode(image, "PNG", exif=exif), InputSpec(20, 10, 1, "L"))
    assert pixels[:8].mean() > 200 and pixels[12:].mean() < 50
