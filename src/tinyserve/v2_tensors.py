"""V2 tensors on the wire: inference requests in, outputs out (JSON or binary).

An inference request carries one input: the model's UINT8 pixels ``[N, H, W, C]`` or a BYTES
tensor ``[N]`` of encoded images. With the binary tensor extension, a JSON header of
``Inference-Header-Content-Length`` bytes is followed by each binary tensor's bytes, BYTES
elements each with a 4-byte little-endian length prefix. Nothing here knows about HTTP.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from tinyserve.engine import Logits, softmax
from tinyserve.errors import (
    InvalidParameter,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from tinyserve.imaging import Pixels, decode_base64
from tinyserve.registry import LoadedModel

BYTES_INPUT = "image"  # the BYTES input of encoded images
PROBABILITIES = "probabilities"
_LENGTH = struct.Struct("<I")


@dataclass
class Tensor:
    """One output tensor before it is written as JSON or binary."""

    name: str
    datatype: str  # FP32 (a float32 array) or BYTES (an object array of bytes)
    values: np.ndarray[Any, Any]
    binary: bool

    @property
    def shape(self) -> list[int]:
        return list(self.values.shape)

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return b"".join(_LENGTH.pack(len(v)) + v for v in self.values.reshape(-1))
        return np.ascontiguousarray(self.values, dtype="<f4").tobytes()

    def json_data(self) -> list[Any]:
        if self.datatype == "BYTES":
            return [v.decode() for v in self.values.reshape(-1)]
        data: list[Any] = self.values.reshape(-1).tolist()
        return data


@dataclass
class RequestedOutput:
    """An output the client asked for: as binary or not, as top-k classes or not (0)."""

    name: str
    binary: bool
    classification: int


@dataclass
class InferRequest:
    """A validated inference request: its pixels or encoded images, and what to answer."""

    id: str | None
    pixels: Pixels | None
    encoded: list[bytes] | None
    requested: list[RequestedOutput]

    @classmethod
    def parse(
        cls, header: bytes, binary: bytes, model: LoadedModel, max_images: int
    ) -> InferRequest:
        data = json_object(header, "the inference request")
        inputs = data.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise InvalidParameter(
                f"'inputs' must list exactly one tensor: {model.engine.input_name!r} (UINT8 "
                f"pixels) or {BYTES_INPUT!r} (BYTES encoded images)"
            )
        tensor: dict[str, Any] = inputs[0]
        name, datatype = tensor.get("name"), tensor.get("datatype")
        shape = _shape(tensor.get("shape"))
        raw = _binary_input(tensor, binary)
        pixels, encoded = None, None
        if name == model.engine.input_name:
            if datatype != "UINT8":
                raise InvalidParameter(f"input {name!r} must be UINT8, got datatype {datatype!r}")
            pixels = _pixels(tensor, shape, raw, model)
            count = len(pixels)
        elif name == BYTES_INPUT:
            if datatype != "BYTES":
                raise InvalidParameter(f"input {name!r} must be BYTES, got datatype {datatype!r}")
            encoded = _encoded(tensor, shape, raw)
            count = len(encoded)
        else:
            raise InvalidParameter(
                f"unknown input {name!r}; this model takes {model.engine.input_name!r} (UINT8) "
                f"or {BYTES_INPUT!r} (BYTES)"
            )
        if count > max_images:
            raise PayloadTooLarge(f"{count} images in one request; the limit is {max_images}")
        binary_default = _parameters(data).get("binary_data_output") is True
        request_id = data.get("id")
        return cls(
            str(request_id) if request_id is not None else None,
            pixels,
            encoded,
            _requested(data.get("outputs"), model, binary_default),
        )

    def outputs(self, logits: Logits, model: LoadedModel) -> list[Tensor]:
        probabilities = softmax(logits.copy())
        by_name = {model.engine.output_name: logits, PROBABILITIES: probabilities}
        tensors = []
        for out in self.requested:
            values = by_name[out.name]
            if out.classification:
                labels = _classify(values, out.classification, model.manifest.labels)
                tensors.append(Tensor(out.name, "BYTES", labels, out.binary))
            else:
                tensors.append(Tensor(out.name, "FP32", values, out.binary))
        return tensors


def _requested(raw: object, model: LoadedModel, binary_default: bool) -> list[RequestedOutput]:
    names = (model.engine.output_name, PROBABILITIES)
    if raw is None:
        return [RequestedOutput(n, binary_default, 0) for n in names]
    if not isinstance(raw, list) or not raw:
        raise InvalidParameter("'outputs' must be a non-empty list of {\"name\": ...} objects")
    requested = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise InvalidParameter(
                f"unknown output {name!r}; this model has {', '.join(map(repr, names))}"
            )
        params = _parameters(item)
        binary = params.get("binary_data", binary_default)
        k = params.get("classification", 0)
        classes = model.manifest.num_classes
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= classes:
            raise InvalidParameter(f"classification must be between 1 and {classes}, got {k!r}")
        requested.append(RequestedOutput(name, binary is True, k))
    return requested


def _classify(values: Logits, k: int, labels: tuple[str, ...]) -> np.ndarray[Any, Any]:
    """Triton's classification strings ``value:index:label``, best first, ``[N, k]``."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    rows = [
        [f"{values[i, c]:f}:{c}:{labels[c]}".encode() for c in map(int, order[i])]
        for i in range(len(values))
    ]
    array = np.empty((len(rows), k), dtype=object)
    array[:] = rows
    return array


