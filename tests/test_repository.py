from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tinyserve.errors import ConfigError, ModelNotFound
from tinyserve.repository import ModelConfig, discover, list_versions, next_version, resolve


@pytest.fixture
def repo(tmp_path: Path, tiny_repo: Path) -> Path:
    src = tiny_repo / "colors" / "1" / "model.onnx"
    for version in (1, 2, 5):
        (tmp_path / "colors" / str(version)).mkdir(parents=True)
        shutil.copy(src, tmp_path / "colors" / str(version) / "model.onnx")
    (tmp_path / "colors" / "7").mkdir()  # an empty version folder is not a version
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_versions_and_the_next_free_number(repo: Path) -> None:
    assert list_versions(repo / "colors") == [1, 2, 5]
    assert next_version(repo / "colors") == 8
    assert next_version(repo / "absent") == 1
    assert list(discover(repo)) == ["colors"]


def test_resolve_takes_the_highest_version_unless_pinned(repo: Path) -> None:
    assert resolve(repo / "colors").version == 5
    assert resolve(f"{repo / 'colors'}:2").version == 2
    assert resolve(repo / "colors", version=1).path == repo / "colors" / "1" / "model.onnx"
    (repo / "colors" / "config.toml").write_text("version = 2\n[batching]\nmax_batch_size = 8\n")
    assert resolve(repo / "colors").version == 2
    assert ModelConfig.read(repo / "colors").batching == {"max_batch_size": 8}
    file_ref = resolve(repo / "colors" / "5" / "model.onnx")
    assert (file_ref.name, file_ref.version) == ("colors", 5)


def test_resolve_errors_name_what_exists(repo: Path) -> None:
    with pytest.raises(ModelNotFound, match="available: 1, 2, 5"):
        resolve(repo / "colors", version=3)
    with pytest.raises(ModelNotFound, match="neither a model file nor a model folder"):
        resolve(repo / "empty")
    (repo / "colors" / "config.toml").write_text("version = 'latest'\n")
    with pytest.raises(ConfigError, match="positive integer"):
        resolve(repo / "colors")
    (repo / "colors" / "config.toml").write_text("version = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(repo / "colors")


def test_one_model_file_or_folder_is_named_from_its_path(repo: Path, tmp_path: Path) -> None:
    from tinyserve.repository import model_files, model_name

    (repo / "colors" / "config.toml").write_text("version = 1\n[batching]\nmax_batch_size = 4\n")
    in_version = repo / "colors" / "2" / "model.onnx"
    assert model_name(in_version) == "colors"
    config, files = model_files(in_version)
    assert (config.version, config.versions, dict(config.batching)) == (
        2,
        (),
        {"max_batch_size": 4},
    )
    assert files == {2: in_version}
    assert model_name(repo / "colors") == "colors"
    assert sorted(model_files(repo / "colors")[1]) == [1, 2, 5]
    loose = tmp_path / "shoes.onnx"
    shutil.copy(in_version, loose)
    assert model_name(loose) == "shoes"
    assert model_files(loose) == (ModelConfig(), {1: loose})
    with pytest.raises(ConfigError, match="must start with a letter or digit"):
        model_name(loose.rename(tmp_path / "_bad.onnx"))
