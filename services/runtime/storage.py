"""Crash-safe files: atomic writes and the manifest that names an index's live version.

Every index directory (`<home>/indexes/<tenant>/<index>/<backend>/`) holds a `manifest.json` and
one folder per version (`v000007/`). A writer puts the new version's files into a new folder, then
switches the manifest with `write_manifest` (a write to a temporary file in the same directory,
fsync, `os.replace`, fsync of the directory). Whatever the process dies on, the manifest on disk
names a complete version: the previous one until the rename, the new one after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST_NAME = "manifest.json"


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Writes `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def fsync_dir(path: Path | str) -> None:
    """Makes a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path | str) -> None:
    """Flushes every file under `path` and the directories themselves (before a manifest switch)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def link_or_copy(source: Path | str, target: Path | str) -> None:
    """Puts an immutable file of an older version folder into a new one: a hard link, or an atomic copy
    where links cannot be made (another filesystem)."""
    try:
        os.link(source, target)
    except OSError:
        target = Path(target)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def tree_size(path: Path | str) -> int:
    """Bytes of the files under `path`; files and folders that a writer removes meanwhile count 0."""
    size = 0
    for root, _dirs, files in os.walk(path):  # os.walk skips folders that vanish
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                size += os.stat(os.path.join(root, name)).st_size
    return size


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Manifest(BaseModel):
    """What an index directory serves: its committed version and how it was built."""

    version: int = 0
    spec: dict[str, Any] = Field(default_factory=dict)
    model_id: str = ""
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)
    # Backend-specific facts of the live version (dimension, counts, file names ...).
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def version_dir_name(self) -> str:
        return version_dir_name(self.version)


def version_dir_name(version: int) -> str:
    return f"v{version:06d}"


def load_manifest(directory: Path | str) -> Manifest | None:
    """The manifest of `directory`, or None when no version was ever committed there."""
    path = Path(directory) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return Manifest.model_validate_json(data)


def write_manifest(directory: Path | str, manifest: Manifest) -> None:
    """Switches `directory` to `manifest` atomically; this is the commit point of a new version."""
    atomic_write_json(Path(directory) / MANIFEST_NAME, manifest.model_dump(mode="json"))
