"""Property tests of every parser that reads bytes from the network.

The property, for each: a correct result, or a tinyserve ``InputError`` (a clear 4xx), never
another exception, in bounded time and memory per input. Valid inputs are checked against a
reference (python-multipart for the multipart splitter) or by a round trip (the V2 codec,
base64). ``TINYSERVE_FUZZ_EXAMPLES`` sets the examples per property (default 60; the
reliability run sets 250, as for tests/test_fuzz.py).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import resource
import struct
import time
import zlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from conftest import SAMPLES
from tinyserve.asgi import Part, parse_multipart, read_body
from tinyserve.errors import InputError, InvalidParameter, PayloadTooLarge
from tinyserve.imaging import Decoded, ImageLimits, decode_base64, decode_upload
from tinyserve.manifest import InputSpec
from tinyserve.registry import LoadedModel
from tinyserve.v2_tensors import InferRequest, Tensor, decompress, split_body

pytestmark = pytest.mark.reliability
EXAMPLES = int(os.environ.get("TINYSERVE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # time is bounded by the explicit per-input check below
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SECONDS_PER_INPUT = 2.0  # generous for a busy 2-core machine; a hang or a bomb takes far longer


def bounded(parse: Callable[[], Any]) -> Any:
    """``parse()``'s result or its ``InputError``; any other exception fails the property."""
    started = time.perf_counter()
    try:
        result: Any = parse()
    except InputError as exc:
        assert exc.message, "an input error must say what is wrong"
        result = exc
    elapsed = time.perf_counter() - started
    assert elapsed < SECONDS_PER_INPUT, f"one input took {elapsed:.2f} s"
    return result


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- multipart: the splitter against python-multipart ---------------------------------------

