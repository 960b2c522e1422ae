"""Terminal output shared by the CLI, the demo, the evaluator and the trainers: rich progress bars and
tables of retrieved passages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def progress_bar(console: Console | None = None, *, enabled: bool = True) -> Progress:
    """A progress display whose tasks show description, bar, done/total and elapsed time; use it as a
    context manager. `enabled=False` draws nothing (tasks still count)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def passage_table(results: Iterable[Any], title: str, *, max_chars: int = 160) -> Table:
    """A table of search results (anything with rank, score, retriever and a passage with id, title and
    text, such as the SDK's ranked passages): one row each, texts cut to `max_chars`."""
    table = Table(title=title, title_justify="left")
    for column in ("rank", "score", "retriever", "passage", "text"):
        table.add_column(column, overflow="fold")
    for r in results:
        text = r.passage.text if len(r.passage.text) <= max_chars else r.passage.text[: max_chars - 3] + "..."
        cite = f"[{r.passage.title}] {r.passage.id}" if r.passage.title else r.passage.id
        table.add_row(str(r.rank), f"{r.score:.4f}", r.retriever, escape(cite), escape(text))
    return table