def _pixels(
    tensor: dict[str, Any], shape: list[int], raw: bytes | None, model: LoadedModel
) -> Pixels:
    expected = model.manifest.input.shape
    if len(shape) != 4 or tuple(shape[1:]) != expected or shape[0] < 1:
        dims = ", ".join(map(str, expected))
        raise InvalidParameter(f"a UINT8 input must be shaped [N, {dims}] with N >= 1, got {shape}")
    size = math.prod(shape)
    if raw is not None:
        if len(raw) != size:
            raise InvalidParameter(
                f"shape {shape} needs {size} bytes of UINT8 data, the binary data has {len(raw)}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InvalidParameter("the input 'data' must be a list (flat or nested)")
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise InvalidParameter("UINT8 'data' must be a flat or evenly nested list") from None
    if values.size != size:
        raise InvalidParameter(f"shape {shape} needs {size} values, 'data' holds {values.size}")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise InvalidParameter("UINT8 'data' must hold whole numbers from 0 to 255")
    return values.astype(np.uint8).reshape(shape)


def _encoded(tensor: dict[str, Any], shape: list[int], raw: bytes | None) -> list[bytes]:
    if len(shape) not in (1, 2) or shape[0] < 1 or (len(shape) == 2 and shape[1] != 1):
        raise InvalidParameter(f"a BYTES input must be shaped [N] (or [N, 1]), got {shape}")
    count = shape[0]
    if raw is not None:
        items: list[bytes] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise InvalidParameter("the BYTES binary data ends inside a length prefix")
            (length,) = _LENGTH.unpack_from(raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise InvalidParameter(
                    f"BYTES element {len(items)} declares {length} bytes past the binary data"
                )
            items.append(raw[offset : offset + length])
            offset += length
    else:
        items = [
            decode_base64(v, f"BYTES element {i}")
            for i, v in enumerate(_flatten(tensor.get("data")))
        ]
    if len(items) != count:
        raise InvalidParameter(f"shape {shape} needs {count} BYTES elements, got {len(items)}")
    return items


def _binary_input(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    """The input's binary data, or None when it comes as JSON ``data``."""
    size = _parameters(tensor).get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise InvalidParameter("the input has neither 'data' nor a binary_data_size parameter")
        if binary:
            raise InvalidParameter(
                f"{len(binary)} bytes follow the JSON header but no input has binary_data_size"
            )
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidParameter(f"binary_data_size must be a whole number, got {size!r}")
    if size != len(binary):
        raise InvalidParameter(
            f"binary_data_size is {size} but {len(binary)} bytes follow the JSON header"
        )
    return binary


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary part, given the Inference-Header-Content-Length."""
    if header_length is None:
        return body, b""
    if not (header_length.strip().isascii() and header_length.strip().isdigit()):
        raise InvalidParameter(
            f"Inference-Header-Content-Length must be a number: {header_length!r}"
        )
    n = int(header_length)
    if n > len(body):
        raise InvalidParameter(
            f"Inference-Header-Content-Length is {n} but the body holds only {len(body)} bytes"
        )
    return body[:n], body[n:]


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body after its Content-Encoding (gzip, deflate), held to ``limit`` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not accepted; use gzip or deflate"
        )
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidParameter(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit:,} bytes")
    if not inflater.eof:
        raise InvalidParameter(f"the {encoding} body is truncated")
    return out


def encode_response(
    model: LoadedModel, request: InferRequest, tensors: list[Tensor]
) -> tuple[bytes, int | None]:
    """The response body and, when outputs are binary, the length of its JSON header."""
    outputs, chunks = [], []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.binary:
            raw = t.raw()
            chunks.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = t.json_data()
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = outputs
    header = orjson.dumps(answer)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """``body`` parsed as a JSON object; ``what`` names it in the error."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidParameter(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidParameter(f"{what} must be a JSON object")
    return data


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    params = item.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidParameter("'parameters' must be a JSON object")
    return params


def _shape(raw: object) -> list[int]:
    if not isinstance(raw, list) or not all(type(d) is int and d >= 0 for d in raw):
        raise InvalidParameter(f"'shape' must be a list of whole numbers, got {raw!r}")
    return raw


def _flatten(data: object) -> list[Any]:
    """Tensor data given flat or nested (row-major), as one flat list."""
    if not isinstance(data, list):
        raise InvalidParameter("the input 'data' must be a list (flat or nested)")
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


__all__ = [
    "BYTES_INPUT",
    "PROBABILITIES",
    "InferRequest",
    "RequestedOutput",
    "Tensor",
    "decompress",
    "encode_response",
    "json_object",
    "split_body",
]
