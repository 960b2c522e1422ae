"""services.runtime.training: argument checks, the data order, the learning-rate schedule, teachers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from services.runtime.artifacts import Checkpoints
from services.runtime.model_errors import ParamError
from services.runtime.training import (
    CROSS_ENCODER_TEMPERATURE,
    DENSE_TEMPERATURE,
    batch_indices,
    check_ranges,
    check_teacher,
    teacher_temperature,
    train_steps,
    training_index,
    warmup_decay_lr,
)


def _error(call) -> tuple[str, str]:
    with pytest.raises(ParamError) as caught:
        call()
    return caught.value.field, str(caught.value)


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step() -> None:
    epoch = np.concatenate([batch_indices(step, 4, 12, seed=3) for step in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))
    assert np.array_equal(batch_indices(5, 4, 12, seed=3), batch_indices(5, 4, 12, seed=3))
    assert not np.array_equal(batch_indices(0, 12, 12, seed=3), batch_indices(0, 12, 12, seed=4))
    # A batch larger than the data wraps into the next epoch.
    assert len(batch_indices(0, 5, 3, seed=0)) == 5
    # Epoch e is the permutation drawn from (seed, e), whatever the batch size.
    assert batch_indices(1, 3, 3, seed=7).tolist() == np.random.default_rng([7, 1]).permutation(3).tolist()


def test_grouped_examples_are_drawn_whole_and_passed_a_micro_batch_at_a_time(tmp_path: Path) -> None:
    model = torch.nn.Linear(1, 1)
    parts: list[list[int]] = []

    def loss_of(rows: np.ndarray) -> torch.Tensor:
        parts.append(rows.tolist())
        return model(torch.tensor([[float(r)] for r in rows])).pow(2).mean()

    settings = {"run": {}, "batch_size": 2, "lr": 1e-3, "seed": 5, "checkpoint_every": 10}
    checkpoints = Checkpoints.for_run(tmp_path, resume=False)
    train_steps(
        model,
        loss_of,
        12,
        checkpoints=checkpoints,
        steps=2,
        micro_batch=1,
        group=3,
        label="t",
        progress=False,
        **settings,
    )
    assert all(len(part) == 1 for part in parts) and len(parts) == 2 * 2 * 3
    for step in range(2):
        rows = [part[0] for part in parts[6 * step : 6 * step + 6]]
        groups = batch_indices(step, 2, 4, seed=5).tolist()
        assert rows == [3 * g + i for g in groups for i in range(3)]


def test_lr_warms_up_holds_and_decays_to_its_floor() -> None:
    lr = lambda step: warmup_decay_lr(  # noqa: E731
        step, 1.0, warmup=4, decay_start=9, decay_end=19, min_ratio=0.1
    )
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == lr(9) == 1.0
    assert lr(14) == pytest.approx(0.55) and lr(19) == pytest.approx(0.1) and lr(30) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(4, 30))


def test_lr_without_warmup_decays_to_zero_at_the_end() -> None:
    rates = [warmup_decay_lr(s, 2.0, warmup=0, decay_start=0, decay_end=4) for s in range(5)]
    assert rates == [2.0, 1.5, 1.0, 0.5, 0.0]


def test_check_ranges_names_the_first_field_out_of_range() -> None:
    check_ranges(at_least={"steps": (1, 1)}, positive={"lr": 0.1, "temperature": None}, non_negative={"w": 0})
    assert _error(lambda: check_ranges(at_least={"steps": (1, 1), "candidates": (1, 2)})) == (
        "candidates",
        "candidates: must be at least 2, got 1",
    )
    assert _error(lambda: check_ranges(at_least={"steps": (0, 1)}, positive={"lr": 0})) == (
        "steps",
        "steps: must be at least 1, got 0",
    )
    assert _error(lambda: check_ranges(positive={"lr": math.nan}))[0] == "lr"
    negative = _error(lambda: check_ranges(non_negative={"w": -0.5}))
    assert negative == ("w", "w: must not be negative, got -0.5")


def test_teachers_are_named_and_read_at_their_temperature() -> None:
    check_teacher("dense")
    check_teacher("cross-encoder:/models/ce")
    check_teacher("none", allow_none=True)
    assert _error(lambda: check_teacher("none")) == (
        "teacher",
        "teacher: expected 'dense' or 'cross-encoder:PATH', got 'none'",
    )
    assert _error(lambda: check_teacher("bm25", allow_none=True))[1].endswith(
        "expected 'none', 'dense' or 'cross-encoder:PATH', got 'bm25'"
    )
    assert teacher_temperature("dense") == DENSE_TEMPERATURE
    assert teacher_temperature("cross-encoder:x") == CROSS_ENCODER_TEMPERATURE


def test_a_corpus_is_mined_in_its_own_cut_index_and_qrels_in_the_datas() -> None:
    assert training_index("mine", Path("/d/scifact"), None, 0, "x") == "mine"
    assert training_index(None, Path("/d/scifact"), None, 0, "x") == "scifact"
    assert training_index(None, None, Path("/d/scifact"), 0, "x") == "scifact-cloze0"
    assert training_index(None, None, Path("/d/my docs.jsonl"), 3, "x") == "my-docs-cloze3"
