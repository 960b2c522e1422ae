"""Atomic folder publishing and step checkpoints (services/runtime/artifacts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.runtime.artifacts import (
    Checkpoints,
    publish_dir,
    publish_file,
    write_directory,
)
from services.runtime.model_errors import ArtifactError, ParamError


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_publish_replaces_the_folder_and_carries_named_entries(tmp_path: Path) -> None:
    target = tmp_path / "model"
    write_directory(target, {"a.txt": b"old", "stale.txt": b"x"})
    (target / "checkpoints").mkdir()
    (target / "checkpoints" / "kept").write_text("state")
    write_directory(target, {"a.txt": b"new"}, carry=["checkpoints", "missing"])
    assert _names(target) == ["a.txt", "checkpoints"]
    assert (target / "a.txt").read_bytes() == b"new"
    assert (target / "checkpoints" / "kept").read_text() == "state"
    assert _names(tmp_path) == ["model"]  # no temporary or old folder left behind


def test_publish_leaves_the_old_folder_intact_when_the_build_raises(tmp_path: Path) -> None:
    target = tmp_path / "model"
    write_directory(target, {"a.txt": b"old"})

    def build(tmp: Path) -> None:
        (tmp / "a.txt").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_dir(target, build)
    assert _names(tmp_path) == ["model"]
    assert (target / "a.txt").read_bytes() == b"old"


def test_publish_file_writes_whole_files_only(tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    publish_file(target, lambda tmp: tmp.write_bytes(b"first"))

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"par")
        raise OSError("interrupted")

    with pytest.raises(OSError):
        publish_file(target, fail)
    assert target.read_bytes() == b"first" and _names(tmp_path) == ["big.bin"]


def _trained(steps: int) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
    return model, optimizer


def test_keep_last_k_prunes_and_latest_is_the_newest_complete_step(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    checkpoints = Checkpoints(root, keep=2)
    assert checkpoints.latest() is None
    model, optimizer = _trained(1)
    (root / ".step-00000500.abc.tmp").mkdir(parents=True)  # an interrupted write: not a checkpoint
    (root / "inputs.bin").write_bytes(b"cached")
    assert checkpoints.latest() is None
    for step in (5, 10, 100):
        checkpoints.save(step, dict(model.named_parameters()), optimizer, {"losses": [step]})
    assert [c.step for c in checkpoints.all()] == [10, 100]
    assert _names(root) == ["inputs.bin", "step-00000010", "step-00000100"]
    latest = checkpoints.latest()
    assert latest is not None and latest.step == 100 and latest.state() == {"losses": [100]}


def test_restore_continues_exactly_where_the_saved_run_was(tmp_path: Path) -> None:
    model, optimizer = _trained(3)
    saved = Checkpoints(tmp_path).save(3, dict(model.named_parameters()), optimizer, {})
    expected = torch.randn(2)  # the RNG draw after the save

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh.load_state_dict(load_file(saved.weights_file))
    saved.restore(fresh_optimizer)
    assert torch.equal(torch.randn(2), expected)
    for m, o in ((model, optimizer), (fresh, fresh_optimizer)):
        o.zero_grad()
        m(torch.ones(1, 3)).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_check_run_refuses_a_resume_with_other_settings(tmp_path: Path) -> None:
    model, optimizer = _trained(1)
    run = {"lr": 0.1, "data": "abc"}
    saved = Checkpoints(tmp_path).save(1, dict(model.named_parameters()), optimizer, {"run": run})
    saved.check_run(run)
    with pytest.raises(ParamError, match=r"other settings or data \(data, lr\)") as err:
        saved.check_run({"lr": 0.2, "data": "xyz"})
    assert err.value.field == "resume"


def test_a_step_folder_of_another_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "step-000008").mkdir()
    (tmp_path / "step-000008" / "trainer.json").write_text("{}")
    latest = Checkpoints(tmp_path).latest()
    assert latest is not None and latest.step == 8
    with pytest.raises(ArtifactError, match="older layout"):
        latest.state()


def test_start_resumes_only_when_asked_and_a_new_run_needs_an_empty_folder(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    assert checkpoints.start(resume=False) is None and checkpoints.start(resume=True) is None
    model, optimizer = _trained(1)
    checkpoints.save(4, dict(model.named_parameters()), optimizer, {})
    assert checkpoints.start(resume=True).step == 4
    with pytest.raises(ParamError, match="holds a run; resume it or choose another output folder") as err:
        checkpoints.start(resume=False)
    assert err.value.field == "resume"


def test_resume_checks_the_run_and_returns_the_weights_and_losses(tmp_path: Path) -> None:
    model, optimizer = _trained(2)
    run = {"lr": 0.1}
    saved = Checkpoints(tmp_path).save(2, model.state_dict(), optimizer, {"run": run, "losses": [0.5, 0.25]})
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    with pytest.raises(ParamError, match="resume"):
        saved.resume({"lr": 0.2}, fresh_optimizer)
    weights, losses = saved.resume(run, fresh_optimizer)
    fresh.load_state_dict(weights)
    assert losses == [0.5, 0.25]
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
