"""What every trainer's loop does the same way: argument checks, the data order, the learning rate, and
the naming of a distillation teacher.

- `check_ranges` raises ParamError naming the first argument out of range, before any work.
- `batch_indices(step, batch_size, n, seed)`: the examples of a step, a pure function of the step, so a
  resumed run sees the batches an uninterrupted one would without saving the order.
- `warmup_decay_lr`: linear warmup, a constant rate, then a linear decay.
- A teacher is "dense" (all-MiniLM-L6-v2's cosine similarities) or "cross-encoder:PATH" (a cross-encoder's
  logits), read through a softmax at `teacher_temperature(teacher)`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from services.runtime.model_errors import ParamError

DENSE_TEACHER = "dense"
CROSS_ENCODER_PREFIX = "cross-encoder:"
# Cosines of related texts differ by tenths, so their softmax needs a low temperature; logits do not.
DENSE_TEMPERATURE = 0.05
CROSS_ENCODER_TEMPERATURE = 1.0


def check_ranges(
    *,
    at_least: Mapping[str, tuple[float, float]] | None = None,
    positive: Mapping[str, float | None] | None = None,
    non_negative: Mapping[str, float | None] | None = None,
) -> None:
    """ParamError naming the first field out of range, checking `at_least` (field -> (value, lowest
    allowed)), then `positive`, then `non_negative` (field -> value; None for one left unset)."""
    for field, (value, low) in (at_least or {}).items():
        if not value >= low:
            raise ParamError(field, f"must be at least {low}, got {value}")
    for field, value in (positive or {}).items():
        if value is not None and not value > 0:
            raise ParamError(field, f"must be positive, got {value}")
    for field, value in (non_negative or {}).items():
        if value is not None and not value >= 0:
            raise ParamError(field, f"must not be negative, got {value}")


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Examples of `step` (0-based): positions [step*B, (step+1)*B) of the epochs' permutations laid end to
    end, epoch e being the permutation of range(n) drawn from (seed, e)."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, within = np.divmod(positions, n)
    orders = {e: np.random.default_rng([seed, e]).permutation(n) for e in set(epochs.tolist())}
    return np.array([orders[e][j] for e, j in zip(epochs.tolist(), within.tolist(), strict=True)])


def warmup_decay_lr(
    step: int, lr: float, *, warmup: int, decay_start: int, decay_end: int, min_ratio: float = 0.0
) -> float:
    """The rate of `step` (0-based): rising linearly to `lr` over the first `warmup` steps (step
    warmup - 1 is the first at `lr`), `lr` up to step `decay_start`, then falling linearly to
    lr · min_ratio at step `decay_end`, and held there."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step <= decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, decay_end - decay_start))
    return lr * (1 - (1 - min_ratio) * progress)


def check_teacher(teacher: str, *, allow_none: bool = False) -> None:
    """ParamError naming `teacher` unless it is "dense", "cross-encoder:PATH" or, if allowed, "none"."""
    named = ("none", DENSE_TEACHER) if allow_none else (DENSE_TEACHER,)
    if teacher in named or teacher.startswith(CROSS_ENCODER_PREFIX):
        return
    expected = [repr(name) for name in (*named, f"{CROSS_ENCODER_PREFIX}PATH")]
    raise ParamError("teacher", f"expected {', '.join(expected[:-1])} or {expected[-1]}, got {teacher!r}")


def teacher_temperature(teacher: str) -> float:
    """The softmax temperature a teacher's scores are read at."""
    return DENSE_TEMPERATURE if teacher == DENSE_TEACHER else CROSS_ENCODER_TEMPERATURE