_TOKEN = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_"), min_size=1, max_size=12)
_BOUNDARY = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?"),
    min_size=1,
    max_size=70,
).filter(lambda b: not b.endswith(" "))
_FILENAME = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\'), max_size=20
)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str, list[Part]]:
    """A well-formed body, its content type and the parts it holds."""
    boundary = draw(_BOUNDARY)
    parts: list[Part] = []
    for _ in range(draw(st.integers(1, 6))):
        name = draw(_TOKEN)
        filename = draw(st.none() | _FILENAME)
        data = draw(st.binary(max_size=200))
        delimiter = ("--" + boundary).encode()
        assume(b"\r\n" + delimiter not in b"\r\n" + data + b"\r\n")
        parts.append(Part(name, filename, data))
    chunks = [draw(st.sampled_from([b"", b"a preamble\r\n"]))]
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode())
        if draw(st.booleans()):
            chunks.append(b"Content-Type: application/octet-stream\r\n")
        chunks.append(b"\r\n" + part.data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    quoted = draw(st.booleans())
    content_type = (
        f'multipart/form-data; boundary="{boundary}"'
        if quoted
        else (f"multipart/form-data; boundary={boundary}")
    )
    if not quoted:
        assume(all(c not in boundary for c in " ;,"))
    return b"".join(chunks), content_type, parts


def reference_parts(body: bytes, boundary: str) -> list[Part]:
    """What python-multipart reads from ``body``."""
    parts: list[Part] = []
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        state.update(headers={}, data=bytearray(), field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        _, params = parse_options_header(state["headers"][b"content-disposition"])
        filename = params.get(b"filename")
        parts.append(
            Part(
                params[b"name"].decode(),
                filename.decode("utf-8") if filename is not None else None,
                bytes(state["data"]),
            )
        )

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, cast(Any, callbacks), max_header_count=16)
    parser.write(body)
    parser.finalize()
    return parts


@FUZZ
@given(multipart_bodies())
def test_multipart_splitter_agrees_with_python_multipart(
    case: tuple[bytes, str, list[Part]],
) -> None:
    body, content_type, expected = case
    ours = parse_multipart(body, content_type, 100)
    assert ours == expected
    if body.startswith(b"--"):  # python-multipart reads no preamble (RFC 2046 allows one)
        boundary = content_type.partition("boundary=")[2].strip('"')
        assert reference_parts(body, boundary) == expected


@st.composite
def mangled(draw: st.DrawFn, valid: st.SearchStrategy[tuple[bytes, str, list[Part]]]) -> bytes:
    body = draw(valid)[0]
    how = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    at = draw(st.integers(0, max(0, len(body) - 1)))
    if how == "truncate":
        return body[:at]
    if how == "flip":
        return body[:at] + bytes([body[at] ^ (1 << draw(st.integers(0, 7)))]) + body[at + 1 :]
    if how == "insert":
        junk = draw(st.sampled_from([b"\r\n", b"--", b"\r\n\r\n", b'"', b";", b"\x00", b"\xff"]))
        return body[:at] + junk + body[at:]
    return body[:at] + body[at + 5 :]


_HEADERS_LINES = st.lists(
    st.sampled_from(
        [
            b'Content-Disposition: form-data; name="file"; filename="a.png"',
            b"Content-Disposition: form-data; name=file; filename*=UTF-8''%C3%A9.png",
            b"Content-Disposition: form-data; name=\"f\"; filename*=bogus''%FF%FE",
            b"Content-Disposition: form-data; name=\"f\"; filename*=''",
            b"Content-Disposition: form-data; name*=x'y'z",
            b"Content-Disposition: attachment; name=a",
            b"content-disposition:form-data;name=a;name=b",
            b'Content-Disposition: form-data; name="\\""',
            b"Content-Type: image/png",
            b"X-\xff\xfe: \xff",
            b": no name",
            b"no colon",
        ]
    ),
    max_size=3,
)


@FUZZ
@given(
    st.one_of(
        mangled(multipart_bodies()),
        st.binary(max_size=300),
        st.builds(
            lambda lines, data: (
                b"--x\r\n" + b"\r\n".join(lines) + b"\r\n\r\n" + data + b"\r\n--x--"
            ),
            _HEADERS_LINES,
            st.binary(max_size=20),
        ),
    ),
    st.sampled_from(
        [
            "multipart/form-data; boundary=x",
            'multipart/form-data; boundary="x"',
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; BOUNDARY=x; charset=utf-8",
        ]
    ),
)
def test_multipart_splitter_never_fails_badly(body: bytes, content_type: str) -> None:
    result = bounded(lambda: parse_multipart(body, content_type, 8))
    if not isinstance(result, InputError):
        assert all(isinstance(p, Part) and isinstance(p.name, str) for p in result)
        assert len(result) <= 8


def test_multipart_with_many_parts_is_refused_quickly() -> None:
    part = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\nA\r\n'
    body = part * 10_000 + b"--x--\r\n"
    result = bounded(lambda: parse_multipart(body, "multipart/form-data; boundary=x", 66))
    assert isinstance(result, InvalidParameter) and "too many parts" in result.message


def test_regression_unknown_charset_in_rfc5987_filename_is_an_input_error() -> None:
    # Was a LookupError (500): unquote() was given the client's charset name as it came.
    body = (
        b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename*=nope''a%20b.png\r\n"
        b"\r\nDATA\r\n--x--\r\n"
    )
    parts = parse_multipart(body, "multipart/form-data; boundary=x", 4)
    assert parts == [Part("file", "a b.png", b"DATA")]


# -- the body reader --------------------------------------------------------------------


@FUZZ
@given(
    st.lists(st.binary(max_size=64), max_size=8),
    st.none() | st.text(max_size=8) | st.integers(0, 10**30).map(str),
)
def test_body_reader_reads_exactly_what_was_sent_or_refuses(
    chunks: list[bytes], declared: str | None
) -> None:
    import asyncio

    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.request", "body": b"", "more_body": False})
    feed = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(feed)

    result = bounded(lambda: asyncio.run(read_body(receive, declared, 256)))
    sent = b"".join(chunks)
    if isinstance(result, InputError):
        assert isinstance(result, PayloadTooLarge)
        assert len(sent) > 256 or (declared is not None and declared.isdigit())
    else:
        assert result == sent


def test_regression_non_ascii_digits_in_content_length_are_not_a_500() -> None:
    import asyncio

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"abc", "more_body": False}

    # '²'.isdigit() is true but int('²') raises ValueError (was a 500).
    assert asyncio.run(read_body(receive, "\xb2", 10)) == b"abc"


# -- base64 -----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["", "data:image/png;base64,"]))
def test_base64_round_trips(data: bytes, prefix: str) -> None:
    assert decode_base64(prefix + base64.b64encode(data).decode(), "'image'") == data


@FUZZ
@given(st.one_of(st.text(max_size=100), st.binary(max_size=50), st.integers(), st.none(),
                 st.lists(st.integers(), max_size=3)))  # fmt: skip
