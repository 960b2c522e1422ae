"""Training artifacts on disk: folders published whole, and the step checkpoints of a training run.

A model folder (what a model's `save` writes and its `load` reads) is built in a temporary sibling and
swapped in for the old one (`publish_dir`), so a reader finds the old folder or the complete new one,
never a half-written mix. A training run keeps its resumable state in `<out>/checkpoints/` (`Checkpoints`):
one `step-NNNNNNNN/` folder per saved step with the trained tensors, the optimizer's state and the
trainer's JSON state; nothing is pickled. Each is published the same way, so a folder with a step name is
complete: the newest is where a resumed run continues (`Checkpoints.start`, `Checkpoint.resume`), and
only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.runtime.model_errors import ArtifactError, ParamError
from services.runtime.storage import atomic_write_json, fsync_dir, fsync_tree

CHECKPOINTS_DIR = "checkpoints"  # a trainer's step checkpoints, inside its output folder
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_STEP = re.compile(r"step-(\d+)")
_RNG_KEY = "rng.torch"


def publish_dir(path: Path | str, build: Callable[[Path], None], *, carry: Iterable[str] = ()) -> None:
    """Calls `build(tmp)` to fill a new folder beside `path`, flushes it to disk and swaps it in for `path`.

    Entries named in `carry` that the old folder has and the new one lacks move into the new one (training
    state kept beside a model). If anything fails before the swap, `path` is left as it was. A folder cannot
    be renamed over a non-empty one, so the swap is two renames: between them `path` is briefly absent,
    and a crash there leaves the old folder beside it as `.<name>.<random>.old`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = tmp.with_suffix(".old")
    try:
        tmp.chmod(0o755)
        build(tmp)
        fsync_tree(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    if old.exists():
        for name in carry:
            if (old / name).exists() and not (path / name).exists():
                os.replace(old / name, path / name)
        fsync_dir(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_directory(path: Path | str, files: Mapping[str, bytes], *, carry: Iterable[str] = ()) -> None:
    """`publish_dir` of a folder holding exactly `files` (name -> content), plus what `carry` keeps."""

    def build(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    publish_dir(path, build, carry=carry)


def publish_file(path: Path | str, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` to create a temporary file beside `path`, flushes it and renames it to `path`
    (for files too large to hold as bytes; small ones go through `storage.atomic_write_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Checkpoint:
    """A complete step checkpoint: `weights_file` (the trained tensors, for the caller to load with the
    checks its model wants), the optimizer's state and the trainer's JSON state."""

    step: int
    path: Path

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    def _record(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATE_FILE).read_text())
        except FileNotFoundError:
            raise ArtifactError(
                f"{self.path}: no {STATE_FILE}; it was written in an older layout, train into another folder"
            ) from None

    def state(self) -> dict[str, Any]:
        """The trainer state given to `Checkpoints.save`."""
        return self._record()["state"]

    def check_run(self, run: Mapping[str, Any]) -> None:
        """ParamError naming `resume` unless the trainer state's "run" (the settings and data a run saved
        with every checkpoint) equals `run` on each of its keys: a resumed run must be the same run."""
        saved = self.state().get("run", {})
        changed = sorted(k for k in run if saved.get(k) != run[k])
        if changed:
            raise ParamError(
                "resume",
                f"{self.path} was trained with other settings or data ({', '.join(changed)}); "
                "a resumed run must use the same ones",
            )

    def resume(
        self, run: Mapping[str, Any], optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Continues a run whose trainer state is {"run": settings, "losses": [...]} here: `check_run`, then
        `restore`; returns the saved weights (for the caller to load into its model) and the losses."""
        self.check_run(run)
        self.restore(optimizer)
        return load_file(self.weights_file), [float(x) for x in self.state()["losses"]]

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Loads the optimizer's state and torch's RNG state as they were when this step was saved."""
        record = self._record()
        tensors = load_file(str(self.path / OPTIMIZER_FILE))
        per_param: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = value
        for index, values in record["optimizer_scalars"].items():
            per_param.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": per_param, "param_groups": record["param_groups"]})
        torch.set_rng_state(tensors[_RNG_KEY])


class Checkpoints:
    """The step checkpoints of one training run in `root`: `step-NNNNNNNN/` folders, the newest `keep` kept.

    Other entries of `root` (e.g. a trainer's cached inputs) are left alone, except temporary ones
    (`.<name>.tmp`) that an interrupted write left behind, which `save` removes.
    """

    def __init__(self, root: Path | str, keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep: must be at least 1, got {keep}")
        self.root, self.keep = Path(root), keep

    def all(self) -> list[Checkpoint]:
        """The complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP.fullmatch(path.name)
            if match and path.is_dir():
                found.append(Checkpoint(int(match[1]), path))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint: where a resumed run continues."""
        found = self.all()
        return found[-1] if found else None

    @classmethod
    def for_run(cls, out: Path, resume: bool) -> Checkpoints:
        """The checkpoints of a trainer writing to `out` (`out/checkpoints`), checked by `start`."""
        checkpoints = cls(out / CHECKPOINTS_DIR)
        checkpoints.start(resume)
        return checkpoints

    def start(self, resume: bool) -> Checkpoint | None:
        """Where a run starts: the latest checkpoint if `resume` (None if there is none yet), None for a new
        run; ParamError naming `resume` if a new run would train into the run saved here."""
        latest = self.latest()
        if latest is not None and not resume:
            raise ParamError("resume", f"{self.root} holds a run; resume it or choose another output folder")
        return latest

    def save(
        self,
        step: int,
        weights: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        state: Mapping[str, Any],
    ) -> Checkpoint:
        """Writes `step-NNNNNNNN/` (the `weights` by name, the optimizer's state and torch's RNG state,
        and `state`, which must be JSON), then removes all but the newest `keep` checkpoints."""
        optimizer_state = optimizer.state_dict()
        tensors = {_RNG_KEY: torch.get_rng_state()}
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in optimizer_state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        record = {
            "step": step,
            "state": dict(state),
            "param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
        }

        def build(tmp: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS_FILE)
            save_file(tensors, tmp / OPTIMIZER_FILE)
            atomic_write_json(tmp / STATE_FILE, record)

        path = self.root / f"step-{step:08d}"
        publish_dir(path, build)
        for stale in self.all()[: -self.keep]:
            shutil.rmtree(stale.path)
        for leftover in self.root.glob(".*.tmp"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        return Checkpoint(step, path)
