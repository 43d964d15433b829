from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tinyserve.errors import ModelError
from tinyserve.manifest import InputSpec, Manifest, read_manifest, write_manifest


def _identity_model() -> onnx.ModelProto:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph)


def test_round_trip_through_onnx_metadata(tmp_path) -> None:  # type: ignore[no-untyped-def]
    manifest = Manifest(
        labels=("cat", "dog"),
        input=InputSpec(224, 224, 3, "RGB", resize="crop", crop_fraction=0.875),
        source={"architecture": "x", "accuracy": 0.9},
    )
    model = _identity_model()
    model.metadata_props.add(key="other", value="kept")
    write_manifest(model, manifest)
    write_manifest(model, manifest.with_source(run_id="abc"))  # rewriting replaces, not appends
    onnx.save(model, str(tmp_path / "m.onnx"))
    back = read_manifest(tmp_path / "m.onnx")
    assert back.labels == manifest.labels
    assert back.input == manifest.input
    assert back.source == {"architecture": "x", "accuracy": 0.9, "run_id": "abc"}
    keys = [p.key for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props]
    assert sorted(keys) == ["other", "tinyserve.input", "tinyserve.labels", "tinyserve.source"]


def test_model_without_metadata_is_explained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    onnx.save(_identity_model(), str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelError, match="no tinyserve metadata"):
        read_manifest(tmp_path / "plain.onnx")
    with pytest.raises(ModelError, match="malformed"):
        Manifest.from_metadata({"tinyserve.labels": "[", "tinyserve.input": "{}"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"height": 0, "width": 4}, "positive"),
        ({"height": 4, "width": 4, "color": "CMYK", "channels": 4}, "color"),
        ({"height": 4, "width": 4, "color": "L", "channels": 3}, "1 channels"),
        ({"height": 4, "width": 4, "resize": "fit"}, "resize"),
        ({"height": 4, "width": 4, "crop_fraction": 1.5}, "crop_fraction"),
    ],
)
def test_input_spec_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InputSpec(**kwargs)  # type: ignore[arg-type]


def test_read_labels_takes_text_or_json(tmp_path: Path) -> None:
    from tinyserve.errors import ConfigError
    from tinyserve.manifest import read_labels

    (tmp_path / "a.txt").write_text("tabby, tabby cat\n  tiger cat \n\n")
    assert read_labels(tmp_path / "a.txt") == ("tabby, tabby cat", "tiger cat")
    (tmp_path / "b.json").write_text('["x", "y"]')
    assert read_labels(tmp_path / "b.json") == ("x", "y")
    (tmp_path / "c.json").write_text('{"1": "y", "0": "x"}')
    assert read_labels(tmp_path / "c.json") == ("x", "y")
    (tmp_path / "d.txt").write_text("x\n\ny\n")
    with pytest.raises(ConfigError, match="empty name at index 1"):
        read_labels(tmp_path / "d.txt")
    with pytest.raises(ConfigError, match="cannot read labels file"):
        read_labels(tmp_path / "missing.txt")
