"""The shared terminal output (services/ui.py)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console
from rich.progress import Progress

from services.ui import highlighted, passage_table, print_passages, progress_bar


def _result(rank: int, text: str, title: str = "") -> SimpleNamespace:
    passage = SimpleNamespace(id=f"doc{rank}#0", title=title, text=text)
    return SimpleNamespace(rank=rank, score=1.0 / rank, retriever="dense", passage=passage)


def test_progress_bar_counts_and_draws_only_when_enabled() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=100)
    with progress_bar(console, enabled=False) as bar:
        assert isinstance(bar, Progress)
        task = bar.add_task("work", total=3)
        bar.update(task, advance=2)
        assert bar.tasks[0].completed == 2
    assert out.getvalue() == ""
    with progress_bar(console) as bar:
        bar.add_task("ingesting", total=4, completed=4)
    assert "ingesting" in out.getvalue() and "4/4" in out.getvalue()


def test_passage_table_cuts_long_texts_and_prints_markup_as_text() -> None:
    results = [_result(1, "x" * 50, title="[b]Island[/b]"), _result(2, "short")]
    out = io.StringIO()
    Console(file=out, width=200).print(passage_table(results, "query", max_chars=20))
    printed = out.getvalue()
    assert "x" * 17 + "..." in printed and "x" * 18 not in printed
    assert "[[b]Island[/b]] doc1#0" in printed and "doc2#0" in printed and "short" in printed


def test_highlights_show_between_marks_where_there_are_no_colours() -> None:
    text = "kelp ash is shipped"
    spans = [SimpleNamespace(start=0, end=4), SimpleNamespace(start=2, end=8)]
    assert highlighted(text, spans, 100, plain=True) == "«kelp ash» is shipped"
    assert highlighted(text, spans, 100) == "[bold yellow]kelp ash[/bold yellow] is shipped"


def test_print_passages_marks_highlights_in_plain_text_on_a_console_without_colours() -> None:
    result = _result(1, "kelp ash is shipped")
    result.highlights = [SimpleNamespace(start=0, end=8)]
    out = io.StringIO()
    print_passages(Console(file=out, width=200), [result], "query")
    assert "«kelp ash» is shipped" in out.getvalue()
