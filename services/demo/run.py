"""The demo path: ingest the project's own sample corpus through the SDK, install (or train) the demo's
Retro model, ask its questions with generation, print the streamed answers and their citations.

It reports how many questions found the document that holds the known answer (top-1 and top-5), how
many generated answers contain the expected answer (both SQuAD-normalised: lowercase, no punctuation or
articles), for how many right answers the first citation is the passage that holds the answer, and the
seconds to the first and the last answer, so the demo shows measured quality and speed, not just output.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from services.demo.corpus import demo_documents, demo_questions
from services.demo.retro import MAX_ANSWER_TOKENS, contains_answer, ensure_demo_model, replace_index
from services.ui import print_passages

DEMO_INDEX = "demo"


def run_demo(
    client: Any,
    console: Console,
    *,
    home: Path,
    index: str = DEMO_INDEX,
    top_k: int = 5,
    retrain: bool = False,
    started: float | None = None,
) -> dict[str, float]:
    """Ingests the demo corpus into `index` (replacing it), makes sure the demo's Retro checkpoint is at
    `<home>/models/retro` (the generator's default; `home` is the fleet's RAGFLEET_HOME; `retrain` trains
    it afresh), asks every demo question; returns the retrieval hit rates, the share of generated answers
    that are right and of right ones whose first citation holds the answer, and the seconds to the first
    and the last answer, counted from `started` (a `time.perf_counter()`; default: this call)."""
    started = time.perf_counter() if started is None else started
    questions = demo_questions()
    retrievers = replace_index(client, demo_documents(), index, console, "ingesting the demo corpus")
    ensure_demo_model(client, home, console, index=index, retrain=retrain)

    top1 = top5 = generated = correct = cited = 0
    first_answer = None
    for q in questions:
        answer = None
        right = False
        passages = []
        console.print(f"\n[bold]Q: {escape(q['question'])}[/bold]  (expected: {escape(q['answer'])})")
        streaming = False
        for event in client.ask(
            q["question"], index=index, top_k=top_k, params={"max_tokens": MAX_ANSWER_TOKENS}
        ):
            kind = event.WhichOneof("event")
            if kind in ("retrieved", "reranked"):
                passages = list(getattr(event, kind).passages)
                print_passages(console, passages, kind, max_chars=120)
            elif kind == "token":
                if not streaming:
                    console.print("[bold]answer[/bold]: ", end="")
                    streaming = True
                console.out(event.token, end="", highlight=False)
            elif kind == "answer":
                answer = event.answer
        if answer is not None:
            if answer.retrieval_only:
                console.print(f"[bold]answer[/bold]: {escape(answer.text[:300])}")
            else:
                generated += 1
                right = contains_answer(answer.text, q["answer"])
                correct += right
                verdict = "[green]right[/green]" if right else "[red]wrong[/red]"
                console.print(f"{'' if streaming else '[bold]answer[/bold]: (empty)'}  {verdict}")
            console.print(
                "citations: "
                + ", ".join(f"{escape(c.passage_id)} ({c.weight:.3f})" for c in answer.citations[:top_k])
            )
            if right:
                first = answer.citations[0].doc_id if answer.citations else "(none)"
                holds = first == q["doc_id"]
                cited += holds
                console.print(f"first citation {escape(first)} holds the answer: {'yes' if holds else 'no'}")
        if first_answer is None:
            first_answer = time.perf_counter() - started
            console.print(f"[bold]first answer after {first_answer:.1f} s[/bold]")
        doc_ids = [p.passage.doc_id for p in passages]
        top1 += bool(doc_ids[:1] == [q["doc_id"]])
        top5 += q["doc_id"] in doc_ids[:5]
    n = len(questions)
    last_answer = time.perf_counter() - started
    console.print(
        f"\n[bold]{top1}/{n}[/bold] questions have the answering document first, "
        f"[bold]{top5}/{n}[/bold] within the top {min(top_k, 5)} ({' + '.join(retrievers)}"
        f"{' fused' if len(retrievers) > 1 else ''})."
    )
    console.print(
        f"[bold]{correct}/{n}[/bold] generated answers contain the expected answer "
        f"({generated}/{n} questions were answered by the generator)."
    )
    console.print(f"[bold]{cited}/{correct}[/bold] right answers cite the passage holding the answer first.")
    console.print(f"first answer after {first_answer:.1f} s, last after {last_answer:.1f} s.")
    return {
        "hit@1": top1 / n,
        "hit@5": top5 / n,
        "answers_right": correct / n,
        "first_citation_holds_answer": cited / max(correct, 1),
        "seconds_to_first_answer": first_answer,
        "seconds_to_last_answer": last_answer,
    }
