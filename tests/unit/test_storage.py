"""Atomic writes and manifests."""

import os

import pytest

from services.runtime import storage
from services.runtime.storage import (
    Manifest,
    atomic_write_bytes,
    atomic_write_json,
    load_manifest,
    write_manifest,
)


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 1\n}'
    assert os.listdir(tmp_path) == ["f.json"]


def test_manifest_round_trip(tmp_path):
    assert load_manifest(tmp_path) is None
    manifest = Manifest(version=3, spec={"model": "m"}, model_id="m", extra={"vectors": 5})
    write_manifest(tmp_path, manifest)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.version_dir_name == "v000003"


def test_tree_size_skips_what_vanishes(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"12345")
    (tmp_path / "g").write_bytes(b"123")
    (tmp_path / "gone").write_bytes(b"1")
    assert storage.tree_size(tmp_path) == 9
    stat = os.stat

    def racing_stat(path, *args, **kwargs):
        if str(path).endswith("gone"):
            raise FileNotFoundError(path)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(storage.os, "stat", racing_stat)
    assert storage.tree_size(tmp_path) == 8
    assert storage.tree_size(tmp_path / "missing") == 0