def test_base64_of_anything_is_bytes_or_an_input_error(value: object) -> None:
    result = bounded(lambda: decode_base64(value, "'image'"))
    assert isinstance(result, bytes | InputError)
    if isinstance(result, bytes) and isinstance(value, str) and not value.startswith("data:"):
        assert base64.b64encode(result).decode() == value


# -- the V2 tensor codec ------------------------------------------------------------------

SPEC = InputSpec(height=4, width=3, channels=1, color="L")
LABELS = tuple(f"class {i}" for i in range(5))
MODEL = cast(
    LoadedModel,
    SimpleNamespace(
        name="m",
        version=1,
        engine=SimpleNamespace(input_name="pixels", output_name="logits"),
        manifest=SimpleNamespace(input=SPEC, num_classes=len(LABELS), labels=LABELS),
    ),
)
MAX_IMAGES = 8


def prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in items)


@st.composite
def v2_requests(draw: st.DrawFn) -> tuple[bytes, bytes, str | None, Any]:
    """A valid V2 request (JSON header, binary part, header length) and what it carries."""
    count = draw(st.integers(1, MAX_IMAGES))
    binary = draw(st.booleans())
    outputs = draw(
        st.none()
        | st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["logits", "probabilities"])},
                optional={
                    "parameters": st.fixed_dictionaries(
                        {},
                        optional={
                            "binary_data": st.booleans(),
                            "classification": st.integers(0, len(LABELS)),
                        },
                    )
                },
            ),  # fmt: skip
            min_size=1,
            max_size=2,
        )
    )
    if draw(st.booleans()):
        images = draw(st.lists(st.binary(max_size=40), min_size=count, max_size=count))
        tensor: dict[str, Any] = {"name": "image", "datatype": "BYTES", "shape": [count]}
        payload, expected = prefixed(images), images
        if not binary:
            tensor["data"] = [base64.b64encode(v).decode() for v in images]
    else:
        shape = [count, *SPEC.shape]
        pixels = draw(st.binary(min_size=count * 12, max_size=count * 12))
        expected = np.frombuffer(pixels, np.uint8).reshape(shape)
        tensor = {"name": "pixels", "datatype": "UINT8", "shape": shape}
        payload = pixels
        if not binary:
            nested = draw(st.booleans())
            tensor["data"] = expected.tolist() if nested else expected.reshape(-1).tolist()
    request: dict[str, Any] = {"inputs": [tensor]}
    if outputs is not None:
        request["outputs"] = outputs
    if draw(st.booleans()):
        request["id"] = draw(st.text(max_size=10))
    header = orjson.dumps(request if not binary else _with_size(request, len(payload)))
    if binary:
        return header, payload, str(len(header)), expected
    return header, b"", None, expected


def _with_size(request: dict[str, Any], size: int) -> dict[str, Any]:
    request["inputs"][0]["parameters"] = {"binary_data_size": size}
    return request


@FUZZ
@given(v2_requests())
def test_v2_requests_round_trip(case: tuple[bytes, bytes, str | None, Any]) -> None:
    header, payload, length, expected = case
    head, rest = split_body(header + payload, length)
    request = InferRequest.parse(head, rest, MODEL, MAX_IMAGES)
    if isinstance(expected, list):
        assert request.encoded == expected and request.pixels is None
    else:
        assert request.pixels is not None and np.array_equal(request.pixels, expected)
    logits = np.random.default_rng(0).normal(size=(len(expected), len(LABELS))).astype("f4")
    for tensor in request.outputs(logits, MODEL):
        assert tensor.shape[0] == len(expected)
        if tensor.datatype == "BYTES":  # the length prefixes written read back the same
            again = InferRequest.parse(
                orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES",
                                          "shape": [tensor.values.size],
                                          "parameters": {"binary_data_size": len(tensor.raw())}}]}),
                tensor.raw(), MODEL, tensor.values.size,
            )  # fmt: skip
            assert again.encoded == list(tensor.values.reshape(-1))


_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
_JSON: st.SearchStrategy[Any] = st.deferred(
    lambda: (
        _SCALAR
        | st.lists(_JSON, max_size=4)
        | st.dictionaries(st.text(max_size=6), _JSON, max_size=4)
    )
)


