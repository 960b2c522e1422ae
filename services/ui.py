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


def highlighted(text: str, highlights: Iterable[Any], max_chars: int, *, plain: bool = False) -> str:
    """Rich markup of `text` cut to `max_chars`, its highlights (anything with start and end character
    offsets, such as the contract's Highlight) in bold yellow, or between « and » when `plain` (output
    without colours: a pipe, a log, NO_COLOR); overlapping ones are merged."""
    cut = len(text) if len(text) <= max_chars else max_chars - 3
    spans: list[list[int]] = []
    for h in sorted(highlights, key=lambda h: (h.start, h.end)):
        start, end = max(0, h.start), min(h.end, cut)
        if start >= end:
            continue
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    parts, at = [], 0
    for start, end in spans:
        span = escape(text[start:end])
        parts += [escape(text[at:start]), f"«{span}»" if plain else f"[bold yellow]{span}[/bold yellow]"]
        at = end
    parts.append(escape(text[at:cut]))
    return "".join(parts) + ("..." if cut < len(text) else "")


def passage_table(results: Iterable[Any], title: str, *, max_chars: int = 160, plain: bool = False) -> Table:
    """A table of search results (anything with rank, score, retriever and a passage with id, title and
    text, such as the SDK's ranked passages): one row each, texts cut to `max_chars`, the spans a
    retriever matched (`highlights`, seal's n-grams) in bold yellow (between « and » when `plain`)."""
    table = Table(title=title, title_justify="left")
    for column in ("rank", "score", "retriever", "passage", "text"):
        table.add_column(column, overflow="fold")
    for r in results:
        text = highlighted(r.passage.text, getattr(r, "highlights", ()), max_chars, plain=plain)
        cite = f"[{r.passage.title}] {r.passage.id}" if r.passage.title else r.passage.id
        table.add_row(str(r.rank), f"{r.score:.4f}", r.retriever, escape(cite), text)
    return table


def print_passages(console: Console, results: Iterable[Any], title: str, *, max_chars: int = 160) -> None:
    """Prints `passage_table` on `console`, its highlights marked in plain text where the console has no
    colours."""
    console.print(passage_table(results, title, max_chars=max_chars, plain=console.color_system is None))
