"""How the demo scores a generated answer: the expected answer, SQuAD-normalised, as whole words."""

from __future__ import annotations

import pytest

from services.demo.retro import contains_answer


@pytest.mark.parametrize(
    ("generated", "expected", "right"),
    [
        ("Glordai Peltin keeps it.", "Glordai Peltin", True),
        ("the keeper is glordai peltin", "Glordai Peltin", True),
        ("People settled there in 1868.", "1868", True),
        ("People settled there in 18680.", "1868", False),
        ("Peltin", "Glordai Peltin", False),
        ("", "Deaport", False),
        ("anything", "The", False),  # an answer that normalises to nothing is never contained
    ],
)
def test_contains_answer(generated: str, expected: str, right: bool) -> None:
    assert contains_answer(generated, expected) is right