@st.composite
def mutated_v2(draw: st.DrawFn) -> tuple[bytes, bytes, str | None]:
    """A V2 request with one part replaced by arbitrary JSON, or its bytes damaged."""
    header, payload, length, _ = draw(v2_requests())
    how = draw(st.sampled_from(["field", "bytes", "length", "payload"]))
    if how == "field":
        request = orjson.loads(header)
        tensor = request["inputs"][0]
        key = draw(
            st.sampled_from(
                [
                    "name",
                    "datatype",
                    "shape",
                    "data",
                    "parameters",
                    "outputs",
                    "inputs",
                    "id",
                    "binary_data_size",
                    "classification",
                ]
            )
        )
        value = draw(_JSON)
        if key in ("outputs", "inputs", "id"):
            request[key] = value
        elif key == "binary_data_size":
            tensor.setdefault("parameters", {})["binary_data_size"] = value
        elif key == "classification":
            request["outputs"] = [{"name": "probabilities", "parameters": {key: value}}]
        else:
            tensor[key] = value
        header = json.dumps(request).encode()  # orjson refuses integers past 64 bits
        if length is not None:
            length = str(len(header))
    elif how == "bytes":
        at = draw(st.integers(0, len(header) - 1))
        header = header[:at] + draw(st.binary(max_size=3)) + header[at + 1 :]
    elif how == "length":
        length = draw(st.text(max_size=6) | st.integers(-5, 10**6).map(str))
    else:
        payload = draw(st.binary(max_size=64)) if draw(st.booleans()) else payload[:-1]
    return header, payload, length


@FUZZ
@given(mutated_v2())
def test_v2_codec_answers_a_result_or_an_input_error(case: tuple[bytes, bytes, str | None]) -> None:
    header, payload, length = case

    def parse() -> InferRequest:
        head, rest = split_body(header + payload, length)
        request = InferRequest.parse(head, rest, MODEL, MAX_IMAGES)
        rows = len(request.encoded if request.encoded is not None else request.pixels)
        assert 1 <= rows <= MAX_IMAGES
        logits = np.zeros((rows, len(LABELS)), np.float32)
        for tensor in request.outputs(logits, MODEL):
            tensor.raw() if tensor.binary else tensor.json_data()
        return request

    bounded(parse)


@FUZZ
@given(st.lists(st.binary(max_size=30), max_size=6), st.integers(0, 40))
def test_bytes_length_prefixes_that_lie_are_refused(items: list[bytes], cut: int) -> None:
    raw = prefixed(items)
    raw = raw[: max(0, len(raw) - cut)]
    header = orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(items)],
                                       "parameters": {"binary_data_size": len(raw)}}]})  # fmt: skip
    result = bounded(lambda: InferRequest.parse(header, raw, MODEL, 100))
    if cut == 0 and items:
        assert not isinstance(result, InputError) and result.encoded == items
    elif isinstance(result, InferRequest):
        # Cutting whole elements off the end can leave a valid shorter list only if the
        # shape still matches, which it cannot: the count would differ.
        raise AssertionError(f"a cut of {cut} bytes was accepted: {result.encoded}")


def test_bytes_tensor_raw_writes_length_prefixes() -> None:
    values = np.array([b"ab", b"", b"xyz"], dtype=object)
    assert Tensor("t", "BYTES", values, True).raw() == prefixed([b"ab", b"", b"xyz"])


def test_regression_non_ascii_digits_in_the_header_length_are_an_input_error() -> None:
    # '²'.isdigit() is true but int('²') raises ValueError (was a 500).
    with pytest.raises(InvalidParameter, match="must be a number"):
        split_body(b"{}", "\xb2")


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(["gzip", "deflate"]))
def test_compressed_bodies_round_trip(data: bytes, encoding: str) -> None:
    packed = gzip.compress(data) if encoding == "gzip" else zlib.compress(data)
    assert decompress(packed, encoding, 2000) == data


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["gzip", "deflate", "br", " GZIP ", ""]))
def test_damaged_compressed_bodies_are_input_errors(data: bytes, encoding: str) -> None:
    result = bounded(lambda: decompress(data, encoding, 1000))
    assert isinstance(result, bytes | InputError)


def test_compression_bomb_is_refused_before_it_inflates() -> None:
    bomb = gzip.compress(b"\0" * 200_000_000, compresslevel=9)  # ~200 KB
    before = max_rss_mb()
    result = bounded(lambda: decompress(bomb, "gzip", 1_000_000))
    assert isinstance(result, PayloadTooLarge)
    assert max_rss_mb() - before < 50


# -- the image decoder --------------------------------------------------------------------

DECODE_SPEC = InputSpec(height=28, width=28, channels=1, color="L")
LIMITS = ImageLimits(max_bytes=2 * 1024 * 1024, max_pixels=4_000_000)


