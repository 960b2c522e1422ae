"""The demo path: ingest the project's own sample corpus through the SDK, ask its questions, print.

It reports how many questions found the document that holds the known answer (top-1 and top-5),
so the demo shows measured retrieval quality, not just output.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.demo.corpus import demo_documents, demo_questions

DEMO_INDEX = "demo"


def run_demo(client: Any, console: Console, *, index: str = DEMO_INDEX, top_k: int = 5) -> dict[str, float]:
    """Ingests the demo corpus into `index` (replacing it), asks every demo question; returns hit rates."""
    import ragfleet

    documents = demo_documents()
    questions = demo_questions()
    try:
        client.delete(index=index, drop_index=True)
    except ragfleet.errors.NotFound:
        pass
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("ingesting the demo corpus", total=len(documents))
        report = client.ingest(
            documents, index=index, batch_size=32, progress=lambda n: bar.update(task, completed=n)
        )
    console.print(
        f"ingested {report.documents} documents as {report.passages} passages into "
        + ", ".join(f"{r.version.retriever} (v{r.version.version})" for r in report.retrievers)
    )

    top1 = top5 = 0
    for q in questions:
        answer = None
        passages = []
        for event in client.ask(q["question"], index=index, top_k=top_k):
            kind = event.WhichOneof("event")
            if kind in ("retrieved", "reranked"):
                passages = list(getattr(event, kind).passages)
            elif kind == "answer":
                answer = event.answer
        table = Table(title=f"Q: {q['question']}  (expected: {q['answer']})", title_justify="left")
        for column in ("rank", "score", "retriever", "citation", "passage"):
            table.add_column(column, overflow="fold")
        for p in passages:
            text = p.passage.text if len(p.passage.text) <= 120 else p.passage.text[:117] + "..."
            table.add_row(
                str(p.rank), f"{p.score:.4f}", p.retriever, f"[{p.passage.title}] {p.passage.id}", text
            )
        console.print(table)
        if answer is not None:
            console.print(f"[bold]answer[/bold]: {answer.text[:300]}")
        doc_ids = [p.passage.doc_id for p in passages]
        top1 += bool(doc_ids[:1] == [q["doc_id"]])
        top5 += q["doc_id"] in doc_ids[:5]
    n = len(questions)
    console.print(
        f"[bold]{top1}/{n}[/bold] questions have the answering document first, "
        f"[bold]{top5}/{n}[/bold] within the top {min(top_k, 5)} (fused dense + BM25)."
    )
    return {"hit@1": top1 / n, "hit@5": top5 / n}
