"""The bad-input corpus's bodies: small ones are committed under files/, large ones made here.

``python tests/corpus/generate.py`` rewrites files/ from the makers below (every maker whose
output is under 64 KB); test_corpus.py calls the others at test time, so no megabytes are
committed. The expected answer of each case is in cases.toml, not here.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
FILES = HERE / "files"
SAMPLE = HERE.parent.parent / "samples" / "fashion" / "0000_ankle-boot.png"
COMMITTED_LIMIT = 64 * 1024


def _boot(mode: str = "L") -> Image.Image:
    return Image.open(SAMPLE).convert(mode)


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes, extra: bytes = b"", color: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))  # fmt: skip


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "corpus") -> bytes:
    out = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
        out.append(data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def _v2(tensor: dict[str, object], **request: object) -> bytes:
    return json.dumps({"inputs": [tensor], **request}).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BOOT_PNG = SAMPLE.read_bytes()
BOOT_JPEG = _save(_boot("RGB"), "JPEG", quality=85)


# -- images: truncated, damaged, unsupported ---------------------------------------------


def truncated_jpeg() -> bytes:
    return BOOT_JPEG[: len(BOOT_JPEG) // 3]


def truncated_png() -> bytes:
    return BOOT_PNG[:70]


def truncated_webp() -> bytes:
    data = _save(_boot("RGB"), "WEBP", quality=80)
    return data[: len(data) // 2]


def truncated_gif() -> bytes:
    return _save(_boot(), "GIF")[:40]


def truncated_tiff() -> bytes:
    data = _save(_boot(), "TIFF")
    return data[:12]


def bitflipped_png() -> bytes:
    data = bytearray(BOOT_PNG)
    data[40] ^= 0x10  # inside IDAT: the CRC no longer matches
    return bytes(data)


def ico_image() -> bytes:
    return _save(_boot("RGB"), "ICO")


def pcx_image() -> bytes:
    return _save(_boot(), "PCX")


def svg_text() -> bytes:
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><rect/></svg>'


def plain_text() -> bytes:
    return b"hello, this is not an image\n"


# -- decompression bombs in each format ---------------------------------------------------


def png_bomb() -> bytes:  # 100,000 x 100,000 declared
    return _png(100_000, 100_000, zlib.compress(b"\0" * 4096))


def png_zlib_bomb() -> bytes:  # within the pixel limit: 6,000 x 6,000 of zeros, ~36 KB
    row = b"\0" * 6001
    return _png(6000, 6000, zlib.compress(row * 6000, 9))


def png_ztxt_bomb() -> bytes:  # a zTXt chunk inflating to 50 MB
    text = b"Comment\0\0" + zlib.compress(b"A" * 50_000_000, 9)
    return _png(28, 28, zlib.compress(b"\0" * (29 * 28)), _chunk(b"zTXt", text))


def png_10000_chunks() -> bytes:
    chunks = b"".join(_chunk(b"tEXt", b"k%d\0v" % i) for i in range(10_000))
    return _png(28, 28, zlib.compress(b"\0" * (29 * 28)), chunks)


def jpeg_bomb() -> bytes:  # the frame header declares 65,500 x 65,500
    data = bytearray(BOOT_JPEG)
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65_500, 65_500)
    return bytes(data)


def jpeg_huge_exif() -> bytes:  # 16 APP1 segments of 65 KB each before the image
    exif = _save(_boot(), "JPEG", exif=Image.Exif().tobytes())
    segment = b"\xff\xe1" + struct.pack(">H", 65_535) + b"Exif\0\0" + b"\0" * 65_527
    return exif[:2] + segment * 16 + exif[2:]


def webp_bomb() -> bytes:  # lossless header declaring 16,384 x 16,384
    data = bytearray(_save(_boot("RGB"), "WEBP", lossless=True))
    at = data.find(b"VP8L") + 9
    flags = int.from_bytes(data[at : at + 4], "little") >> 28 << 28
    data[at : at + 4] = (16_383 | (16_383 << 14) | flags).to_bytes(4, "little")
    return bytes(data)


def gif_bomb() -> bytes:  # screen and frame declare 65,535 x 65,535
    screen = struct.pack("<HHBBB", 65_535, 65_535, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65_535, 65_535, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def gif_10000_frames() -> bytes:
    frames = [Image.new("L", (28, 28), i % 256) for i in range(10_000)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)


def tiff_bomb() -> bytes:  # 1,000,000 x 1,000,000 in the first IFD
    data = bytearray(_save(Image.new("L", (8, 8)), "TIFF"))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            struct.pack_into("<HHII", data, entry, tag, 4, 1, 1_000_000)
    return bytes(data)


def bmp_bomb() -> bytes:  # 50,000 x 50,000 x 24 bits, 16 bytes of pixels
    header = struct.pack("<IiiHHIIiiII", 40, 50_000, 50_000, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + header + b"\0" * 16


# -- bodies -------------------------------------------------------------------------------


def body_over_limit() -> bytes:
    return BOOT_PNG + b"\0" * (5 * 1024 * 1024)


def json_nested_10000() -> bytes:
    return b'{"image": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"


def json_nan() -> bytes:
    return b'{"image": "' + _b64(BOOT_PNG).encode() + b'", "top_k": NaN}'


def json_array() -> bytes:
    return b'["not", "an", "object"]'


def json_bad() -> bytes:
    return b'{"image": '


def json_missing_image() -> bytes:
    return json.dumps({"picture": _b64(BOOT_PNG)}).encode()


def json_bad_base64() -> bytes:
    return json.dumps({"image": "@@@ not base64 @@@"}).encode()


def json_non_ascii_base64() -> bytes:
    return json.dumps({"image": "ïmägé=="}, ensure_ascii=False).encode()


def json_image_number() -> bytes:
    return json.dumps({"image": 12345}).encode()


def json_top_k_string() -> bytes:
    return json.dumps({"image": _b64(BOOT_PNG), "top_k": "many"}).encode()


def json_top_k_bool() -> bytes:
    return json.dumps({"image": _b64(BOOT_PNG), "top_k": True}).encode()


def json_top_k_huge() -> bytes:
    return b'{"image": "' + _b64(BOOT_PNG).encode() + b'", "top_k": 1' + b"0" * 400 + b"}"


def json_data_url() -> bytes:
    return json.dumps({"image": "data:image/png;base64," + _b64(BOOT_PNG)}).encode()


def json_batch_not_list() -> bytes:
    return json.dumps({"images": _b64(BOOT_PNG)}).encode()


def json_batch_empty() -> bytes:
    return json.dumps({"images": []}).encode()


def json_batch_one_bad() -> bytes:
    return json.dumps({"images": [_b64(BOOT_PNG), _b64(b"not an image")]}).encode()


def multipart_unterminated() -> bytes:
    return _multipart([("file", "a.png", BOOT_PNG)])[:-12]


def multipart_no_file() -> bytes:
    return _multipart([("note", None, b"hello")])


def multipart_10000_parts() -> bytes:
    return _multipart([("files", f"{i}.png", b"x") for i in range(10_000)])


def multipart_unicode_filename() -> bytes:
    return _multipart([("files", "ботинок 👢 é.png", BOOT_PNG)])


def multipart_traversal_filename() -> bytes:
    return _multipart([("files", "../../etc/passwd", BOOT_PNG)])


def multipart_rfc5987_unknown_charset() -> bytes:
    head = (b"--corpus\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename*=rot13''n.cat\r\n\r\n")  # fmt: skip
    return head + BOOT_PNG + b"\r\n--corpus--\r\n"


def multipart_top_k_text() -> bytes:
    return _multipart([("file", "a.png", BOOT_PNG), ("top_k", None, b"lots")])


def multipart_65_files() -> bytes:
    return _multipart([("files", f"{i}.png", BOOT_PNG) for i in range(65)])


# -- V2 -------------------------------------------------------------------------------------


def v2_bytes_ok() -> bytes:
    return _v2({"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(BOOT_PNG)]})


def v2_nested_10000() -> bytes:
    head = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28, 1], "data": '
    return head + b"[" * 10_000 + b"]" * 10_000 + b"}]}"


def v2_fp32_nan_json() -> bytes:
    return (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 28, 28, 1], '
            b'"data": [NaN, Infinity, -Infinity]}]}')  # fmt: skip


def v2_fp32_nan_binary() -> bytes:
    values = struct.pack("<3f", float("nan"), float("inf"), float("-inf")) * 262
    values = values[: 784 * 4] + b"\0" * max(0, 784 * 4 - len(values))
    header = _v2({"name": "pixels", "datatype": "FP32", "shape": [1, 28, 28, 1],
                  "parameters": {"binary_data_size": len(values)}})  # fmt: skip
    return header + values


def v2_uint8_floats() -> bytes:
    return _v2({"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28, 1],
                "data": [1e308] * 784})  # fmt: skip


def v2_uint8_out_of_range() -> bytes:
    return _v2({"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28, 1],
                "data": [256] * 784})  # fmt: skip


def v2_binary_bytes_prefix_lies() -> bytes:
    raw = struct.pack("<I", 1_000_000) + BOOT_PNG[:10]
    header = _v2({"name": "image", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": len(raw)}})  # fmt: skip
    return header + raw


def v2_header_bytes() -> bytes:
    """The JSON header alone (its length goes in Inference-Header-Content-Length)."""
    return _v2({"name": "image", "datatype": "BYTES", "shape": [1],
                "parameters": {"binary_data_size": 4 + len(BOOT_PNG)}})  # fmt: skip


def v2_binary_ok() -> bytes:
    return v2_header_bytes() + struct.pack("<I", len(BOOT_PNG)) + BOOT_PNG


def v2_65_images() -> bytes:
    return _v2({"name": "image", "datatype": "BYTES", "shape": [65], "data": [_b64(BOOT_PNG)] * 65})


def v2_gzip_bomb() -> bytes:
    return gzip.compress(b" " * 200_000_000, 9, mtime=0)


def v2_gzip_damaged() -> bytes:
    return gzip.compress(v2_bytes_ok(), mtime=0)[:-20]


def v2_outputs_unknown() -> bytes:
    return _v2({"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(BOOT_PNG)]},
               outputs=[{"name": "../logits"}])  # fmt: skip


def v2_classification_huge() -> bytes:
    return _v2(
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(BOOT_PNG)]},
        outputs=[{"name": "probabilities", "parameters": {"classification": 10**30}}],
    )


def empty() -> bytes:
    return b""


MAKERS: dict[str, Callable[[], bytes]] = {
    name: fn for name, fn in list(globals().items())
    if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", None) == __name__
    and name != "write_files" and name != "make"
}  # fmt: skip


def make(name: str) -> bytes:
    """The body named ``name``: the committed file if there is one, else made now."""
    path = FILES / f"{name}.bin"
    return path.read_bytes() if path.is_file() else MAKERS[name]()


def write_files() -> list[Path]:
    """Write every maker's body under 64 KB to files/ (the committed part of the corpus)."""
    FILES.mkdir(exist_ok=True)
    written = []
    for name, maker in sorted(MAKERS.items()):
        data = maker()
        if len(data) <= COMMITTED_LIMIT:
            path = FILES / f"{name}.bin"
            path.write_bytes(data)
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write_files():
        print(path.relative_to(HERE), path.stat().st_size, file=sys.stderr)