def _encoded(fmt: str, **params: Any) -> bytes:
    image = Image.open(SAMPLES / "0000_ankle-boot.png").convert("RGB").resize((40, 32))
    buffer = io.BytesIO()
    if fmt == "GIF-anim":
        frames = [image, image.rotate(90), image.rotate(180)]
        frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40)
    else:
        image.save(buffer, fmt, **params)
    return buffer.getvalue()


SEEDS: dict[str, bytes] = {
    "jpeg": _encoded("JPEG", quality=80),
    "jpeg-progressive-exif": _encoded("JPEG", progressive=True, exif=Image.Exif().tobytes()),
    "png": _encoded("PNG"),
    "webp": _encoded("WEBP", quality=70),
    "webp-lossless": _encoded("WEBP", lossless=True),
    "gif": _encoded("GIF"),
    "gif-animated": _encoded("GIF-anim"),
    "tiff": _encoded("TIFF"),
    "tiff-deflate": _encoded("TIFF", compression="tiff_adobe_deflate"),
    "bmp": _encoded("BMP"),
}


HUGE_FIELDS = [b"\xff\xff\xff\xff", b"\x7f\xff", b"\x00\x00", b"\x40\x00\x40\x00", b"\xff\xff"]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["truncate", "flip", "huge", "splice"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if how == "truncate":
            del data[at:]
        elif how == "flip":
            if data:
                data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "huge":  # a size field early in the file set large, as bombs do
            at = draw(st.integers(0, min(len(data), 64)))
            data[at : at + 4] = draw(st.sampled_from(HUGE_FIELDS))
        else:
            data[at:at] = draw(st.binary(max_size=16))
    return bytes(data)


def assert_decoded(result: Any) -> None:
    if not isinstance(result, InputError):
        assert isinstance(result, Decoded)
        assert result.pixels.shape == DECODE_SPEC.shape and result.pixels.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_image_decodes(name: str) -> None:
    assert_decoded(decode_upload(SEEDS[name], DECODE_SPEC, LIMITS))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # see below
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")  # "Corrupt EXIF data" and the like
@FUZZ
@given(damaged_images())
def test_damaged_images_decode_or_are_input_errors(data: bytes) -> None:
    assert_decoded(bounded(lambda: decode_upload(data, DECODE_SPEC, LIMITS)))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_size(width: int, height: int, body: bytes = b"\0" * 64) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) +
            _png_chunk(b"IDAT", zlib.compress(body)) + _png_chunk(b"IEND", b""))  # fmt: skip


def gif_of_size(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + b";"


def bmp_of_size(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + header + b"\0" * 16


def jpeg_of_size(width: int, height: int) -> bytes:
    data = bytearray(SEEDS["jpeg"])
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_of_size(width: int, height: int) -> bytes:
    data = bytearray(SEEDS["webp-lossless"])  # VP8L: 14-bit sizes minus one, after the signature
    at = data.find(b"VP8L") + 9
    flags = int.from_bytes(data[at : at + 4], "little") >> 28 << 28  # alpha hint and version
    bits = (width - 1) | ((height - 1) << 14) | flags
    data[at : at + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def tiff_of_size(width: int, height: int) -> bytes:
    image = Image.new("L", (8, 8))
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            if kind == 3:
                struct.pack_into("<HHIH", data, entry, tag, 3, 1, value)
            else:
                struct.pack_into("<HHII", data, entry, tag, 4, 1, value)
    return bytes(data)


HUGE_HEADERS = [png_of_size, gif_of_size, bmp_of_size, jpeg_of_size, webp_of_size, tiff_of_size]


# Pillow warns (and, over twice its own limit, refuses) past 89 M pixels; ours is lower.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")
@FUZZ
@given(
    st.sampled_from(HUGE_HEADERS),
    st.integers(1, 65_535),
    st.integers(1, 65_535),
)
def test_declared_sizes_are_checked_before_decoding(
    make: Callable[[int, int], bytes], width: int, height: int
) -> None:
    if make is webp_of_size:
        width, height = min(width, 16_384), min(height, 16_384)
    before = max_rss_mb()
    result = bounded(lambda: decode_upload(make(width, height), DECODE_SPEC, LIMITS))
    if width * height > LIMITS.max_pixels:
        assert isinstance(result, PayloadTooLarge), (make.__name__, width, height, result)
    else:
        assert_decoded(result)
    # A declared size is never allocated past the pixel limit (4 M grey pixels, 4 MB).
    assert max_rss_mb() - before < 200
